"""Image sources: random-access sequences of `{'image': uint8 [S, S, C], 'label': int32}`
(label -1 when unknown), usable directly as Grain sources:
  - images in memory (`ArrayImages`; the embedded digits are, see data/digits.py);
  - a local `.npz` (arrays `images` [N, H, W(, C)] and optional `labels`);
  - a local image folder, `ROOT/<class_name>/*.png|jpg|jpeg|bmp|gif`, decoded lazily;
  - a TFDS dataset read with `tfds.data_source` (array_record, no TensorFlow: TFDS decodes
    images with Pillow).

Every image is conformed when it is read (data/decode.py `conform_image`); image-text
sources (data/pair_sources.py) share the base class `ImageSource`.
"""

import os
import zipfile
from collections.abc import Sequence

import numpy as np

from core.errors import ConfigError, DataError
from data import tfds_source
from data.decode import (
    DECODE_THREADS,
    IMAGE_EXTENSIONS,
    check_image_files,
    conform_image,
    decode_image_bytes,
    read_image_file,
    size_mismatch,
    to_uint8,
)
from data.text import Subset

IMAGE_KEYS = ('images', 'x', 'image')  # .npz array names, in order of preference
LABEL_KEYS = ('labels', 'y', 'label')
FOLDER_LAYOUT = 'ROOT/<class_name>/*.png (one folder per class; .png .jpg .jpeg .bmp .gif)'


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


class ImageSource(Sequence):
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


def image_array(images, image_size: int | None, resize: bool, where: str) -> np.ndarray:
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


class ArrayImages(ImageSource):
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
        self._images = image_array(images, image_size, resize, where)
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


class FolderImages(ImageSource):
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


class TfdsSource(ImageSource):
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


class TfdsImages(TfdsSource):
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
    """The items `indices` of an image (or image-text) source, with its class names, labels
    and read threads."""
    return _Subset(source, np.asarray(indices))


def probe_subset(source, limit: int, seed: int = 0):
    """At most `limit` items of `source`, a fixed random choice (all when limit <= 0): the
    labelled images a feature probe fits on, or the pairs a retrieval eval embeds."""
    if limit <= 0 or len(source) <= limit:
        return source
    rng = np.random.default_rng(seed)
    return Subset(source, np.sort(rng.permutation(len(source))[:limit]))


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
