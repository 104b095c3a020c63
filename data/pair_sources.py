"""Image-text sources: random-access sequences of `{'image': uint8 [S, S, C], 'caption':
str}`, usable directly as Grain sources:
  - images in memory with a caption each (`ArrayPairs`; the embedded `digits_captions`
    are, see data/digits.py);
  - a local `.jsonl` / `.tsv` of (image path, caption), paths relative to the file;
  - a TFDS dataset with an image and a text feature.
"""

import glob
import os
from collections.abc import Sequence

import numpy as np

from core.errors import DataError
from data import tfds_source
from data.decode import check_image_files, read_image_file
from data.image_sources import ImageSource, TfdsSource, image_array
from data.text import jsonl_field, jsonl_records, read_lines


class TfdsPairs(TfdsSource):
    """A TFDS split as image-text pairs (`image_field`, `text_field`)."""

    def __init__(
        self,
        name: str,
        split: str,
        *,
        data_dir: str | None = None,
        image_field: str = 'image',
        text_field: str = 'caption',
        image_size: int | None = None,
        channels: int | None = None,
        resize: bool = False,
    ):
        super().__init__(name, split, data_dir, image_field, image_size, channels, resize)
        tfds_source.require_feature(name, self._first, text_field, 'text_field')
        self.text_field = text_field

    def _load(self, i: int) -> tuple[np.ndarray, dict]:
        record = self._source[i]
        text = record[self.text_field]
        caption = text.decode('utf-8') if isinstance(text, bytes) else str(text)
        return self._image(record, i), {'caption': caption}


class ArrayPairs(ImageSource):
    """Images held in memory [N, H, W(, C)] with one caption each."""

    def __init__(
        self,
        images: np.ndarray,
        captions: Sequence[str],
        *,
        image_size: int | None = None,
        channels: int | None = None,
        resize: bool = False,
        where: str = 'the images',
    ):
        super().__init__(image_size, channels, resize)
        self.where = where
        self._images = image_array(images, image_size, resize, where)
        if len(captions) != len(self._images):
            raise DataError(
                f'{where}: expected one caption per image ({len(self._images)}), found '
                f'{len(captions)}'
            )
        self._captions = list(captions)

    def __len__(self) -> int:
        return len(self._images)

    def _load(self, i: int) -> tuple[np.ndarray, dict]:
        return self._images[i], {'caption': self._captions[i]}

    def _describe(self, i: int) -> str:
        return f'item {i} of {self.where}'


# --- image-text files ---------------------------------------------------------------------


def _read_caption_jsonl(path: str, image_field: str, text_field: str) -> list[tuple]:
    """(image path as written, caption, line number) of every non-blank line."""
    rows = []
    for n, record in jsonl_records(path):
        image = jsonl_field(path, n, record, image_field, 'image_field')
        rows.append((image, jsonl_field(path, n, record, text_field, 'text_field'), n))
    return rows


def _read_caption_tsv(path: str, image_field: str, text_field: str) -> list[tuple]:
    """Lines `image path TAB caption`; a first line naming the columns (e.g.
    `image<TAB>caption`, with `image_field` and `text_field` among them) is a header, and
    its columns are then looked up by name."""
    rows = []
    lines = read_lines(path)
    image_col, text_col, start = 0, 1, 0
    if lines:
        header = lines[0].split('\t')
        if image_field in header and text_field in header:
            image_col, text_col, start = header.index(image_field), header.index(text_field), 1
    for n, line in enumerate(lines[start:], start + 1):
        if not line.strip():
            continue
        parts = line.split('\t') if start else line.split('\t', 1)
        if len(parts) <= max(image_col, text_col):
            raise DataError(
                f'{path} line {n}: expected an image path, a tab and a caption, found '
                f'{line[:200]!r}'
            )
        rows.append((parts[image_col].strip(), parts[text_col].strip(), n))
    return rows


class CaptionFilePairs(ImageSource):
    """Image-text pairs listed in local `.jsonl` / `.tsv` files (a path, glob, or several
    separated by commas); images are decoded when read. Relative image paths are resolved
    against the directory of the caption file that names them; all must exist."""

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
        files = sorted(p for part in pattern.split(',') for p in glob.glob(part, recursive=True))
        if not files:
            raise DataError(
                f'no files match {pattern!r}; check the path in --config.data.files (a .jsonl '
                'or .tsv of image paths and captions)'
            )
        self._paths, self._captions, self._origin = [], [], []
        missing = []
        for file in files:
            ext = os.path.splitext(file)[1].lower()
            if ext == '.jsonl':
                rows = _read_caption_jsonl(file, image_field, text_field)
            elif ext == '.tsv':
                rows = _read_caption_tsv(file, image_field, text_field)
            else:
                raise DataError(
                    f'{file}: unsupported extension {ext!r}; image-text files must be .jsonl '
                    '(one object per line) or .tsv (image path TAB caption)'
                )
            base = os.path.dirname(os.path.abspath(file))
            for image, caption, n in rows:
                path = os.path.join(base, os.path.expanduser(image))
                if not os.path.isfile(path):
                    missing.append((file, n, path))
                self._paths.append(path)
                self._captions.append(caption)
                self._origin.append((file, n))
        if missing:
            file, n, path = missing[0]
            more = f' (and {len(missing) - 1} more missing)' if len(missing) > 1 else ''
            raise DataError(
                f'{file} line {n} names an image that does not exist: {path}{more}; relative '
                'paths are read from the directory of the caption file'
            )
        check_image_files(self._paths, f'the images named in {pattern}', self._describe)

    def __len__(self) -> int:
        return len(self._paths)

    def _load(self, i: int) -> tuple[np.ndarray, dict]:
        return read_image_file(self._paths[i], self.channels), {'caption': self._captions[i]}

    def _describe(self, i: int) -> str:
        file, n = self._origin[i]
        return f'{self._paths[i]} ({file} line {n})'
