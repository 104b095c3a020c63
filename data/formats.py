"""Local data files by name: the one place that knows which formats a reader can open.

- Text, checked to be UTF-8 and read whole by `data.text.read_text` (a plain `.txt` or
  `.jsonl` pretraining corpus is indexed instead: `data.corpus`): `.txt`, `.jsonl`,
  `.tsv`, `.csv`, CoNLL, each also compressed, `NAME.gz` (gzip) or `NAME.zst` (Zstandard,
  the `zstandard` package): `read_bytes` undoes the compression the name says.
- Tables, streamed one record batch at a time through pyarrow (`table_records`):
  `.parquet`, `.arrow` (an Arrow IPC stream or file), and a directory written by Hugging
  Face `datasets`' `Dataset.save_to_disk` (`data-*.arrow` Arrow streams + `state.json`),
  read without the `datasets` package. A row is a dict of its columns, as a `.jsonl` line
  is a dict of its fields, so every reader takes both with the same `data.*_field` keys.
"""

import glob
import gzip
import json
import os
import zlib
from collections.abc import Iterator

from core.errors import DataError

COMPRESSIONS = ('.gz', '.zst')
TABLES = ('.parquet', '.arrow', 'datasets')
ZSTANDARD_PIN = 'zstandard==0.25.0'  # as requirements.txt
PYARROW_PIN = 'pyarrow==26.0.1'
# One batch of a table in memory at a time.
_BATCH_ROWS = 1024


def is_dataset_dir(path: str) -> bool:
    """Whether `path` is a directory written by `datasets`' `save_to_disk` (a Dataset, or a
    DatasetDict of them)."""
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, name)) for name in ('state.json', 'dataset_dict.json')
    )


def match_files(pattern: str) -> list[str]:
    """Sorted paths matching `pattern` (comma-separated globs): files, and `save_to_disk`
    directories; DataError when none match."""
    matched = sorted(
        {
            p
            for part in pattern.split(',')
            if part.strip()
            for p in glob.glob(part.strip(), recursive=True)
        }
    )
    paths = [p for p in matched if os.path.isfile(p) or is_dataset_dir(p)]
    folders = [p for p in matched if os.path.isdir(p)]
    if not paths and folders:
        raise DataError(
            f'{folders[0]} is a directory, not a data file (nor a `datasets` save_to_disk '
            f'directory); give the files in it, e.g. {os.path.join(folders[0], "*.txt")!r}'
        )
    if not paths:
        raise DataError(
            f'no files match {pattern!r}; check the path in --config.data.files (or '
            '--config.data.eval_files, --config.data.test_files, --config.data.unlabelled_files)'
        )
    return paths


def compression(path: str) -> str:
    """'.gz', '.zst' or '' as the file name says."""
    ext = os.path.splitext(path)[1].lower()
    return ext if ext in COMPRESSIONS else ''


def kind(path: str) -> str:
    """The format of `path` by its name: its suffix with any compression suffix taken off
    ('.jsonl' for `a.jsonl.gz`), lower case; 'datasets' for a `save_to_disk` directory."""
    if os.path.isdir(path):
        return 'datasets'
    stem = path[: -len(compression(path))] if compression(path) else path
    ext = os.path.splitext(stem)[1].lower()
    if compression(path) and ext in TABLES:
        raise DataError(
            f'{path}: a compressed {ext} file is not read; {ext} files compress their own '
            f'columns, so give the {ext} file itself'
        )
    return ext


def _damaged(path: str, what: str, error: Exception, check: str) -> DataError:
    why = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return DataError(f'{path} is not a readable {what} file ({why}); {check}, or write it again')


def _zstd_decompress(path: str, data: bytes) -> bytes:
    try:
        import zstandard
    except ImportError:
        raise DataError(
            f'{path} is Zstandard-compressed and the zstandard package is not installed: '
            f'pip install {ZSTANDARD_PIN} (or decompress it: zstd -d {path})'
        ) from None
    parts = []
    try:
        while data:  # a .zst file may hold several frames (zstd, pzstd, cat a.zst b.zst)
            reader = zstandard.ZstdDecompressor().decompressobj()
            parts.append(reader.decompress(data))
            if not reader.eof:
                raise zstandard.ZstdError('the file ends inside a frame (truncated?)')
            data = reader.unused_data
    except zstandard.ZstdError as e:
        raise _damaged(path, 'Zstandard', e, f'check it with zstd -t {path}') from None
    return b''.join(parts)


def read_bytes(path: str) -> bytes:
    """The content of a text file, decompressed when its name ends in .gz or .zst; a
    damaged or truncated compressed file is a DataError naming it."""
    if kind(path) in TABLES:
        raise DataError(f'{path} is a table ({kind(path)}), not a text file')
    with open(path, 'rb') as f:
        data = f.read()
    if compression(path) == '.gz':
        try:
            return gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise _damaged(path, 'gzip', e, f'check it with gzip -t {path}') from None
    if compression(path) == '.zst':
        return _zstd_decompress(path, data)
    return data


def pyarrow_module(path: str):
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise DataError(
            f'reading {path} needs the pyarrow package: pip install {PYARROW_PIN}'
        ) from None
    return pyarrow


def _dataset_files(path: str) -> list[str]:
    """The Arrow stream files of a `save_to_disk` Dataset directory, in row order."""
    if os.path.exists(os.path.join(path, 'dataset_dict.json')):
        splits = sorted(e.name for e in os.scandir(path) if is_dataset_dir(e.path))
        example = os.path.join(path, splits[0] if splits else 'train')
        raise DataError(
            f'{path} holds a DatasetDict (splits {splits}); point --config.data.files (and '
            f'eval_files, test_files) at one split, e.g. {example}'
        )
    try:
        with open(os.path.join(path, 'state.json'), encoding='utf-8') as f:
            names = [d['filename'] for d in json.load(f)['_data_files']]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(
            f'{path}/state.json is not the state file of a datasets save_to_disk directory '
            f'({type(e).__name__}: {e}); write the directory again with Dataset.save_to_disk'
        ) from None
    files = [os.path.join(path, n) for n in names]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing or not files:
        raise DataError(
            f'{path}: state.json lists data files {names}, missing {missing or "all"}; copy '
            'the whole directory or write it again with Dataset.save_to_disk'
        )
    return files


def _open_table(pa, file: str, columns: list[str]) -> tuple[list[str], Iterator]:
    """(column names, record batches of `columns`) of one Parquet or Arrow IPC file."""
    if kind(file) == '.parquet':
        parquet = pa.parquet.ParquetFile(file)
        return parquet.schema_arrow.names, parquet.iter_batches(_BATCH_ROWS, columns=columns)
    source = pa.memory_map(file)
    try:  # datasets writes streams; pyarrow.feather and others write the file format
        reader = pa.ipc.open_stream(source)
        batches = iter(reader)
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(source)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    return reader.schema.names, (b.select(columns) for b in batches)


def table_records(path: str, fields: dict[str, str]) -> Iterator[tuple[str, dict]]:
    """('row N', {column: value}) of every row of a `.parquet`, `.arrow` or `save_to_disk`
    directory, in order, one record batch in memory at a time. `fields` maps the columns
    wanted to the config key that names each (`{'text': 'text_field'}`): only those are
    read, and a missing one is a DataError naming the columns there are and the key."""
    pa = pyarrow_module(path)
    what = {'.parquet': 'Parquet', '.arrow': 'Arrow'}.get(kind(path), 'datasets Arrow')
    columns = list(dict.fromkeys(fields))
    n, file = 0, path
    try:
        for file in _dataset_files(path) if kind(path) == 'datasets' else [path]:
            names, batches = _open_table(pa, file, columns)
            for column in columns:
                if column not in names:
                    raise DataError(
                        f'{file} has no column {column!r} (columns: {names}); set '
                        f'--config.data.{fields[column]} to one of them'
                    )
            for batch in batches:
                for record in batch.to_pylist():
                    n += 1
                    yield f'row {n}', record
    except (pa.ArrowException, OSError) as e:
        raise _damaged(file, what, e, 'check that it was copied whole') from None


def read_columns(path: str, columns: list[str]):
    """(a pyarrow Table of those `columns` the table at `path` has, all its column names):
    whole columns, for sources that index rows at random (images' encoded bytes)."""
    pa = pyarrow_module(path)
    tables, file, names = [], path, []
    try:
        for file in _dataset_files(path) if kind(path) == 'datasets' else [path]:
            names, _ = _open_table(pa, file, [])
            wanted = [c for c in dict.fromkeys(columns) if c in names]
            tables.append(pa.Table.from_batches(list(_open_table(pa, file, wanted)[1])))
        return pa.concat_tables(tables), names
    except (pa.ArrowException, OSError) as e:
        raise _damaged(file, 'table', e, 'check that it was copied whole') from None
