"""Text corpora as random-access sequences of documents (strings).

Sources, chosen by `config.data`:
  - embedded (no download): `pydoc` (CPython's own documentation topics, from
    `pydoc_data.topics`), `pydoc_stdlib` (those plus the docstrings of the standard
    library's modules, read from source with `ast`, nothing imported), both without any
    paragraph of the embedded `pydoc_topics` classification task (`task_paragraphs`), so
    pretraining on them never reads that task's validation or test text;
  - `files`: local glob of `.txt` (documents separated by blank lines), `.jsonl`
    (`text_field` of each object), `.tsv` / `.csv` (`text_field` column, header row), each
    also `.gz` / `.zst`; `.parquet`, `.arrow` or a `datasets` `save_to_disk` directory
    (`text_field` column), see `data.formats`. Plain `.txt` and `.jsonl` files are
    indexed, not read into memory (`data.corpus`), so a corpus may be larger than memory;
  - any other `name`: a TFDS dataset read with `tfds.data_source` (array_record, no
    TensorFlow), `text_field` of each record.
"""

import ast
import codecs
import collections
import csv
import functools
import glob
import hashlib
import io
import json
import os
import re
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from absl import logging

from core.errors import DataError
from core.files import atomic_write, user_cache_dir
from data import corpus, formats, tfds_source

EMBEDDED = ('pydoc', 'pydoc_stdlib')
PROGRESS_SECS = 1.5  # a slow first read of the embedded corpus says how far it is this often


_PARAGRAPH_BREAK = re.compile(r'\n\s*\n')


def paragraphs(text: str) -> list[str]:
    """The paragraphs of a text: blocks between blank (or whitespace-only) lines, stripped."""
    return [p.strip() for p in _PARAGRAPH_BREAK.split(text) if p.strip()]


def normalise_paragraph(paragraph: str) -> str:
    """What two paragraphs are compared by: whitespace collapsed, lowercased."""
    return ' '.join(paragraph.split()).lower()


def _paragraph_documents(
    text: str, target_chars: int = 2000, drop: Callable[[str], bool] | None = None
) -> list[str]:
    """Splits a long text into documents of about `target_chars`, at paragraph breaks;
    paragraphs for which `drop` is true are left out."""
    docs, current = [], []
    size = 0
    for para in paragraphs(text):
        if drop is not None and drop(para):
            continue
        current.append(para)
        size += len(para)
        if size >= target_chars:
            docs.append('\n\n'.join(current))
            current, size = [], 0
    if current:
        docs.append('\n\n'.join(current))
    return docs


def pydoc_topics(drop: Callable[[str], bool] | None = None) -> list[str]:
    """CPython's documentation topics (the text `help('topic')` shows), ~0.5 MB; paragraphs
    for which `drop` is true left out."""
    from pydoc_data.topics import topics

    docs = []
    for name in sorted(topics):
        docs.extend(_paragraph_documents(topics[name], drop=drop))
    return docs


def pydoc_topic_paragraphs(
    min_paragraphs: int = 20, min_words: int = 8
) -> tuple[list[str], np.ndarray, list[str]]:
    """A labelled text task built from CPython's documentation: which topic (`help()`
    page: 'assignment', 'calls', 'class', ...) a paragraph comes from. Paragraphs of at
    least `min_words` words; those that occur more than once are dropped (some pages repeat
    others word for word: 'async', 'try' and 'with' are sections of 'compound', so the same
    text would carry two labels); then the topics left with fewer than `min_paragraphs`.
    13 topics and 899 paragraphs remain (Python 3.11).

    Returns (paragraphs, labels int32 [N], topic names); topic i is labels == i."""
    from pydoc_data.topics import topics

    per_topic = {}
    for name in sorted(topics):
        paras = [' '.join(p.split()) for p in paragraphs(topics[name])]
        per_topic[name] = [p for p in paras if len(p.split()) >= min_words]
    copies = collections.Counter(p for paras in per_topic.values() for p in paras)
    per_topic = {k: [p for p in v if copies[p] == 1] for k, v in per_topic.items()}
    names = sorted(k for k, v in per_topic.items() if len(v) >= min_paragraphs)
    texts = [p for name in names for p in per_topic[name]]
    labels = np.array([i for i, name in enumerate(names) for _ in per_topic[name]], np.int32)
    return texts, labels, names


@functools.cache
def task_paragraphs() -> frozenset[str]:
    """Every paragraph of the embedded text-classification task (`pydoc_topic_paragraphs`,
    all its splits), normalised: what the embedded pretraining corpora leave out, so that
    no pretraining run reads a paragraph the task validates or tests on."""
    return frozenset(normalise_paragraph(p) for p in pydoc_topic_paragraphs()[0])


_SHINGLE = 4  # words: every task paragraph has at least 8


@functools.cache
def _task_paragraph_index() -> dict[tuple[str, ...], list[tuple[str, ...]]]:
    """The task paragraphs as word tuples, by their first _SHINGLE words."""
    index = collections.defaultdict(list)
    for key in task_paragraphs():
        words = tuple(key.split())
        index[words[:_SHINGLE]].append(words)
    return dict(index)


def holds_task_paragraph(paragraph: str) -> bool:
    """Whether `paragraph`, normalised, is a task paragraph (`task_paragraphs`) or holds
    one as a run of whole words (a pdb docstring quotes the pdb topic's lines, say)."""
    words = tuple(normalise_paragraph(paragraph).split())
    index = _task_paragraph_index()
    for i in range(len(words) - _SHINGLE + 1):
        for key in index.get(words[i : i + _SHINGLE], ()):
            if words[i : i + len(key)] == key:
                return True
    return False


_SENTENCE_END = re.compile(r'(?<=[.!?])\s+(?=[A-Z(\'"])')


def sentences(docs: Sequence[str], min_words: int = 5, max_words: int = 64) -> list[str]:
    """Documents -> sentences (split after . ! ? before a capital), whitespace collapsed;
    sentences of fewer than `min_words` words are dropped, longer ones than `max_words`
    cut. The units SimCSE contrasts."""
    out = []
    for i in range(len(docs)):
        for para in re.split(r'\n\s*\n', docs[i]):
            for sent in _SENTENCE_END.split(' '.join(para.split())):
                words = sent.split()
                if len(words) >= min_words:
                    out.append(' '.join(words[:max_words]))
    return out


def _cached(name: str, build: Callable[[], list[str]]) -> list[str]:
    """`build()`, kept as JSON in pretrax's `corpus` cache directory (core/files.py) under
    a key of this Python (its version and standard library) and this file's code, so a
    second start reads it instead of parsing the standard library again (~3 s). A missing,
    unreadable or unwritable cache file only means building it: the same documents."""
    where = user_cache_dir('corpus')
    if where is None:
        return build()
    with open(__file__, 'rb') as f:
        code = f.read()
    key = repr((sys.version, sysconfig.get_paths()['stdlib'], name)).encode() + code
    path = os.path.join(where, f'{name}-{hashlib.sha256(key).hexdigest()[:20]}.json')
    try:
        with open(path, encoding='utf-8') as f:
            docs = json.load(f)
        if isinstance(docs, list) and all(isinstance(d, str) for d in docs):
            return docs
    except (OSError, ValueError):
        pass
    docs = build()
    try:  # whole or not at all, whatever other processes write there at once
        os.makedirs(where, exist_ok=True)
        with atomic_write(path, encoding='utf-8') as f:
            json.dump(docs, f)
    except OSError:
        pass
    return docs


def _statements(tree: ast.AST) -> Iterator[ast.AST]:
    """The nodes of `ast.walk(tree)` (breadth first, in its order) that are statements or
    hold statements, the only nodes a module, class or function definition can be or be
    under; the expressions, most of a tree, are not visited (a cold start parses the
    standard library: ~1 s less)."""
    todo = collections.deque([tree])
    while todo:
        node = todo.popleft()
        todo.extend(
            child
            for child in ast.iter_child_nodes(node)
            if isinstance(child, ast.stmt | ast.excepthandler | ast.match_case)
        )
        yield node


def stdlib_docstrings(drop: Callable[[str], bool] | None = None) -> list[str]:
    """Docstrings of the standard library's pure-Python modules, one document per module
    (module, class and function docstrings in source order), parsed without importing;
    paragraphs for which `drop` is true left out."""
    root = sysconfig.get_paths()['stdlib']
    paths = []
    for path in sorted(glob.glob(os.path.join(root, '**', '*.py'), recursive=True)):
        rel = os.path.relpath(path, root)
        if rel.startswith(('test', 'site-packages', 'idlelib', 'lib2to3', 'tkinter')):
            continue
        if '/test' not in rel and '/tests/' not in rel:
            paths.append(path)
    docs, said = [], time.monotonic()
    for i, path in enumerate(paths):
        if time.monotonic() - said >= PROGRESS_SECS:  # a few seconds: say how far it is
            logging.info('data: %d of %d standard-library files parsed', i, len(paths))
            said = time.monotonic()
        try:
            with open(path, encoding='utf-8') as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        parts = []
        for node in _statements(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    parts.append(doc)
        if parts:
            docs.extend(_paragraph_documents('\n\n'.join(parts), drop=drop))
    return docs


def embedded_corpus(name: str, decontaminate: bool = True) -> list[str]:
    """The embedded corpus `name` (EMBEDDED). Every paragraph of the embedded text
    classification task is left out, and any paragraph that holds one
    (`holds_task_paragraph`), so a model pretrained here has read none of the text it is
    later validated or tested on; `decontaminate=False` gives the corpus as shipped (to
    measure what the filter removes)."""
    drop = holds_task_paragraph if decontaminate else None
    if name == 'pydoc':
        return pydoc_topics(drop)
    if name == 'pydoc_stdlib':
        stdlib = _cached(f'stdlib_docstrings_{decontaminate}', lambda: stdlib_docstrings(drop))
        return pydoc_topics(drop) + stdlib
    raise DataError(f'unknown embedded corpus {name!r}; expected one of {EMBEDDED}')


def _not_utf8(path: str, data: bytes, offset: int, why: str) -> DataError:
    return corpus.not_utf8(path, data.count(b'\n', 0, offset) + 1, data[:4096], why)


def read_text(path: str) -> str:
    """The text of a UTF-8 file, as every local reader takes it: decompressed when its name
    ends in .gz or .zst (`formats.read_bytes`); a leading UTF-8 byte-order mark is dropped;
    bytes that are not UTF-8, or NUL bytes (UTF-16 text, a binary file), are a DataError
    naming the file, the line and the fix."""
    data = formats.read_bytes(path)
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        text = data.decode('utf-8')
    except UnicodeDecodeError as e:
        raise _not_utf8(
            path, data, e.start, f'byte {data[e.start]:#04x} at offset {e.start}'
        ) from None
    nul = data.find(b'\x00')
    if nul >= 0:
        raise _not_utf8(path, data, nul, f'a NUL byte at offset {nul}')
    return text


def read_lines(path: str) -> list[str]:
    """The lines of a UTF-8 text file (`read_text`), split at \\n only (\\r\\n too), so that
    line i here is line i + 1 of an editor and of every error message."""
    lines = read_text(path).split('\n')
    if lines and lines[-1] == '':
        lines.pop()
    return [line[:-1] if line.endswith('\r') else line for line in lines]


def _read_txt(path: str) -> list[str]:
    """One document per block of text between blank (or whitespace-only) lines."""
    blocks = re.split(r'\n\s*\n', read_text(path))
    return [b.strip() for b in blocks if b.strip()]


_JSON_TYPES = {
    str: 'a string',
    bool: 'a boolean',
    int: 'a number',
    float: 'a number',
    list: 'a list',
    dict: 'an object',
    type(None): 'null',
}


def json_kind(value) -> str:
    """How JSON names the type of a decoded value ('a string', 'null', 'a number', ...)."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


def place(n: int | str) -> str:
    """Where a record is, for messages: 'line N' of a .jsonl file, or the place a table
    record gives ('row N')."""
    return n if isinstance(n, str) else f'line {n}'


def shown(value) -> str:
    """A value as an error message shows it: its JSON text (cut), else its repr (the bytes
    or dates of a table column)."""
    try:
        return json.dumps(value)[:80]
    except (TypeError, ValueError):
        return repr(value)[:80]


def jsonl_field(path: str, n: int | str, record: dict, field: str, arg: str, expected=(str,)):
    """`record[field]` of line `n` of a .jsonl file (or of the record at `n`, a place such
    as 'row 3' of a table: `records`), checked to be of a type in `expected` (text by
    default: a null or a number is not turned into the documents 'None' or '12345'); a
    DataError names the file, the line, what was found and the fix."""
    where = place(n)
    if field not in record:
        raise DataError(
            f'{path} {where} has no field {field!r} (fields: {sorted(record)}); '
            f'set --config.data.{arg}'
        )
    value = record[field]
    # bool is an int in Python, not a number in JSON's sense here.
    if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
        wanted = ' or '.join(dict.fromkeys(_JSON_TYPES[t] for t in expected))
        raise DataError(
            f'{path} {where}: field {field!r} is {json_kind(value)} ({shown(value)}), '
            f'expected {wanted}; fix the line (or drop it), or set --config.data.{arg} to the '
            'field that holds it'
        )
    return value


def jsonl_records(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every non-blank line of a .jsonl file; a line that is not
    a JSON object is a DataError naming it. Read as `read_text` reads (UTF-8, a byte-order
    mark dropped)."""
    for n, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f'{path} line {n} is not JSON ({e})') from e
        yield n, _json_object(path, n, record)


def records(path: str, fields: dict[str, str]) -> Iterator[tuple[int | str, dict]]:
    """(place, record) of every record of a `.jsonl` file (line number, object; also .gz /
    .zst) or a table (`formats.table_records`: 'row N', the `fields` columns); `fields`
    maps the fields wanted to the config key naming each, for the errors. Read with
    `jsonl_field` either way."""
    if formats.kind(path) in formats.TABLES:
        return formats.table_records(path, fields)
    return jsonl_records(path)


def _read_records(path: str, field: str) -> list[str]:
    fields = {field: 'text_field'}
    return [jsonl_field(path, n, r, field, 'text_field') for n, r in records(path, fields)]


def _read_delimited(path: str, field: str, delimiter: str) -> list[str]:
    reader = csv.DictReader(io.StringIO(read_text(path), newline=''), delimiter=delimiter)
    try:
        if reader.fieldnames is None or field not in reader.fieldnames:
            raise DataError(
                f'{path} has no column {field!r} in its header {reader.fieldnames}; '
                'set --config.data.text_field to one of them'
            )
        return [row[field] for row in reader if row[field]]
    except csv.Error as e:
        raise DataError(
            f'{path} line {reader.line_num} is not valid {delimiter!r}-separated text ({e})'
        ) from e


def _json_object(path: str, n: int, record) -> dict:
    if not isinstance(record, dict):
        raise DataError(
            f'{path} line {n}: expected a JSON object per line, found {json_kind(record)}'
        )
    return record


def read_text_files(pattern: str, text_field: str = 'text') -> Sequence[str]:
    """All documents of the local files matching `pattern` (a glob, comma-separated ok), in
    file-name order: a `.txt` block, a `.jsonl` object or a table row is a document. Plain
    `.txt` and `.jsonl` files are indexed, not held in memory (`data.corpus`); the others
    are read whole."""
    parts = []
    for path in formats.match_files(pattern):
        ext, plain = formats.kind(path), not formats.compression(path)
        if ext == '.txt':
            parts.append(corpus.index_txt(path) if plain else _read_txt(path))
        elif ext == '.jsonl' and plain:

            def check(n, record, path=path):
                jsonl_field(path, n, _json_object(path, n, record), text_field, 'text_field')

            parts.append(corpus.index_jsonl(path, text_field, check))
        elif ext == '.jsonl' or ext in formats.TABLES:
            parts.append(_read_records(path, text_field))
        elif ext in ('.tsv', '.csv'):
            parts.append(_read_delimited(path, text_field, '\t' if ext == '.tsv' else ','))
        else:
            raise DataError(
                f'{path}: unsupported extension {ext!r}; text files must be .txt, .jsonl, '
                '.tsv or .csv (each also .gz or .zst), .parquet, .arrow or a datasets '
                'save_to_disk directory'
            )
    return corpus.Concat(parts)


class TfdsText(Sequence):
    """A TFDS split as a random-access sequence of strings (no TensorFlow needed)."""

    def __init__(self, name: str, split: str, field: str, data_dir: str | None = None):
        self._source = tfds_source.open_split(name, split, data_dir)
        self._field = field
        first = self._source[0] if len(self._source) else {}
        tfds_source.require_feature(name, first, field, 'text_field')

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i):
        # array_record raises ValueError out of range, which breaks `for doc in docs` and
        # `list(docs)` (Sequence iteration stops at IndexError), and rejects negative i.
        n = len(self._source)
        if not -n <= i < n:
            raise IndexError(f'document {i} out of range for {n} documents')
        value = self._source[i % n][self._field]
        return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def heldout_indices(n: int, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Splits document indices into (train, eval), fixed for a given `n` whatever the seed,
    so every run of a study is evaluated on the same held-out documents."""
    is_eval = np.random.default_rng(20240101).random(n, dtype=np.float32) < eval_fraction
    return np.flatnonzero(~is_eval), np.flatnonzero(is_eval)


class Subset(Sequence):
    def __init__(self, docs: Sequence, indices: np.ndarray):
        self._docs, self._indices = docs, indices

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i):
        return self._docs[int(self._indices[i])]


def load_corpus(data_config) -> tuple[Sequence[str], Sequence[str]]:
    """(train documents, eval documents) as `config.data` describes."""
    c = data_config
    if c.files:
        started = time.monotonic()
        train = read_text_files(c.files, c.text_field)
        where = c.files
        logging.info(
            'data: read %d documents of %s in %.1fs',
            len(train),
            c.files,
            time.monotonic() - started,
        )
    elif c.name in EMBEDDED:
        logging.info("data: reading the embedded corpus %s from this Python's own files", c.name)
        train = embedded_corpus(c.name)
        where = f'embedded corpus {c.name}'
    else:
        train = TfdsText(c.name, c.train_split, c.text_field, c.data_dir)
        where = f'TFDS {c.name}'
        if c.eval_split:
            return train, TfdsText(c.name, c.eval_split, c.text_field, c.data_dir)
    if len(train) == 0:
        raise DataError(f'{where} holds no documents; point --config.data.files at real text')
    if c.eval_files:
        return train, read_text_files(c.eval_files, c.text_field)
    train_idx, eval_idx = heldout_indices(len(train), c.eval_fraction)
    if len(eval_idx) == 0 or len(train_idx) == 0:
        raise DataError(
            f'{where} has {len(train)} documents: too few to hold out eval_fraction='
            f'{c.eval_fraction} of them; give --config.data.eval_files or more data'
        )
    return Subset(train, train_idx), Subset(train, eval_idx)
