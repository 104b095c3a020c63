"""A small TFDS image-text dataset generated on the spot: no download, no TensorFlow.

`prepare(data_dir)` writes `pretrax_test_images` (features `image`: Image 8x8x1, `label`:
ClassLabel with 3 classes, `caption`: Text) in array_record format under `data_dir`, the
layout `tfds.data_source` reads:

  DATA_DIR/pretrax_test_images/1.0.0/{dataset_info.json, features.json,
                                      pretrax_test_images-{train,validation}.array_record-*}

It serves both image sources (image + label) and image-text pairs (image + caption). As in
tests/tfds_fixture.py the builder is not registered with TFDS, so reading the prepared
dataset by name goes through the dataset_info.json on disk, and the images are handed to
TFDS as PNG bytes (encoded here with Pillow): TFDS would encode numpy arrays with
TensorFlow, which a pretrax environment does not have.
"""

import io

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

NAME = 'pretrax_test_images'
SIZES = {'train': 40, 'validation': 8}
IMAGE_SHAPE = (8, 8, 1)
CLASSES = ('dark', 'striped', 'bright')


def examples(split: str) -> list[dict]:
    """The examples of `split`, in order: an 8x8x1 uint8 image, its label and a caption.

    Class 0 images are dark noise, class 1 horizontal stripes, class 2 bright noise; the
    noise is seeded by split and index, so every image is distinct and reproducible."""
    rng = np.random.default_rng(list(SIZES).index(split))
    out = []
    for i in range(SIZES[split]):
        label = i % len(CLASSES)
        noise = rng.integers(0, 64, IMAGE_SHAPE, dtype=np.uint8)
        if label == 0:
            image = noise
        elif label == 1:
            stripes = np.where(np.arange(8) % 2 == 0, 160, 0).astype(np.uint8)
            image = noise + stripes[:, None, None]
        else:
            image = noise + np.uint8(180)
        caption = f'{CLASSES[label]} picture number {i} of the {split} split'
        out.append({'image': image, 'label': label, 'caption': caption})
    return out


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image[:, :, 0], mode='L').save(buffer, format='png')
    return buffer.getvalue()


class PretraxTestImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """`pretrax_test_images`: generated 8x8 grey images with labels and captions."""

    name = NAME
    VERSION = tfds.core.Version('1.0.0')

    # See tests/tfds_fixture.py: tfds 4.9.10 otherwise needs `importlib_resources` to find
    # the source file of a builder defined in a namespace package like `tests`.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description='Generated 8x8 images with labels and captions for the pretrax tests.',
            features=tfds.features.FeaturesDict(
                {
                    'image': tfds.features.Image(shape=IMAGE_SHAPE),
                    'label': tfds.features.ClassLabel(names=list(CLASSES)),
                    'caption': tfds.features.Text(),
                }
            ),
            disable_shuffling=True,  # records stay in generation order
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split) for split in SIZES}

    def _generate_examples(self, split):
        for i, example in enumerate(examples(split)):
            yield i, dict(example, image=_png(example['image']))


def prepare(data_dir: str) -> str:
    """Writes the dataset under `data_dir` (array_record); returns `data_dir`."""
    tfds.disable_progress_bar()
    builder = PretraxTestImages(data_dir=data_dir, file_format='array_record')
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    return data_dir
