"""The splits of an image run, as `config.data` describes them: (train, eval) images of a
pretraining (`image_splits`), image-text pairs (`pair_splits`), and (train, validation,
test opener) of a labelled image task (`labelled_image_splits`).
"""

from collections.abc import Callable, Sequence

from core.errors import ConfigError, DataError
from data.digits import (
    DIGITS_TEST_FRACTION,
    EMBEDDED_IMAGES,
    EMBEDDED_PAIRS,
    digits_caption_pairs,
    digits_images,
)
from data.encoded_images import EncodedImages, EncodedPairs, is_encoded
from data.image_sources import FolderImages, TfdsImages, labelled_subset, open_image_files
from data.pair_sources import CaptionFilePairs, TfdsPairs
from data.text import heldout_indices


def _get(c, key: str, default):
    value = c.get(key, default) if hasattr(c, 'get') else getattr(c, key, default)
    return default if value is None else value


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
    return labelled_subset(train, train_idx), labelled_subset(train, eval_idx)


def _checked(train: Sequence, eval_: Sequence, where: str) -> tuple[Sequence, Sequence]:
    """Reads the first item of each split, so that a wrong image size or an unreadable
    first file stops the run before it starts rather than at its first batch."""
    for source in (train, eval_):
        if len(source):
            source[0]
    return train, eval_


def _options(c, image_size: int, channels: int) -> tuple[dict, dict]:
    """(what every image source of `config.data` takes, what a TFDS one takes besides)."""
    opts = {'image_size': image_size, 'channels': channels, 'resize': _get(c, 'resize', False)}
    tfds_opts = {
        'data_dir': _get(c, 'data_dir', ''),
        'image_field': _get(c, 'image_field', 'image'),
        'label_field': _get(c, 'label_field', 'label'),
        **opts,
    }
    return opts, tfds_opts


def _open_images(files: str, c, opts: dict, classes=None) -> Sequence:
    """Local labelled images: WebDataset .tar shards or a table of encoded images
    (`data.image_field`, `data.label_field`), else an image folder or an .npz."""
    if is_encoded(files):
        fields = {
            'image_field': _get(c, 'image_field', 'image'),
            'label_field': _get(c, 'label_field', 'label'),
        }
        return EncodedImages(files, **fields, classes=classes, **opts)
    return open_image_files(files, classes=classes, **opts)


def _open_pairs(files: str, fields: dict, opts: dict) -> Sequence:
    """Local image-text pairs: WebDataset .tar shards or a table of encoded images and
    captions, else .jsonl / .tsv files of image paths and captions."""
    if is_encoded(files):
        return EncodedPairs(files, **fields, **opts)
    return CaptionFilePairs(files, **fields, **opts)


def _classes(train: Sequence) -> list[str] | None:
    """The class names an eval or test split of local files takes from training."""
    return (
        getattr(train, 'classes', None) if isinstance(train, FolderImages | EncodedImages) else None
    )


def _training_images(c, opts: dict, tfds_opts: dict) -> tuple[Sequence, str]:
    """(training images, where they are, for messages) as `config.data` names them:
    `files`, else the embedded digits' training split, else a TFDS `train_split`. Refuses
    an image-text set, no data named, and a set without images."""
    files, name = _get(c, 'files', ''), _get(c, 'name', '')
    if files:
        train, where = _open_images(files, c, opts), files
    elif name in EMBEDDED_IMAGES:
        # The training split: its test split is read only by a fine-tuning's test scoring.
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
    return train, where


def image_splits(data_config, image_size: int, channels: int) -> tuple[Sequence, Sequence]:
    """(train images, eval images) of a pretraining run, as `config.data` describes:
    `files` (an image folder or an .npz) overrides `name` (`digits` or a TFDS dataset);
    eval from `eval_files`, the TFDS `eval_split`, or else a held-out `eval_fraction` fixed
    whatever the seed. Of the embedded digits both come from its training split (1408
    images): the test split is left to fine-tuning (`labelled_image_splits`)."""
    c = data_config
    opts, tfds_opts = _options(c, image_size, channels)
    train, where = _training_images(c, opts, tfds_opts)
    name, eval_split = _get(c, 'name', ''), _get(c, 'eval_split', '')
    if isinstance(train, TfdsImages) and eval_split:
        return _checked(train, TfdsImages(name, eval_split, **tfds_opts), where)
    classes = _classes(train)
    split = _hold_out(train, where, c, lambda f: _open_images(f, c, opts, classes))
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
    opts, tfds_opts = _options(c, image_size, channels)
    files, name = _get(c, 'files', ''), _get(c, 'name', '')
    eval_files, test_files = _get(c, 'eval_files', ''), _get(c, 'test_files', '')
    eval_split, test_split = _get(c, 'eval_split', ''), _get(c, 'test_split', '')
    embedded = not files and name in EMBEDDED_IMAGES
    tfds = not files and not embedded
    if embedded and (test_files or test_split):
        raise ConfigError(
            f'data.name={name!r} ships its own test split ({DIGITS_TEST_FRACTION:.0%} of the '
            'images); leave data.test_files and data.test_split empty, or give your own data '
            'with --config.data.files'
        )
    train, where = _training_images(c, opts, tfds_opts)
    classes = _classes(train)
    if eval_files:
        validation = _open_images(eval_files, c, opts, classes)
    elif tfds and eval_split:
        validation = TfdsImages(name, eval_split, **tfds_opts)
    else:
        validation = None
    _checked(train, validation if validation is not None else [], where)

    def open_test() -> Sequence:
        if test_files:
            return _open_images(test_files, c, opts, classes)
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
        train, where = _open_pairs(files, fields, opts), files
    elif name in EMBEDDED_PAIRS:
        # The training split: its test split is read only by a fine-tuning's test scoring.
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
    split = _hold_out(train, where, c, lambda f: _open_pairs(f, fields, opts))
    return _checked(*split, where)
