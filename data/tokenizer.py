"""WordPiece tokenization with the Hugging Face `tokenizers` library.

A vocabulary is either given (a BERT `vocab.txt`) or trained on the corpus and saved as
`vocab.txt` in the workdir, so a resumed or fine-tuned run tokenizes exactly the same way.
"""

import os
import shutil
from collections.abc import Iterable

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tokenizers import BertWordPieceTokenizer

from core import recipe
from core.errors import ConfigError, DataError
from core.files import atomic_write
from data import corpus
from data import text as text_lib

SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')


class WordPiece:
    """A BERT WordPiece tokenizer over a `vocab.txt` file."""

    def __init__(self, vocab_file: str, lowercase: bool = True):
        if not os.path.isfile(vocab_file):
            raise DataError(
                f'vocabulary file {vocab_file} not found; give a BERT vocab.txt with '
                '--config.data.vocab_file, or leave it empty to train one on the corpus'
            )
        self.vocab_file = vocab_file
        self.lowercase = lowercase
        # Checked before BertWordPieceTokenizer reads the file: it raises a bare TypeError
        # ("sep_token not found in the vocabulary") for a vocabulary without [SEP] or [CLS].
        # Read here (UTF-8 checked, a byte-order mark dropped, as every reader does) and
        # given to the tokenizer as a dict: {token: line index}, as its own file reader
        # builds it (trailing whitespace trimmed, a repeated token keeps its last line).
        lines = text_lib.read_lines(vocab_file)
        tokens = {line.rstrip(): i for i, line in enumerate(lines)}
        missing = [t for t in SPECIAL_TOKENS if t not in tokens]
        if missing:
            raise DataError(
                f'vocabulary {vocab_file} lacks the special tokens {missing}; a BERT vocab.txt '
                f'must contain {list(SPECIAL_TOKENS)}'
            )
        self._tok = BertWordPieceTokenizer(tokens, lowercase=lowercase)
        vocab = self._tok.get_vocab()
        self.vocab_size = len(vocab)
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            vocab[t] for t in SPECIAL_TOKENS
        )
        # Subword continuations ("##ing") extend the previous word (for whole-word masking).
        self.is_continuation = np.zeros(self.vocab_size, bool)
        # Any token in brackets ([PAD], [unused0], ...) is never masked nor drawn at random.
        self.is_special = np.zeros(self.vocab_size, bool)
        for token, i in vocab.items():
            self.is_continuation[i] = token.startswith('##')
            self.is_special[i] = token.startswith('[') and token.endswith(']')

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text`, without [CLS]/[SEP]."""
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [
            np.asarray(e.ids, np.int32)
            for e in self._tok.encode_batch(texts, add_special_tokens=False)
        ]

    def decode(self, ids) -> str:
        return self._tok.decode(list(map(int, ids)), skip_special_tokens=False)

    def __getstate__(self):  # picklable for multiprocess data loading
        return {'vocab_file': self.vocab_file, 'lowercase': self.lowercase}

    def __setstate__(self, state):
        self.__init__(state['vocab_file'], state['lowercase'])


def _continuation_tokens(tok: BertWordPieceTokenizer, texts: list[str]) -> list[str]:
    """'##c' for every character that follows the first of a word (as the tokenizer's own
    normaliser and pre-tokenizer cut words), in code-point order."""
    normalize, pre_tokenize = tok.normalizer.normalize_str, tok.pre_tokenizer.pre_tokenize_str
    words = {word for text in texts for word, _ in pre_tokenize(normalize(text))}
    return ['##' + c for c in sorted({c for word in words for c in word[1:]})]


def train_wordpiece(
    texts: Iterable[str], vocab_size: int, out_file: str, lowercase: bool = True
) -> WordPiece:
    """Trains a WordPiece vocabulary of at most `vocab_size` tokens; writes `out_file`."""
    texts = list(texts)
    tok = BertWordPieceTokenizer(lowercase=lowercase)
    # The trainer numbers the ##-continuations in hash-map order (random per process) and
    # breaks count ties by those ids: fixing their ids first makes the vocabulary reproducible.
    tok.train_from_iterator(
        texts,
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[*SPECIAL_TOKENS, *_continuation_tokens(tok, texts)],
        show_progress=False,
    )
    directory = os.path.dirname(out_file) or '.'
    os.makedirs(directory, exist_ok=True)
    with atomic_write(out_file, encoding='utf-8') as f:  # never a half-written vocabulary
        vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
        f.writelines(token + '\n' for token, _ in vocab)
    return WordPiece(out_file, lowercase)


class FixedLengthEncoder:
    """A sentence or caption -> int32 [seq_len]: [CLS] WordPiece ids [SEP], truncated to
    fit, padded with 0 ([PAD]). Picklable, for multiprocess data loading."""

    def __init__(self, wordpiece: WordPiece, seq_len: int):
        if seq_len < 3:
            raise ConfigError(
                f'seq_len must be at least 3 ([CLS] a token [SEP]), found {seq_len}; '
                'set --config.data.seq_len'
            )
        if wordpiece.pad_id != 0:
            raise DataError(
                f'vocabulary {wordpiece.vocab_file} has [PAD] at id {wordpiece.pad_id}; batches'
                ' pad with 0 and mask the ids != 0, so [PAD] must be its first line'
            )
        self.wordpiece, self.seq_len = wordpiece, seq_len

    def __call__(self, text: str) -> np.ndarray:
        ids = self.wordpiece.encode(text)[: self.seq_len - 2]
        out = np.zeros(self.seq_len, np.int32)
        out[0] = self.wordpiece.cls_id
        out[1 : len(ids) + 1] = ids
        out[len(ids) + 1] = self.wordpiece.sep_id
        return out


def _dotted(config, key: str):
    for part in key.split('.'):
        config = config[part]
    return config


def make_tokenizer(
    config, workdir: str, train_docs, vocab_key: str = 'model.vocab_size'
) -> WordPiece:
    """The run's vocabulary, saved as WORKDIR/vocab.txt. In order: the workdir's own (a
    resumed run), `data.vocab_file`, the `init_from` run's, or one trained on the corpus
    (at most the config's `vocab_key` tokens). With `init_from`, `data.vocab_file` must be
    that run's vocabulary, and a run without one needs `data.vocab_file`: a restored
    embedding is never read under another vocabulary. A trained vocabulary reads at most
    `data.vocab_sample_bytes` of `train_docs` (`corpus.vocab_sample`)."""
    vocab_size = _dotted(config, vocab_key)
    target = os.path.join(workdir, 'vocab.txt')
    lowercase = config.data.lowercase
    if not os.path.isfile(target):
        init_vocab = recipe.init_from_vocab(config)  # on every process: all refuse alike
        if jax.process_index() == 0:
            if config.data.vocab_file:
                WordPiece(config.data.vocab_file, lowercase)  # fails clearly if unusable
                shutil.copyfile(config.data.vocab_file, target)
            elif init_vocab:
                shutil.copyfile(init_vocab, target)
            else:
                # A config saved before the key: 0, the whole corpus, as it was then.
                sample_bytes = config.data.get('vocab_sample_bytes', 0)
                sample = corpus.vocab_sample(train_docs, sample_bytes)
                logging.info(
                    'training a %d-token WordPiece vocabulary on %d of the %d training '
                    'documents (data.vocab_sample_bytes=%d)',
                    vocab_size,
                    len(sample),
                    len(train_docs),
                    sample_bytes,
                )
                train_wordpiece(sample, vocab_size, target, lowercase)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices('vocab')
    tokenizer = WordPiece(target, lowercase)
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(
            f'the vocabulary {target} has {tokenizer.vocab_size} tokens but {vocab_key} is '
            f'{vocab_size}; set --config.{vocab_key}={tokenizer.vocab_size} (or larger)'
        )
    return tokenizer
