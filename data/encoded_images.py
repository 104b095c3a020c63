"""Images stored encoded (PNG, JPEG, ... bytes), decoded when read:
  - WebDataset `.tar` shards: a sample is the members sharing a key (`dir/key.jpg`,
    `dir/key.cls`, ...: the name up to the first dot of its base name); its image is the
    `.jpg` / `.jpeg` / `.png` / `.bmp` / `.gif` member, its label the integer or class name
    in `.cls` (or `json[label_field]`), its caption `.txt` (or `json[text_field]`). Only the
    member offsets are kept; each image is read from its shard when needed (stdlib tarfile).
  - a table (`.parquet`, `.arrow`, a `datasets` directory, see data/formats.py) with the
    encoded bytes in column `image_field` (binary, or a `datasets` Image struct
    `{bytes, path}`) and a `label_field` or `text_field` column. The encoded bytes are
    held in memory (as Arrow buffers), the pixels never.
Items are `{'image', 'label'}` (`EncodedImages`) or `{'image', 'caption'}`
(`EncodedPairs`), as data/image_sources.py and data/pair_sources.py give them.
"""

import json
import os
import tarfile
from collections.abc import Sequence

import numpy as np

from core.errors import DataError
from data import formats
from data.decode import DECODE_THREADS, IMAGE_EXTENSIONS, decode_image_bytes
from data.image_sources import ImageSource

IMAGE_EXTS = tuple(e[1:] for e in IMAGE_EXTENSIONS)
WEBDATASET_LAYOUT = 'a .tar of KEY.jpg (or .png) with KEY.cls (label) or KEY.txt (caption)'


def is_encoded(pattern: str) -> bool:
    """Whether `pattern` names WebDataset shards or a table (not a folder, .npz, .jsonl)."""
    first = pattern.split(',')[0].strip()
    return first.lower().endswith('.tar') or (
        (os.path.isdir(first) and formats.is_dataset_dir(first))
        or formats.kind(first) in ('.parquet', '.arrow')
    )


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset's (key, extension) of a member name: `a/b.c.jpg` -> ('a/b', 'c.jpg')."""
    directory, base = os.path.split(name)
    stem, _, ext = base.partition('.')
    return os.path.join(directory, stem), ext.lower()


def _tar_samples(shard: str) -> list[dict]:
    """{'key', 'image': (offset, size), other extension: its text} of each sample of one
    shard, in member order; small members (labels, captions) are read now."""
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(shard, 'r:') as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_key(member.name)
                if not ext or os.path.basename(key).startswith('.'):
                    continue
                sample = samples.setdefault(key, {'key': key})
                if ext in IMAGE_EXTS:
                    sample.setdefault('image', (member.offset_data, member.size))
                elif ext in ('cls', 'txt', 'json'):
                    data = tar.extractfile(member).read()
                    try:
                        sample[ext] = data.decode('utf-8')
                    except UnicodeDecodeError:
                        raise DataError(
                            f'{shard}: {member.name} is not UTF-8 text; write it as UTF-8'
                        ) from None
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(
            f'{shard} is not a readable tar file ({e}); an uncompressed .tar is read (gunzip '
            'a .tar.gz first); check it with tar -tf, or write it again'
        ) from None
    return list(samples.values())


def _json_field(shard: str, sample: dict, field: str, arg: str):
    try:
        record = json.loads(sample['json'])
    except json.JSONDecodeError as e:
        raise DataError(f'{shard}: {sample["key"]}.json is not JSON ({e})') from None
    if not isinstance(record, dict) or field not in record:
        raise DataError(
            f'{shard}: {sample["key"]}.json has no field {field!r}; set --config.data.{arg}'
        )
    return record[field]


class _Encoded(ImageSource):
    """Items decoded from encoded bytes: `_blob(i)` gives them, `_describe(i)` names them."""

    read_threads = DECODE_THREADS

    def __init__(self, image_size, channels, resize):
        super().__init__(image_size, channels, resize)
        self._shards: list[str] = []
        self._images: list[tuple[int, int, int]] = []  # (shard, offset, size) of a tar
        self._column = None  # or a table's image bytes
        self._keys: list[str] = []  # the sample key of each tar item
        self.where = ''

    def _open_tar(self, pattern: str, field) -> list:
        """Reads every shard's samples; `field(shard, sample)` gives the label / caption."""
        self._shards = formats.match_files(pattern)
        values = []
        for s, shard in enumerate(self._shards):
            if not shard.lower().endswith('.tar'):
                raise DataError(f'{shard}: expected WebDataset .tar shards ({WEBDATASET_LAYOUT})')
            for sample in _tar_samples(shard):
                if 'image' not in sample:
                    raise DataError(
                        f'{shard}: sample {sample["key"]!r} has no image member (extensions '
                        f'{list(IMAGE_EXTS)}); expected {WEBDATASET_LAYOUT}'
                    )
                self._images.append((s, *sample['image']))
                self._keys.append(sample['key'])
                values.append(field(shard, sample))
        self.where = pattern
        return values

    def _open_table(self, path: str, image_field: str, other: str, arg: str) -> list:
        """Reads a table's image bytes and its `other` column (None when it has none)."""
        paths = formats.match_files(path)
        if len(paths) > 1:
            raise DataError(
                f'{path} matches {len(paths)} tables; images are read from one .parquet, '
                '.arrow or datasets directory (or use WebDataset .tar shards)'
            )
        path = paths[0]
        table, names = formats.read_columns(path, [image_field, other])
        if image_field not in names:
            raise DataError(
                f'{path} has no column {image_field!r} (columns: {names}); set '
                '--config.data.image_field to the column of encoded images'
            )
        pa = formats.pyarrow_module(path)
        column = table.column(image_field)
        if pa.types.is_struct(column.type):  # datasets' Image feature: {bytes, path}
            column = pa.chunked_array(
                [c.field('bytes') for c in column.chunks], column.type.field('bytes').type
            )
        if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
            raise DataError(
                f'{path}: column {image_field!r} is {column.type}, expected encoded image bytes '
                '(binary, or a datasets Image {bytes, path}); set --config.data.image_field'
            )
        self._column = column
        self.where = path
        if other in names:
            return table.column(other).to_pylist()
        return [None] * len(column)

    def __len__(self) -> int:
        return len(self._column) if self._column is not None else len(self._images)

    def _blob(self, i: int) -> bytes:
        if self._column is not None:
            data = self._column[i].as_py()
            if data is None:
                raise DataError(f'{self._describe(i)}: the image is null; fix or drop the row')
            return data
        s, offset, size = self._images[i]
        with open(self._shards[s], 'rb') as f:
            f.seek(offset)
            return f.read(size)

    def _image(self, i: int) -> np.ndarray:
        return decode_image_bytes(self._blob(i), self.channels, self._describe(i))

    def _describe(self, i: int) -> str:
        if self._column is not None:
            return f'{self.where} row {i + 1}'
        return f'{self._shards[self._images[i][0]]}: {self._keys[i]}'


def _labels(values: list, classes: Sequence[str] | None, where: str):
    """(int32 labels, class names or None): integers as they are (class names None unless
    given), names mapped by `classes` (else their sorted set); None -> -1 (no label)."""
    if all(v is None for v in values):
        return np.full(len(values), -1, np.int32), None
    texts = [str(v).strip() for v in values]
    if all(t.lstrip('-').isdigit() for t in texts):
        return np.asarray([int(t) for t in texts], np.int32), None
    names = list(classes) if classes else sorted(set(texts))
    index = {n: k for k, n in enumerate(names)}
    unknown = sorted(set(texts) - set(index))
    if unknown:
        raise DataError(
            f'{where} has labels {unknown[:5]} that the training data does not have (its '
            f'classes: {names[:20]}); give both splits the same classes'
        )
    return np.asarray([index[t] for t in texts], np.int32), names


class EncodedImages(_Encoded):
    """Labelled images from WebDataset shards or a table (see the module docstring)."""

    def __init__(
        self,
        pattern: str,
        *,
        image_field: str = 'image',
        label_field: str = 'label',
        image_size: int | None = None,
        channels: int | None = None,
        resize: bool = False,
        classes: Sequence[str] | None = None,
    ):
        super().__init__(image_size, channels, resize)

        def label(shard, sample):
            if 'cls' in sample:
                return sample['cls']
            if 'json' in sample:
                return _json_field(shard, sample, label_field, 'label_field')
            return None

        if pattern.split(',')[0].strip().lower().endswith('.tar'):
            values = self._open_tar(pattern, label)
        else:
            values = self._open_table(pattern, image_field, label_field, 'label_field')
        self._labels, self.classes = _labels(values, classes, pattern)

    @property
    def labels(self) -> np.ndarray:
        """int32 [N], -1 where unknown."""
        return self._labels

    def _load(self, i: int) -> tuple[np.ndarray, dict]:
        return self._image(i), {'label': self._labels[i]}


class EncodedPairs(_Encoded):
    """Image-caption pairs from WebDataset shards (`.txt`, or `json[text_field]`) or a table
    (`text_field` column)."""

    def __init__(
        self,
        pattern: str,
        *,
        image_field: str = 'image',
        text_field: str = 'caption',
        image_size: int | None = None,
        channels: int | None = None,
        resize: bool = False,
    ):
        super().__init__(image_size, channels, resize)

        def caption(shard, sample):
            if 'txt' in sample:
                return sample['txt'].strip()
            if 'json' in sample:
                return _json_field(shard, sample, text_field, 'text_field')
            raise DataError(
                f'{shard}: sample {sample["key"]!r} has no caption ({sample["key"]}.txt, or '
                f'{sample["key"]}.json with field {text_field!r})'
            )

        if pattern.split(',')[0].strip().lower().endswith('.tar'):
            captions = self._open_tar(pattern, caption)
        else:
            captions = self._open_table(pattern, image_field, text_field, 'text_field')
        for i, c in enumerate(captions):
            if not isinstance(c, str):
                raise DataError(
                    f'{self._describe(i)}: the caption is {type(c).__name__}, expected text; '
                    'set --config.data.text_field'
                )
        self._captions = captions

    def _load(self, i: int) -> tuple[np.ndarray, dict]:
        return self._image(i), {'caption': self._captions[i]}
