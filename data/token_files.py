"""Token classification (NER-style) files: sentences and their word tags.

Sentences are dicts `{'tokens': [str], 'tags': [str]}`, read from CoNLL files or `.jsonl`
(also `.gz` / `.zst`), `.parquet`, `.arrow` or `datasets` directories (`read_token_files`);
`align_tags` puts each word's tag on its first WordPiece.
"""

from collections.abc import Sequence

import numpy as np

from core.errors import ConfigError, DataError
from data import formats
from data.formats import match_files
from data.text import json_kind, jsonl_field, place, read_lines, records, shown
from data.tokenizer import WordPiece


def _read_conll_file(path: str) -> list[dict]:
    """The sentences of one CoNLL file (see `read_conll`)."""
    sentences, tokens, tags = [], [], []
    for n, line in enumerate(read_lines(path), 1):
        columns = line.split()
        if not columns or columns[0] == '-DOCSTART-':
            if tokens:
                sentences.append({'tokens': tokens, 'tags': tags})
                tokens, tags = [], []
            continue
        if len(columns) < 2:
            raise DataError(
                f'{path} line {n}: expected a token and its tag separated by whitespace '
                f'(tag in the last column), found {line.strip()!r}'
            )
        tokens.append(columns[0])
        tags.append(columns[-1])
    if tokens:
        sentences.append({'tokens': tokens, 'tags': tags})
    return sentences


def read_conll(pattern: str) -> list[dict]:
    """Sentences `{'tokens': [str], 'tags': [str]}` of CoNLL files matching `pattern` (comma-
    separated globs ok): one token a line, its tag in the last whitespace-separated column
    (CoNLL-2003's 4 columns or plain `token tag`), a blank line between sentences,
    `-DOCSTART-` lines skipped."""
    sentences = []
    for path in match_files(pattern):
        found = _read_conll_file(path)
        if not found:
            raise DataError(f'{path} holds no sentences; expected CoNLL lines "token ... tag"')
        sentences.extend(found)
    return sentences


def _read_token_records(path: str, tokens_field: str, tags_field: str) -> list[dict]:
    """The sentences of a .jsonl file or a table (lists in `tokens_field` and `tags_field`)."""
    sentences = []
    fields = {tokens_field: 'tokens_field', tags_field: 'tags_field'}
    for n, record in records(path, fields):
        tokens = jsonl_field(path, n, record, tokens_field, 'tokens_field', (list,))
        tags = jsonl_field(path, n, record, tags_field, 'tags_field', (list,))
        for field, values, allowed in (
            (tokens_field, tokens, (str,)),
            (tags_field, tags, (str, int)),
        ):
            bad = [i for i, v in enumerate(values) if type(v) not in allowed]  # bool: not int
            if bad:
                value = values[bad[0]]
                what = 'strings' if allowed == (str,) else 'strings or integer tag ids'
                raise DataError(
                    f'{path} {place(n)}: item {bad[0]} of field {field!r} is {json_kind(value)} '
                    f'({shown(value)}); expected a list of {what}; fix the line'
                )
        if len(tokens) != len(tags):
            raise DataError(
                f'{path} {place(n)}: {len(tokens)} tokens but {len(tags)} tags; each token '
                'needs exactly one tag'
            )
        if tokens:
            sentences.append({'tokens': [str(t) for t in tokens], 'tags': [str(t) for t in tags]})
    return sentences


def read_token_files(
    pattern: str, tokens_field: str = 'tokens', tags_field: str = 'tags'
) -> list[dict]:
    """Token-classification sentences `{'tokens', 'tags'}` of the files matching `pattern`:
    `.jsonl` (lists in `tokens_field` and `tags_field`, one sentence a line), a table with
    those list columns (`.parquet`, `.arrow`, a `datasets` directory) or CoNLL text (any
    other extension, see `read_conll`); text files also .gz / .zst. Integer tags become
    strings."""
    sentences = []
    for path in match_files(pattern):
        ext = formats.kind(path)
        if ext == '.jsonl' or ext in formats.TABLES:
            found = _read_token_records(path, tokens_field, tags_field)
        else:
            found = _read_conll_file(path)
        if not found:
            raise DataError(f'{path} holds no sentences')
        sentences.extend(found)
    return sentences


def align_tags(
    tokens: Sequence[str], tag_ids: Sequence[int], wordpiece: WordPiece, seq_len: int
) -> dict:
    """One sentence -> fixed-length model inputs with word labels on first WordPieces.

    Returns `input_ids`, `input_mask` (int32 [seq_len]): [CLS] pieces [SEP], padded with 0;
    `labels` (int32 [seq_len]) and `label_weights` (float32 [seq_len]): each word's tag id
    on its first piece with weight 1, everything else (later pieces, [CLS], [SEP], padding)
    label 0 weight 0; and `num_words`, the words kept. Words are encoded one at a time with
    `wordpiece.encode` (lowercased, accents stripped, punctuation split off as the
    vocabulary's normalizer does), a word with no pieces (whitespace, control characters)
    becomes [UNK]; whole trailing words that do not fit are dropped, so predictions exist
    only for the first `num_words` words (score the rest as 'O' or count them as missed)."""
    if seq_len < 3:
        raise ConfigError(
            f'seq_len must be at least 3 ([CLS] a token [SEP]), found {seq_len}; set '
            '--config.data.seq_len'
        )
    if wordpiece.pad_id != 0:
        raise DataError(
            f'vocabulary {wordpiece.vocab_file} has [PAD] at id {wordpiece.pad_id}; batches pad '
            'with 0, so [PAD] must be its first line'
        )
    if len(tokens) != len(tag_ids):
        raise DataError(
            f'expected one tag per token, found {len(tokens)} tokens and {len(tag_ids)} tags'
        )
    input_ids = np.zeros(seq_len, np.int32)
    labels = np.zeros(seq_len, np.int32)
    weights = np.zeros(seq_len, np.float32)
    input_ids[0] = wordpiece.cls_id
    position, num_words = 1, 0
    for word, tag in zip(tokens, tag_ids):
        pieces = wordpiece.encode(word)
        if len(pieces) == 0:
            pieces = np.asarray([wordpiece.unk_id], np.int32)
        if position + len(pieces) > seq_len - 1:  # keep room for [SEP]
            break
        input_ids[position : position + len(pieces)] = pieces
        labels[position] = tag
        weights[position] = 1.0
        position += len(pieces)
        num_words += 1
    input_ids[position] = wordpiece.sep_id
    input_mask = np.zeros(seq_len, np.int32)
    input_mask[: position + 1] = 1
    return {
        'input_ids': input_ids,
        'input_mask': input_mask,
        'labels': labels,
        'label_weights': weights,
        'num_words': num_words,
    }
