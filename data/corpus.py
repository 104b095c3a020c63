"""Local text corpora of any size: indexed in one streaming pass, read a document at a time.

A plain (uncompressed) `.txt` or `.jsonl` file is read once, a line at a time, when a run
starts: every line is checked (UTF-8, no NUL byte; a `.jsonl` line is an object whose
`text_field` holds text) and each document's byte range is kept, 16 bytes a document, not
its text. `IndexedFile[i]` reads document i back with one `os.pread` and decodes it, so
memory stays flat in the size of the corpus and a bad line is still reported, with its
line number, before anything is compiled. The documents are exactly those the whole-file
readers of `data.text` return (a `.txt` document is a block of lines between blank or
whitespace-only lines, stripped). Compressed files, `.tsv`/`.csv` and tables are read into
memory as before (`data.text.read_text_files`); convert a large one to `.txt` or
`.jsonl` to index it.

`Concat` joins the files of a glob into one random-access sequence, which is what Grain's
`MapDataset.source` takes, so the order of documents, the shuffle and the checkpointed
iterator state are the same as with the documents held in memory. `vocab_sample` draws the
bounded, seeded sample of documents a WordPiece vocabulary is trained on.
"""

import codecs
import json
import os
from array import array
from collections.abc import Sequence

import numpy as np

from core.errors import DataError

# The vocabulary's sample is drawn with this seed, not config.seed: runs that differ only in
# seed (both arms of a comparison, the seeds of a study) train the same vocabulary.
VOCAB_SAMPLE_SEED = 20261130


def not_utf8(path: str, line: int, head: bytes, why: str) -> DataError:
    """The error for a file that is not UTF-8 text on `line` (`why`: what was found where):
    names the file, the line and the fix (iconv), guessing UTF-16 from `head`, the file's
    first bytes."""
    if head.startswith((b'\xff\xfe', b'\xfe\xff')) or b'\x00' in head[:4096]:
        hint = (
            'it looks like UTF-16 (a UTF-16 byte-order mark or NUL bytes); save it as UTF-8, '
            f'e.g. iconv -f UTF-16 -t UTF-8 {path} > fixed'
        )
    else:
        hint = (
            'save it as UTF-8, e.g. iconv -f LATIN1 -t UTF-8 (or the encoding it was written '
            f'in) {path} > fixed'
        )
    return DataError(f'{path} line {line} is not UTF-8 text ({why}); {hint}')


def _head(path: str) -> bytes:
    with open(path, 'rb') as f:
        return f.read(4096)


def _lines(path: str):
    """(line number, byte offset, line bytes, line text) of every line of `path`, each
    checked to be UTF-8 without NUL bytes; a leading UTF-8 byte-order mark is skipped."""
    with open(path, 'rb') as f:
        offset = 0
        if f.read(len(codecs.BOM_UTF8)) == codecs.BOM_UTF8:
            offset = len(codecs.BOM_UTF8)
        f.seek(offset)
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode('utf-8')  # \n is never inside a multi-byte character
            except UnicodeDecodeError as e:
                at = offset + e.start
                why = f'byte {raw[e.start]:#04x} at offset {at}'
                raise not_utf8(path, n, _head(path), why) from None
            nul = raw.find(b'\x00')
            if nul >= 0:
                raise not_utf8(path, n, _head(path), f'a NUL byte at offset {offset + nul}')
            yield n, offset, raw, line
            offset += len(raw)


class IndexedFile(Sequence):
    """The documents of one plain `.txt` or `.jsonl` file, by byte range (`index_txt`,
    `index_jsonl`); document i is read from disk when asked for. Picklable (paths and
    offsets only), for multiprocess data loading."""

    def __init__(self, path: str, starts, ends, field: str | None = None):
        self.path, self.field = path, field
        self.starts = np.asarray(starts, np.int64)
        self.ends = np.asarray(ends, np.int64)
        self.size = os.path.getsize(path)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i):
        n = len(self.starts)
        if not -n <= i < n:
            raise IndexError(f'document {i} out of range for {n} documents')
        start, end = int(self.starts[i]), int(self.ends[i])
        fd = os.open(self.path, os.O_RDONLY)
        try:
            data = os.pread(fd, end - start, start)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size != self.size or len(data) != end - start:
            raise DataError(
                f'{self.path} changed while the run read it ({self.size} bytes when indexed, '
                f'{size} now); a corpus must not be written to while a run reads it'
            )
        text = data.decode('utf-8')
        if self.field is None:
            return text.strip()
        return json.loads(text)[self.field]


def index_txt(path: str) -> IndexedFile:
    """The documents of a plain `.txt` file: blocks of lines between blank (or
    whitespace-only) lines, as `data.text` splits them."""
    starts, ends = array('q'), array('q')
    start = end = -1
    for _, offset, raw, line in _lines(path):
        if line.isspace():  # (a line holds its \n: never empty)
            if start >= 0:
                starts.append(start), ends.append(end)
                start = -1
        else:
            if start < 0:
                start = offset
            end = offset + len(raw)
    if start >= 0:
        starts.append(start), ends.append(end)
    return IndexedFile(path, starts, ends)


def index_jsonl(path: str, field: str, check) -> IndexedFile:
    """The `field` of every non-blank line of a plain `.jsonl` file; `check(n, record)`
    raises the DataError for a line that is not an object with text in `field`."""
    starts, ends = array('q'), array('q')
    for n, offset, raw, line in _lines(path):
        if line.isspace():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f'{path} line {n} is not JSON ({e})') from e
        check(n, record)
        starts.append(offset), ends.append(offset + len(raw))
    return IndexedFile(path, starts, ends, field)


class Concat(Sequence):
    """Sequences of documents one after the other (the files of a glob, in order): indexed
    files and lists of documents held in memory alike."""

    def __init__(self, parts: list[Sequence]):
        self.parts = [p for p in parts if len(p)]
        self._ends = np.cumsum([len(p) for p in self.parts], dtype=np.int64)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f'document {i} out of range for {n} documents')
        i %= n
        part = int(np.searchsorted(self._ends, i, side='right'))
        return self.parts[part][i - (int(self._ends[part - 1]) if part else 0)]


def vocab_sample(docs: Sequence[str], max_bytes: int) -> list[str]:
    """The documents a vocabulary is trained on: all of them, in order, when they hold at
    most `max_bytes` bytes of UTF-8 (0: no bound); else a seeded random sample (the same
    for every run and seed, `VOCAB_SAMPLE_SEED`) drawn a document at a time until it holds
    `max_bytes`, in corpus order. Only the sampled documents are read."""
    order = np.random.default_rng(VOCAB_SAMPLE_SEED).permutation(len(docs))
    taken, total = {}, 0
    for i in order:
        if max_bytes and total >= max_bytes:
            break
        doc = docs[int(i)]
        taken[int(i)] = doc
        total += len(doc.encode('utf-8'))
    return [taken[i] for i in sorted(taken)]
