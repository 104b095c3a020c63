"""Images and image-text pairs for contrastive pretraining (SimCLR; CLIP / SigLIP).

Image sources are random-access sequences of `{'image': uint8 [S, S, C], 'label': int32}`
(label -1 when unknown), usable directly as Grain sources:
  - embedded `digits` (no download): scikit-learn's 1797 handwritten digits, 8x8x1;
  - a local `.npz` (arrays `images` [N, H, W(, C)] and optional `labels`);
  - a local image folder, `ROOT/<class_name>/*.png|jpg|jpeg|bmp|gif`, decoded lazily;
  - any other name: a TFDS dataset read with `tfds.data_source` (array_record, no
    TensorFlow: TFDS decodes images with Pillow).

Image-text sources hold `{'image': uint8 [S, S, C], 'caption': str}`:
  - embedded `digits_captions`: every digit with a generated English caption;
  - a local `.jsonl` / `.tsv` of (image path, caption), paths relative to the file;
  - a TFDS dataset with an image and a text feature.

Every image is brought to `image_size x image_size` with `channels` channels when it is
read (`conform_image`): resized with Pillow only when `data.resize` is set, so a run never
trains on silently rescaled data. Images stay uint8 on the host; augmentation and the
float conversion happen on the device.
"""

import concurrent.futures
import functools
import glob
import io
import json
import os
import time
import zipfile
from collections.abc import Callable, Sequence

import grain
import numpy as np
from absl import logging
from PIL import Image, UnidentifiedImageError

from core.errors import ConfigError, DataError
from data import tfds_source
from data.pipeline import read_options, shuffle_forever
from data.text import Subset, heldout_indices, jsonl_field, jsonl_records, read_lines
from data.tokenizer import FixedLengthEncoder, WordPiece

EMBEDDED_IMAGES = ('digits',)
EMBEDDED_PAIRS = ('digits_captions',)
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif')
IMAGE_KEYS = ('images', 'x', 'image')  # .npz array names, in order of preference
LABEL_KEYS = ('labels', 'y', 'label')
FOLDER_LAYOUT = 'ROOT/<class_name>/*.png (one folder per class; .png .jpg .jpeg .bmp .gif)'


# --- one image: dtype, channels, size -----------------------------------------------------


def to_uint8(image: np.ndarray, what: str) -> np.ndarray:
    """`image` (any shape) as uint8 0..255: floats must lie in [0, 1], integers in 0..255."""
    a = np.asarray(image)
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * np.uint8(255)
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise DataError(
            f'{what}: expected uint8 or float pixels, found dtype {a.dtype}; store the images '
            'as uint8 0..255 or float 0..1'
        )
    lo, hi = (a.min(), a.max()) if a.size else (0, 0)
    if np.issubdtype(a.dtype, np.floating):
        if not (np.isfinite(lo) and np.isfinite(hi) and lo >= 0 and hi <= 1):
            raise DataError(
                f'{what}: float pixels must lie in [0, 1], found values in [{lo:.4g}, {hi:.4g}]; '
                'divide them by 255 (or store uint8 0..255)'
            )
        return np.round(a * 255).astype(np.uint8)
    if lo < 0 or hi > 255:
        raise DataError(
            f'{what}: integer pixels must lie in 0..255, found values in {lo}..{hi}; '
            'rescale them to 0..255 (or store float 0..1)'
        )
    return a.astype(np.uint8)


def convert_channels(image: np.ndarray, channels: int | None, what: str) -> np.ndarray:
    """uint8 [H, W, C] -> [H, W, channels]: 1 -> 3 repeats the grey level, 3 -> 1 takes the
    luminance (Pillow's 'L', ITU-R 601-2), an alpha channel (2 or 4) is dropped."""
    c = image.shape[-1]
    if c == 2:  # grey + alpha
        image, c = image[:, :, :1], 1
    elif c == 4:  # RGBA
        image, c = image[:, :, :3], 3
    if c not in (1, 3):
        raise DataError(
            f'{what} has {c} channels; expected 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA)'
        )
    if channels is None or c == channels:
        return image
    if channels == 3:
        return np.repeat(image, 3, axis=-1)
    grey = Image.fromarray(np.ascontiguousarray(image), mode='RGB').convert('L')
    return np.asarray(grey)[:, :, None]


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, C] -> [size, size, C], Pillow bilinear (antialiased when shrinking).

    The aspect ratio is not kept: a non-square image is stretched to a square."""
    if image.shape[-1] == 3:
        resized = Image.fromarray(image, mode='RGB').resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(resized)
    planes = [
        np.asarray(Image.fromarray(image[:, :, k]).resize((size, size), Image.Resampling.BILINEAR))
        for k in range(image.shape[-1])
    ]
    return np.stack(planes, axis=-1)


def size_mismatch(what: str, height: int, width: int, image_size: int) -> DataError:
    """The error for an image of the wrong size while `data.resize` is off."""
    return DataError(
        f'{what} is {height}x{width} pixels, expected {image_size}x{image_size} '
        f'(model.image_size={image_size}); pass --config.data.resize=true to resize every image '
        f'to {image_size}x{image_size}, or set --config.model.image_size to the size of the data'
    )


def conform_image(
    image: np.ndarray,
    image_size: int | None,
    channels: int | None,
    resize: bool,
    what: str = 'image',
) -> np.ndarray:
    """Any image ([H, W] or [H, W, C], uint8 or float 0..1) -> uint8 [S, S, channels].

    `image_size` / `channels` None keep the image's own. An image whose size differs is
    resized when `resize`, else a DataError naming `what` (a file path, or an item index)."""
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise DataError(
            f'{what}: expected an image [height, width] or [height, width, channels], found '
            f'shape {a.shape}'
        )
    a = convert_channels(to_uint8(a, what), channels, what)
    height, width = a.shape[:2]
    if image_size and (height, width) != (image_size, image_size):
        if not resize:
            raise size_mismatch(what, height, width, image_size)
        a = resize_image(np.ascontiguousarray(a), image_size)
    return np.ascontiguousarray(a)


def _pil_array(im: Image.Image, channels: int | None) -> np.ndarray:
    """A decoded Pillow image as uint8 [H, W, 1] ('L') or [H, W, 3] ('RGB'); with
    `channels` None, grey images stay grey and everything else becomes RGB."""
    if channels is None:
        channels = 1 if im.mode in ('1', 'L', 'LA', 'I', 'I;16', 'F') else 3
    a = np.asarray(im.convert('L' if channels == 1 else 'RGB'))
    return a[:, :, None] if a.ndim == 2 else a


def read_image_file(path: str, channels: int | None) -> np.ndarray:
    """Decodes an image file with Pillow (first frame of an animation)."""
    try:
        with Image.open(path) as im:
            return _pil_array(im, channels)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(
            f'{path} could not be read as an image ({type(e).__name__}: {e}); remove or '
            'replace the file'
        ) from e


def _image_file_problem(path: str) -> str | None:
    """Why `path` cannot be read as an image, or None. Cheap where the format allows: a PNG
    is verified chunk by chunk (every CRC, no decompression); a JPEG that ends with its
    end-of-image marker is taken on its header (one that does not, a truncated file, is
    decoded in full); other formats (GIF, BMP: rare and small) are decoded."""
    try:
        with Image.open(path) as im:
            if im.format == 'PNG':
                im.verify()
            elif im.format != 'JPEG' or not _ends_with_jpeg_eoi(path):
                im.load()
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, struct.error...)
        return f'{type(e).__name__}: {str(e)[:120]}'
    return None


def _ends_with_jpeg_eoi(path: str) -> bool:
    with open(path, 'rb') as f:
        f.seek(max(0, os.path.getsize(path) - 64))
        return b'\xff\xd9' in f.read()


def check_image_files(paths: Sequence[str], where: str, describe=None) -> None:
    """Reads every image file of a source before a run starts (`_image_file_problem`, in
    DECODE_THREADS threads): a corrupt file is found now, not after compilation, and one
    DataError lists every such file, so one fix covers them all. `describe(i)` names file i
    (default: its path)."""
    if not paths:
        return
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(DECODE_THREADS) as pool:
        problems = list(pool.map(_image_file_problem, paths, chunksize=64))
    bad = [i for i, problem in enumerate(problems) if problem is not None]
    logging.info(
        'checked %d image files of %s in %.1fs', len(paths), where, time.perf_counter() - started
    )
    if bad:
        describe = describe or (lambda i: paths[i])
        listed = '\n'.join(f'  {describe(i)}: {problems[i]}' for i in bad)
        raise DataError(
            f'{len(bad)} of the {len(paths)} image files of {where} cannot be read as images; '
            f'remove or replace them (every file was checked, these are all):\n{listed}'
        )


def decode_image_bytes(data: bytes, channels: int | None, what: str) -> np.ndarray:
    """Decodes encoded image bytes (PNG, JPEG, ...) with Pillow."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return _pil_array(im, channels)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f'{what} could not be decoded as an image ({e})') from e


def _check_shape_args(image_size: int | None, channels: int | None) -> None:
    if channels not in (None, 1, 3):
        raise ConfigError(
            f'image channels must be 1 (grey) or 3 (RGB), found {channels}; set '
            '--config.model.channels'
        )
    if image_size is not None and image_size < 1:
        raise ConfigError(
            f'image_size must be a positive number of pixels, found {image_size}; set '
            '--config.model.image_size'
        )


# --- random-access sources ----------------------------------------------------------------


# Threads that read and decode image files ahead of the batcher: enough to keep a GPU step
# fed from JPEGs on a many-core host, without Grain's default 16 threads x 500 items.
DECODE_THREADS = min(8, os.cpu_count() or 1)


class _Conformed(Sequence):
    """A sequence of dict items whose 'image' is conformed when read.

    Subclasses implement `__len__`, `_load(i) -> (image, other fields)` and `_describe(i)`
    (how an error names item i: its file, or its index)."""

    classes: list[str] | None = None
    # Threads that read items ahead of the batcher (data.pipeline.read_options): 0 for
    # arrays in memory; sources that decode files set more (Pillow decodes outside the GIL).
    read_threads: int = 0

    def __init__(self, image_size: int | None, channels: int | None, resize: bool):
        _check_shape_args(image_size, channels)
        self.image_size, self.channels, self.resize = image_size, channels, bool(resize)

    def _load(self, i: int) -> tuple[np.ndarray, dict]:
        raise NotImplementedError

    def _describe(self, i: int) -> str:
        return f'item {i}'

    def __getitem__(self, i) -> dict:
        # Out of range must be an IndexError (which ends `for item in source`), also for the
        # TFDS readers, which raise ValueError there.
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f'item {i} out of range for {n} items')
        i = int(i) % n
        image, item = self._load(i)
        what = self._describe(i)
        item['image'] = conform_image(image, self.image_size, self.channels, self.resize, what)
        return item


def _image_array(images, image_size: int | None, resize: bool, where: str) -> np.ndarray:
    """[N, H, W] or [N, H, W, C] -> uint8 [N, H, W, C], its size checked once for all."""
    a = np.asarray(images)
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4:
        raise DataError(
            f'{where}: expected images [N, height, width] or [N, height, width, channels], '
            f'found an array of shape {a.shape}'
        )
    a = to_uint8(a, where)
    if image_size and not resize and a.shape[1:3] != (image_size, image_size):
        raise size_mismatch(
            f'item 0 of {where} (like all its {len(a)} images)', *a.shape[1:3], image_size
        )
    return a


class ArrayImages(_Conformed):
    """Images held in memory: uint8 (or float 0..1) [N, H, W(, C)], labels [N] or none."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | None = None,
        *,
        image_size: int | None = None,
        channels: int | None = None,
        resize: bool = False,
        where: str = 'the images',
        classes: list[str] | None = None,
    ):
        super().__init__(image_size, channels, resize)
        self.where = where
        self._images = _image_array(images, image_size, resize, where)
        n = len(self._images)
        if labels is None:
            self._labels = np.full(n, -1, np.int32)
        else:
            labels = np.asarray(labels)
            if labels.shape != (n,):
                raise DataError(
                    f'{where}: expected one label per image ({n}), found labels of shape '
                    f'{labels.shape}'
                )
            if labels.dtype.kind not in 'iub' and not (
                labels.dtype.kind == 'f' and np.array_equal(labels, np.round(labels))
            ):
                raise DataError(
                    f'{where}: labels must be integer class indices, found dtype {labels.dtype}'
                    '; map the class names to 0..K-1 first'
                )
            self._labels = labels.astype(np.int32)
        self.classes = classes

    @property
    def labels(self) -> np.ndarray:
        """int32 [N], -1 where unknown."""
        return self._labels

    def __len__(self) -> int:
        return len(self._images)

    def _load(self, i: int) -> tuple[np.ndarray, dict]:
        return self._images[i], {'label': self._labels[i]}

    def _describe(self, i: int) -> str:
        return f'item {i} of {self.where}'


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (shipped with it, no download): uint8 [1797, 8, 8], int32 [1797].

    The 0..16 grey levels are scaled to 0..255."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255 / 16)).astype(np.uint8)
    images.flags.writeable = False
    labels = d.target.astype(np.int32)
    labels.flags.writeable = False
    return images, labels


# The embedded digits' fixed test split: this part of the 1797 images (389 of them, by
# `heldout_indices`, the same in every run), never read by pretraining (`digits`,
# `digits_captions`) and scored once at the end of a fine-tuning run.
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLITS = ('train', 'test', 'all')


def digits_indices(split: str) -> np.ndarray:
    """Indices into the 1797 digits of `split`: 'train' (1408), 'test' (389) or 'all'."""
    if split not in DIGITS_SPLITS:
        raise ConfigError(f'the embedded digits have splits {DIGITS_SPLITS}, not {split!r}')
    n = len(_digits()[1])
    if split == 'all':
        return np.arange(n)
    train, test = heldout_indices(n, DIGITS_TEST_FRACTION)
    return train if split == 'train' else test


def digits_images(
    image_size: int | None = None,
    channels: int | None = None,
    resize: bool = False,
    split: str = 'all',
) -> ArrayImages:
    """The embedded `digits`: handwritten digits, 8x8 grey, labels 0..9; `split` 'train'
    (1408 images), 'test' (389, see DIGITS_TEST_FRACTION) or 'all' (1797)."""
    images, labels = _digits()
    keep = digits_indices(split)
    return ArrayImages(
        images[keep],
        labels[keep],
        image_size=image_size,
        channels=channels,
        resize=resize,
        where='the embedded digits' + ('' if split == 'all' else f' ({split} split)'),
        classes=[str(d) for d in range(10)],
    )


def npz_images(
    path: str, image_size: int | None = None, channels: int | None = None, resize: bool = False
) -> ArrayImages:
    """Images of a local `.npz`: `images` (or `x`, `image`) [N, H, W(, C)], uint8 or float
    0..1, and optionally `labels` (or `y`, `label`) [N]."""
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = list(f.keys())
            image_key = next((k for k in IMAGE_KEYS if k in keys), None)
            if image_key is None:
                raise DataError(
                    f'{path} holds no images: expected an array named one of {list(IMAGE_KEYS)}, '
                    f'found {keys}; save them with np.savez(path, images=..., labels=...)'
                )
            label_key = next((k for k in LABEL_KEYS if k in keys), None)
            images = f[image_key]
            labels = f[label_key] if label_key else None
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # a missing, cut or
        # damaged file, not a zip, pickled object arrays
        raise DataError(
            f'{path} could not be read as an .npz of arrays ({type(e).__name__}: {e}); '
            'write it again with np.savez(path, images=..., labels=...)'
        ) from e
    return ArrayImages(
        images, labels, image_size=image_size, channels=channels, resize=resize, where=path
    )


class FolderImages(_Conformed):
    """A local image folder `ROOT/<class_name>/<image>`: one folder per class, classes
    sorted by name give the labels; images are decoded when read.

    `classes` fixes the class list (an eval folder takes the training folder's, so that
    the same name has the same label even when the eval folder lacks a class)."""

    read_threads = DECODE_THREADS

    def __init__(
        self,
        root: str,
        image_size: int | None = None,
        channels: int | None = None,
        resize: bool = False,
        classes: Sequence[str] | None = None,
    ):
        super().__init__(image_size, channels, resize)
        if not os.path.isdir(root):
            raise DataError(f'image folder {root} does not exist; expected {FOLDER_LAYOUT}')
        self.root = root
        found = sorted(
            e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.')
        )
        if not found:
            raise DataError(f'image folder {root} has no class folders; expected {FOLDER_LAYOUT}')
        self.classes = list(classes) if classes is not None else found
        index = {name: k for k, name in enumerate(self.classes)}
        unknown = [name for name in found if name not in index]
        if unknown:
            raise DataError(
                f'image folder {root} has class folders {unknown} that the training data does '
                f'not have (its classes: {self.classes}); give both splits the same classes'
            )
        self._paths, labels = [], []
        for name in found:
            folder = os.path.join(root, name)
            files = sorted(
                e.name
                for e in os.scandir(folder)
                if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
            )
            self._paths.extend(os.path.join(folder, f) for f in files)
            labels.extend([index[name]] * len(files))
        if not self._paths:
            raise DataError(
                f'image folder {root} holds no images in its {len(found)} class folders; '
                f'expected {FOLDER_LAYOUT}'
            )
        check_image_files(self._paths, f'image folder {root}')
        self._labels = np.asarray(labels, np.int32)

    @property
    def labels(self) -> np.ndarray:
        """int32 [N]: the class index of each image."""
        return self._labels

    def __len__(self) -> int:
        return len(self._paths)

    def _load(self, i: int) -> tuple[np.ndarray, dict]:
        return read_image_file(self._paths[i], self.channels), {'label': self._labels[i]}

    def _describe(self, i: int) -> str:
        return self._paths[i]


class _TfdsSource(_Conformed):
    """A TFDS split read with `tfds.data_source`: images come back decoded as numpy
    (TFDS decodes them with Pillow, no TensorFlow); encoded bytes are decoded here."""

    read_threads = DECODE_THREADS

    def __init__(self, name, split, data_dir, image_field, image_size, channels, resize):
        super().__init__(image_size, channels, resize)
        self.name, self.split, self.image_field = name, split, image_field
        self._source = tfds_source.open_split(name, split, data_dir)
        self._first = self._source[0] if len(self._source) else {}
        tfds_source.require_feature(name, self._first, image_field, 'image_field')

    def __len__(self) -> int:
        return len(self._source)

    def _image(self, record: dict, i: int) -> np.ndarray:
        image = record[self.image_field]
        if isinstance(image, bytes):
            return decode_image_bytes(image, self.channels, self._describe(i))
        return image

    def _describe(self, i: int) -> str:
        return f'TFDS {self.name} split {self.split!r} item {i}'


class TfdsImages(_TfdsSource):
    """A TFDS split as labelled images; label -1 when it has no `label_field`."""

    def __init__(
        self,
        name: str,
        split: str,
        *,
        data_dir: str | None = None,
        image_field: str = 'image',
        label_field: str = 'label',
        image_size: int | None = None,
        channels: int | None = None,
        resize: bool = False,
    ):
        super().__init__(name, split, data_dir, image_field, image_size, channels, resize)
        self.label_field = label_field if label_field in self._first else None
        try:
            self.classes = list(self._source.dataset_info.features[label_field].names)
        except (AttributeError, KeyError, TypeError):
            self.classes = None

    def _load(self, i: int) -> tuple[np.ndarray, dict]:
        record = self._source[i]
        label = int(record[self.label_field]) if self.label_field else -1
        return self._image(record, i), {'label': np.int32(label)}


class TfdsPairs(_TfdsSource):
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


class ArrayPairs(_Conformed):
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
        self._images = _image_array(images, image_size, resize, where)
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


class CaptionFilePairs(_Conformed):
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


# --- embedded digits with captions --------------------------------------------------------

_DIGIT_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
_WEIGHTS = ('thin', 'regular', 'bold')
_SLANTS = ('leaning left', 'standing upright', 'leaning right')
_TEMPLATES = (
    'a {weight} handwritten {word}, {slant}',
    'a {weight} digit {digit} drawn by hand, {slant}',
    'the number {word} written by hand with a {weight} stroke, {slant}',
    'a handwritten {digit} with a {weight} stroke',
    'a small scan of a {weight} {word} {slant}',
)


def _terciles_within_class(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """0, 1 or 2: the tercile of each value among the values of its class."""
    out = np.zeros(len(values), np.int64)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        ranks = np.argsort(np.argsort(values[members], kind='stable'), kind='stable')
        out[members] = ranks * 3 // len(members)
    return out


@functools.cache
def digits_captions() -> tuple[str, ...]:
    """A caption for every digits image: the digit (as a word or a numeral), its stroke
    weight (ink total, by tercile within the class) and its slant (ink-weighted shear, by
    tercile within the class), in one of a few templates: the k-th image of each class takes
    template k mod 5."""
    images, labels = _digits()
    ink = images.astype(np.float64)
    total = ink.sum(axis=(1, 2))
    rows, cols = np.mgrid[0:8, 0:8].astype(np.float64)
    mean_r = (ink * rows).sum(axis=(1, 2)) / total
    mean_c = (ink * cols).sum(axis=(1, 2)) / total
    dr = rows[None] - mean_r[:, None, None]
    dc = cols[None] - mean_c[:, None, None]
    # Columns per row going down: a stroke leaning right moves left as it goes down.
    shear = -(ink * dr * dc).sum(axis=(1, 2)) / (ink * dr * dr).sum(axis=(1, 2))
    weight = _terciles_within_class(total, labels)
    slant = _terciles_within_class(shear, labels)
    # The k-th image of a class takes template k mod 5, so every digit gets every template.
    order = np.zeros(len(labels), np.int64)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        order[members] = np.arange(len(members))
    return tuple(
        _TEMPLATES[order[i] % len(_TEMPLATES)].format(
            weight=_WEIGHTS[weight[i]],
            slant=_SLANTS[slant[i]],
            word=_DIGIT_WORDS[d],
            digit=d,
        )
        for i, d in enumerate(labels)
    )


def digits_caption_pairs(
    image_size: int | None = None,
    channels: int | None = None,
    resize: bool = False,
    split: str = 'all',
) -> ArrayPairs:
    """The embedded `digits_captions`: the digits images of `split` (as in `digits_images`)
    with their generated captions."""
    images, _ = _digits()
    keep = digits_indices(split)
    captions = digits_captions()
    return ArrayPairs(
        images[keep],
        [captions[i] for i in keep],
        image_size=image_size,
        channels=channels,
        resize=resize,
        where='the embedded digits_captions' + ('' if split == 'all' else f' ({split} split)'),
    )


def write_digits_captions(directory: str, image_size: int = 8, limit: int | None = None) -> str:
    """Writes the digits as PNGs (`images/NNNN.png`, grey, `image_size` square) and
    `captions.jsonl` (fields image, caption, label; paths relative to it) under
    `directory`, a local image-text set to try the file path of the pipeline on. Returns
    the path of captions.jsonl."""
    images, labels = _digits()
    captions = digits_captions()
    n = len(images) if limit is None else min(limit, len(images))
    os.makedirs(os.path.join(directory, 'images'), exist_ok=True)
    path = os.path.join(directory, 'captions.jsonl')
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
        for i in range(n):
            name = f'images/{i:04d}.png'
            image = conform_image(images[i], image_size, 1, resize=True)
            Image.fromarray(image[:, :, 0], mode='L').save(os.path.join(directory, name))
            record = {'image': name, 'caption': captions[i], 'label': int(labels[i])}
            f.write(json.dumps(record) + '\n')
    os.replace(path + '.tmp', path)
    return path


# --- splits -------------------------------------------------------------------------------


def _get(c, key: str, default):
    value = c.get(key, default) if hasattr(c, 'get') else getattr(c, key, default)
    return default if value is None else value


class _Subset(Subset):
    """data.text.Subset that keeps the class names (and labels) of its source."""

    @property
    def classes(self) -> list[str] | None:
        return getattr(self._docs, 'classes', None)

    @property
    def labels(self) -> np.ndarray | None:
        labels = getattr(self._docs, 'labels', None)
        return None if labels is None else labels[self._indices]

    @property
    def read_threads(self) -> int:
        return getattr(self._docs, 'read_threads', 0)


def labelled_subset(source: Sequence, indices: np.ndarray) -> Sequence:
    """The items `indices` of an image source, with its class names and labels."""
    return _Subset(source, np.asarray(indices))


def num_classes(source: Sequence) -> int:
    """How many classes the labels of an image source index (0: it has no labels).

    From its class names when it has them (digits, folders, TFDS ClassLabel), else from
    its largest label (.npz); a TFDS label feature without class names is not scanned
    (that would decode every image) and counts as no labels."""
    classes = getattr(source, 'classes', None)
    if classes:
        return len(classes)
    labels = getattr(source, 'labels', None)
    if labels is None or len(labels) == 0:
        return 0
    return max(int(np.max(labels)) + 1, 0)


def _hold_out(train: Sequence, where: str, c, open_eval: Callable[[str], Sequence]):
    """(train, eval): `data.eval_files` if given, else a held-out `data.eval_fraction`."""
    eval_files = _get(c, 'eval_files', '')
    if eval_files:
        return train, open_eval(eval_files)
    fraction = float(_get(c, 'eval_fraction', 0.05))
    train_idx, eval_idx = heldout_indices(len(train), fraction)
    if len(eval_idx) == 0 or len(train_idx) == 0:
        raise DataError(
            f'{where} has {len(train)} items: too few to hold out eval_fraction={fraction} of '
            'them; give --config.data.eval_files or more data'
        )
    return _Subset(train, train_idx), _Subset(train, eval_idx)


def _checked(train: Sequence, eval_: Sequence, where: str) -> tuple[Sequence, Sequence]:
    """Reads the first item of each split, so that a wrong image size or an unreadable
    first file stops the run before it starts rather than at its first batch."""
    for source in (train, eval_):
        if len(source):
            source[0]
    return train, eval_


def open_image_files(
    path: str,
    image_size: int | None = None,
    channels: int | None = None,
    resize: bool = False,
    classes: Sequence[str] | None = None,
) -> ArrayImages | FolderImages:
    """A local image folder (`ROOT/<class_name>/*.png`) or `.npz` file."""
    if os.path.isdir(path):
        return FolderImages(path, image_size, channels, resize, classes)
    if path.lower().endswith('.npz'):
        if not os.path.isfile(path):
            raise DataError(f'{path} does not exist; check --config.data.files')
        return npz_images(path, image_size, channels, resize)
    if not os.path.exists(path):
        raise DataError(
            f'{path} does not exist; --config.data.files must be an image folder '
            f'({FOLDER_LAYOUT}) or an .npz file'
        )
    raise DataError(
        f'{path} is neither a folder nor an .npz file; --config.data.files must be an image '
        f'folder ({FOLDER_LAYOUT}) or an .npz file'
    )


def image_splits(data_config, image_size: int, channels: int) -> tuple[Sequence, Sequence]:
    """(train images, eval images) of a pretraining run, as `config.data` describes:
    `files` (an image folder or an .npz) overrides `name` (`digits` or a TFDS dataset);
    eval from `eval_files`, the TFDS `eval_split`, or else a held-out `eval_fraction` fixed
    whatever the seed. Of the embedded digits both come from its training split (1408
    images): the test split is left to fine-tuning (`labelled_image_splits`)."""
    c = data_config
    opts = {'image_size': image_size, 'channels': channels, 'resize': _get(c, 'resize', False)}
    files, name = _get(c, 'files', ''), _get(c, 'name', '')
    if files:
        train, where = open_image_files(files, **opts), files
    elif name in EMBEDDED_IMAGES:
        # The training split only: the digits test split is no pretraining's to read.
        train, where = digits_images(**opts, split='train'), 'the embedded digits'
    elif name in EMBEDDED_PAIRS:
        raise ConfigError(
            f'data.name={name!r} is an image-text set, and this run reads labelled images; '
            f'use one of {EMBEDDED_IMAGES}, a TFDS image dataset, or --config.data.files'
        )
    elif not name:
        raise ConfigError('no image data: set --config.data.name or --config.data.files')
    else:
        tfds_opts = {
            'data_dir': _get(c, 'data_dir', ''),
            'label_field': _get(c, 'label_field', 'label'),
            **opts,
        }
        train = TfdsImages(name, _get(c, 'train_split', 'train'), **tfds_opts)
        where = f'TFDS {name}'
        eval_split = _get(c, 'eval_split', '')
        if eval_split and len(train):
            return _checked(train, TfdsImages(name, eval_split, **tfds_opts), where)
    if len(train) == 0:
        raise DataError(f'{where} holds no images; point --config.data.files at real images')
    classes = getattr(train, 'classes', None) if isinstance(train, FolderImages) else None
    split = _hold_out(train, where, c, lambda f: open_image_files(f, classes=classes, **opts))
    return _checked(*split, where)


def labelled_image_splits(
    data_config, image_size: int, channels: int
) -> tuple[Sequence, Sequence | None, Callable[[], Sequence] | None]:
    """(training images, validation images, test opener) of a labelled image task.

    Training: `files` (an image folder or an .npz), the embedded `digits` (its 1408-image
    training split) or a TFDS `train_split`. Validation: `eval_files` or the TFDS
    `eval_split`; None when neither is given, for the caller to carve out of the training
    images by seed (data/labelled.py:validation_split). Test: a function that opens
    `test_files`, the TFDS `test_split` or the digits test split (389 images) when called,
    so that nothing reads it before the end of training; None without a test split."""
    c = data_config
    opts = {'image_size': image_size, 'channels': channels, 'resize': _get(c, 'resize', False)}
    files, name = _get(c, 'files', ''), _get(c, 'name', '')
    eval_files, test_files = _get(c, 'eval_files', ''), _get(c, 'test_files', '')
    eval_split, test_split = _get(c, 'eval_split', ''), _get(c, 'test_split', '')
    tfds_opts = {
        'data_dir': _get(c, 'data_dir', ''),
        'label_field': _get(c, 'label_field', 'label'),
        **opts,
    }
    embedded = not files and name in EMBEDDED_IMAGES
    tfds = not files and not embedded
    if embedded and (test_files or test_split):
        raise ConfigError(
            f'data.name={name!r} ships its own test split ({DIGITS_TEST_FRACTION:.0%} of the '
            'images); leave data.test_files and data.test_split empty, or give your own data '
            'with --config.data.files'
        )
    if files:
        train, where = open_image_files(files, **opts), files
    elif embedded:
        train, where = digits_images(**opts, split='train'), 'the embedded digits'
    elif name in EMBEDDED_PAIRS:
        raise ConfigError(
            f'data.name={name!r} is an image-text set, and this run reads labelled images; '
            f'use one of {EMBEDDED_IMAGES}, a TFDS image dataset, or --config.data.files'
        )
    elif not name:
        raise ConfigError('no image data: set --config.data.name or --config.data.files')
    else:
        train = TfdsImages(name, _get(c, 'train_split', 'train'), **tfds_opts)
        where = f'TFDS {name}'
    if len(train) == 0:
        raise DataError(f'{where} holds no images; point --config.data.files at real images')
    classes = getattr(train, 'classes', None) if isinstance(train, FolderImages) else None
    if eval_files:
        validation = open_image_files(eval_files, classes=classes, **opts)
    elif tfds and eval_split:
        validation = TfdsImages(name, eval_split, **tfds_opts)
    else:
        validation = None
    _checked(train, validation if validation is not None else [], where)

    def open_test() -> Sequence:
        if test_files:
            return open_image_files(test_files, classes=classes, **opts)
        if embedded:
            return digits_images(**opts, split='test')
        return TfdsImages(name, test_split, **tfds_opts)

    has_test = bool(test_files or embedded or (tfds and test_split))
    return train, validation, open_test if has_test else None


def pair_splits(data_config, image_size: int, channels: int) -> tuple[Sequence, Sequence]:
    """(train pairs, eval pairs) as `config.data` describes: `files` (.jsonl / .tsv of image
    paths and captions) overrides `name` (`digits_captions` or a TFDS dataset); eval as in
    `image_splits`."""
    c = data_config
    opts = {'image_size': image_size, 'channels': channels, 'resize': _get(c, 'resize', False)}
    fields = {
        'image_field': _get(c, 'image_field', 'image'),
        'text_field': _get(c, 'text_field', 'caption'),
    }
    files, name = _get(c, 'files', ''), _get(c, 'name', '')
    if files:
        train, where = CaptionFilePairs(files, **fields, **opts), files
    elif name in EMBEDDED_PAIRS:
        # The training split only: the digits test split is no pretraining's to read.
        train = digits_caption_pairs(**opts, split='train')
        where = 'the embedded digits_captions'
    elif name in EMBEDDED_IMAGES:
        raise ConfigError(
            f'data.name={name!r} has no captions; for image-text pairs use '
            f'{EMBEDDED_PAIRS[0]!r}, a TFDS dataset with a text feature, or --config.data.files'
        )
    elif not name:
        raise ConfigError('no image-text data: set --config.data.name or --config.data.files')
    else:
        tfds_opts = {'data_dir': _get(c, 'data_dir', ''), **fields, **opts}
        train = TfdsPairs(name, _get(c, 'train_split', 'train'), **tfds_opts)
        where = f'TFDS {name}'
        eval_split = _get(c, 'eval_split', '')
        if eval_split and len(train):
            return _checked(train, TfdsPairs(name, eval_split, **tfds_opts), where)
    if len(train) == 0:
        raise DataError(f'{where} holds no image-text pairs; point --config.data.files at some')
    split = _hold_out(train, where, c, lambda f: CaptionFilePairs(f, **fields, **opts))
    return _checked(*split, where)


# --- Grain pipelines ----------------------------------------------------------------------


class ImageExample(grain.transforms.Map):
    """A source item -> {'image': uint8 [S, S, C], 'label': int32}."""

    def map(self, item: dict) -> dict[str, np.ndarray]:
        return {
            'image': np.asarray(item['image'], np.uint8),
            'label': np.int32(item.get('label', -1)),
        }


class PairExample(grain.transforms.Map):
    """A pair {'image', 'caption'} -> {'image', 'input_ids', 'input_mask'}."""

    def __init__(self, tokenize: Callable[[str], np.ndarray]):
        self.tokenize = tokenize

    def map(self, item: dict) -> dict[str, np.ndarray]:
        ids = np.asarray(self.tokenize(item['caption']), np.int32)
        if ids.ndim != 1:
            raise DataError(
                f'the caption tokenizer returned shape {ids.shape} for {item["caption"]!r}; '
                'expected [seq_len] token ids (see caption_tokenizer)'
            )
        return {
            'image': np.asarray(item['image'], np.uint8),
            'input_ids': ids,
            'input_mask': (ids != 0).astype(np.int32),
        }


def _batches(
    source: Sequence,
    example: grain.transforms.Map,
    batch_size: int,
    seed: int,
    train: bool,
    shard_index: int,
    shard_count: int,
    prefetch: int,
) -> grain.IterDataset:
    if batch_size < 1:
        raise ConfigError(f'batch_size must be at least 1, found {batch_size}')
    if not 0 <= shard_index < shard_count:
        raise ConfigError(
            f'shard_index must lie in [0, shard_count={shard_count}), found {shard_index}'
        )
    ds = grain.MapDataset.source(source)[shard_index::shard_count]
    if train:
        if len(ds) == 0:
            raise DataError(
                f'process {shard_index} of {shard_count} gets no training items: the data has '
                f'only {len(source)}; give more data or run on fewer processes'
            )
        ds = shuffle_forever(ds, seed)  # a new order every epoch
    threads = getattr(source, 'read_threads', 0)  # a plain sequence: in memory
    ds = ds.map(example).to_iter_dataset(read_options(threads))
    ds = ds.batch(batch_size, drop_remainder=train)
    if prefetch:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return ds


def image_dataset(
    source: Sequence,
    *,
    batch_size: int,
    seed: int,
    train: bool,
    shard_index: int = 0,
    shard_count: int = 1,
    prefetch: int = 2,
) -> grain.IterDataset:
    """Batches {'image': uint8 [B, S, S, C], 'label': int32 [B]} for this process
    (`batch_size` is the per-process batch; `source` yields items of one size, as the
    sources of this module do).

    Training data is this process's shard, shuffled with `seed`, reshuffled every epoch and
    repeated forever; eval data is read once, in order, and its last batch may be short
    (pad it with data.pipeline.pad_batch). The iterator's state (get_state / set_state)
    is what a checkpoint saves to resume with the same batches."""
    return _batches(
        source, ImageExample(), batch_size, seed, train, shard_index, shard_count, prefetch
    )


def pair_dataset(
    source: Sequence,
    tokenize: Callable[[str], np.ndarray],
    *,
    batch_size: int,
    seed: int,
    train: bool,
    shard_index: int = 0,
    shard_count: int = 1,
    prefetch: int = 2,
) -> grain.IterDataset:
    """Batches {'image': uint8 [B, S, S, C], 'input_ids': int32 [B, L], 'input_mask': int32
    [B, L]} of image-text pairs; `tokenize` maps a caption to L token ids padded with 0
    (see caption_tokenizer). Order, sharding and checkpointing as in image_dataset."""
    return _batches(
        source, PairExample(tokenize), batch_size, seed, train, shard_index, shard_count, prefetch
    )


def caption_tokenizer(wordpiece: WordPiece, seq_len: int) -> FixedLengthEncoder:
    """The `tokenize` of pair_dataset: [CLS] ids [SEP], truncated, padded with 0."""
    return FixedLengthEncoder(wordpiece, seq_len)
