"""The embedded image data, no download: scikit-learn's 1797 handwritten digits (`digits`,
8x8x1, labels 0..9) and the same digits with a generated English caption each
(`digits_captions`), both with a fixed test split (DIGITS_TEST_FRACTION).
"""

import functools
import json
import os

import numpy as np
from PIL import Image

from core.errors import ConfigError
from core.files import atomic_write
from data.decode import conform_image
from data.image_sources import ArrayImages
from data.pair_sources import ArrayPairs
from data.text import heldout_indices

EMBEDDED_IMAGES = ('digits',)
EMBEDDED_PAIRS = ('digits_captions',)


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
    with atomic_write(path, encoding='utf-8') as f:
        for i in range(n):
            name = f'images/{i:04d}.png'
            image = conform_image(images[i], image_size, 1, resize=True)
            Image.fromarray(image[:, :, 0], mode='L').save(os.path.join(directory, name))
            record = {'image': name, 'caption': captions[i], 'label': int(labels[i])}
            f.write(json.dumps(record) + '\n')
    return path
