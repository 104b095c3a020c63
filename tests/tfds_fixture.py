"""A small TFDS text dataset generated on the spot: no download, no TensorFlow.

`prepare(data_dir)` writes `pretrax_test_text` (features `text`: Text, `label`: ClassLabel)
in array_record format under `data_dir`, the layout `tfds.data_source` reads:

  DATA_DIR/pretrax_test_text/1.0.0/{dataset_info.json, features.json,
                                    pretrax_test_text-{train,validation}.array_record-*}

The builder is not registered with TFDS (`skip_registration=True`), so reading the prepared
dataset by name goes through the dataset_info.json on disk, exactly as in a training run
whose process has never imported this module.
"""

import random

import tensorflow_datasets as tfds
from etils import epath

NAME = 'pretrax_test_text'
SIZES = {'train': 60, 'validation': 10}

_SUBJECTS = [
    'the model',
    'a small network',
    'the tokenizer',
    'every worker',
    'the optimizer',
    'our reader',
    'the teacher',
    'a patient student',
]
_VERBS = ['reads', 'writes', 'learns', 'predicts', 'counts', 'shuffles', 'checks', 'remembers']
_OBJECTS = [
    'the masked words',
    'a long document',
    'short sentences',
    'the hidden tokens',
    'every batch of text',
    'the next paragraph',
    'old library books',
    'the evaluation data',
]
_ENDINGS = [
    'before the morning',
    'with great care',
    'in a quiet room',
    'one step at a time',
    'after the first epoch',
    'without any help',
    'for the whole afternoon',
    'again and again',
]


def documents(split: str) -> list[dict]:
    """The examples of `split`, in order: a few generated English sentences and a label."""
    rng = random.Random(f'{NAME}-{split}')
    out = []
    for i in range(SIZES[split]):
        sentences = []
        for _ in range(rng.randint(2, 5)):
            words = [rng.choice(p) for p in (_SUBJECTS, _VERBS, _OBJECTS, _ENDINGS)]
            sentences.append(' '.join(words).capitalize() + '.')
        out.append({'text': f'Document {i} of {split}. ' + ' '.join(sentences), 'label': i % 2})
    return out


class PretraxTestText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """`pretrax_test_text`: generated documents, train and validation splits."""

    name = NAME
    VERSION = tfds.core.Version('1.0.0')

    # tfds 4.9.10 finds a builder's source file via `importlib_resources` (a package it only
    # requires on Python < 3.9) when the module is in a namespace package like `tests`;
    # this is the same answer, without it.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly: `dataset_info_from_configs` looks for metadata files
        # (README, citation) in a package directory this module does not have.
        return tfds.core.DatasetInfo(
            builder=self,
            description='Generated English-ish documents for the pretrax tests.',
            features=tfds.features.FeaturesDict(
                {'text': tfds.features.Text(), 'label': tfds.features.ClassLabel(num_classes=2)}
            ),
            disable_shuffling=True,  # records stay in generation order
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split) for split in SIZES}

    def _generate_examples(self, split):
        yield from enumerate(documents(split))  # (key, example)


def prepare(data_dir: str) -> str:
    """Writes the dataset under `data_dir` (array_record); returns `data_dir`."""
    tfds.disable_progress_bar()
    builder = PretraxTestText(data_dir=data_dir, file_format='array_record')
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    return data_dir
