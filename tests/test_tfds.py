"""TFDS corpora (data/text.py TfdsText, load_corpus with data.name): read from a small
array_record dataset generated in the test (tests/tfds_fixture.py), no download, no
TensorFlow."""

import json
import math
import os
import subprocess
import sys

import ml_collections
import pytest
import tensorflow_datasets as tfds

from core.errors import DataError
from data.text import TfdsText, load_corpus
from tests import tfds_fixture
from tests.conftest import ROOT, SMALL_RUN, launch

NAME = tfds_fixture.NAME


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> str:
    return tfds_fixture.prepare(str(tmp_path_factory.mktemp('tfds')))


def texts(split: str) -> list[str]:
    return [d['text'] for d in tfds_fixture.documents(split)]


def data_config(data_dir: str, **overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(
        {
            'name': NAME,
            'files': '',
            'eval_files': '',
            'eval_fraction': 0.2,
            'train_split': 'train',
            'eval_split': '',
            'data_dir': data_dir,
            'text_field': 'text',
        }
    )
    c.update(overrides)
    return c


def test_the_fixture_writes_array_record_without_tensorflow(data_dir):
    version_dir = os.path.join(data_dir, NAME, '1.0.0')
    with open(os.path.join(version_dir, 'dataset_info.json')) as f:
        info = json.load(f)
    assert info['fileFormat'] == 'array_record'
    assert [s['shardLengths'] for s in info['splits']] == [['60'], ['10']]
    assert 'tensorflow' not in sys.modules  # tfds imports it lazily; nothing needed it
    # Not registered: the reads below go through dataset_info.json, as in a training run.
    assert NAME not in tfds.core.registered.list_imported_builders()


@pytest.mark.parametrize('split', ['train', 'validation'])
def test_tfds_text_returns_the_generated_documents(data_dir, split):
    docs = TfdsText(NAME, split, 'text', data_dir)
    assert len(docs) == tfds_fixture.SIZES[split]
    assert all(type(docs[i]) is str for i in range(len(docs)))
    assert [docs[i] for i in range(len(docs))] == texts(split)
    assert list(docs) == texts(split)  # iteration stops at the IndexError past the end
    assert docs[-1] == texts(split)[-1]
    with pytest.raises(IndexError):
        docs[len(docs)]


def test_tfds_text_reads_slices_of_a_split(data_dir):
    docs = TfdsText(NAME, 'train[:10]', 'text', data_dir)
    assert list(docs) == texts('train')[:10]


def test_load_corpus_uses_the_eval_split(data_dir):
    train, eval_ = load_corpus(data_config(data_dir, eval_split='validation'))
    assert list(train) == texts('train')
    assert list(eval_) == texts('validation')


def test_load_corpus_without_eval_split_holds_out_a_fraction(data_dir):
    train, eval_ = load_corpus(data_config(data_dir, eval_fraction=0.2))
    train_docs, eval_docs = list(train), list(eval_)
    assert 0 < len(eval_docs) < len(train_docs)
    assert set(train_docs).isdisjoint(eval_docs)
    assert sorted(train_docs + eval_docs) == sorted(texts('train'))
    again_train, again_eval = load_corpus(data_config(data_dir, eval_fraction=0.2))
    assert list(again_train) == train_docs and list(again_eval) == eval_docs


def test_wrong_text_field_names_the_features(data_dir):
    with pytest.raises(DataError) as e:
        load_corpus(data_config(data_dir, text_field='body'))
    message = str(e.value)
    assert "no feature 'body'" in message and "['label', 'text']" in message
    assert '--config.data.text_field' in message


@pytest.mark.parametrize('what', ['name', 'data_dir', 'split'])
def test_unprepared_dataset_says_how_to_prepare_it(data_dir, tmp_path, what):
    kwargs = {'name': NAME, 'split': 'train', 'field': 'text', 'data_dir': data_dir}
    kwargs[what] = {
        'name': 'no_such_dataset',
        'data_dir': str(tmp_path / 'empty'),
        'split': 'test',
    }[what]
    with pytest.raises(DataError) as e:
        TfdsText(**kwargs)
    message = str(e.value)
    opened = f'TFDS dataset {kwargs["name"]!r} split {kwargs["split"]!r} could not be opened'
    assert opened in message
    assert 'Prepare it first' in message and '--config.data.data_dir' in message
    assert kwargs['data_dir'] in message


class PretraxTestTextRegistered(tfds_fixture.PretraxTestText):
    """The same builder, registered in the TFDS catalog (as real catalog datasets are)."""

    name = 'pretrax_test_text_registered'


def test_a_catalog_dataset_is_never_prepared_by_a_run(tmp_path):
    """tfds.data_source downloads and prepares a catalog dataset by default (possibly
    hundreds of GB, on every host at once); a run must only read one prepared before."""
    empty = str(tmp_path / 'empty')
    with pytest.raises(DataError, match='Prepare it first'):
        TfdsText(PretraxTestTextRegistered.name, 'train', 'text', empty)
    assert not os.path.exists(os.path.join(empty, PretraxTestTextRegistered.name))


def test_reading_needs_neither_the_builder_nor_tensorflow(data_dir, tmp_path):
    """A fresh process (like a training run) opens the dataset from data_dir alone."""
    code = (
        'import sys\n'
        'from data.text import TfdsText\n'
        f'docs = TfdsText({NAME!r}, "validation", "text", {data_dir!r})\n'
        'print(len(docs), docs[0])\n'
        'assert "tests.tfds_fixture" not in sys.modules, "builder imported"\n'
        'assert "tensorflow" not in sys.modules, "tensorflow imported"\n'
    )
    r = subprocess.run(
        [sys.executable, '-c', code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=ROOT),
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == f'10 {texts("validation")[0]}'


def test_pretrain_on_a_tfds_dataset(data_dir, tmp_path, pydoc_vocab):
    workdir = tmp_path / 'w'
    r = launch(
        'pretrain',
        '--config',
        'configs/bert_mlm.py:tiny',
        '--workdir',
        str(workdir),
        *SMALL_RUN,
        f'--config.data.name={NAME}',
        f'--config.data.data_dir={data_dir}',
        '--config.data.eval_split=validation',
        f'--config.data.vocab_file={pydoc_vocab}',
        '--config.total_steps=3',
        '--config.log_every=1',
        '--config.eval_every=3',
        '--config.checkpoint_every=3',
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'data: 60 train / 10 eval documents' in r.stderr
    with open(workdir / 'metrics.jsonl') as f:
        rows = [json.loads(line) for line in f]
    assert [row['step'] for row in rows if row['split'] == 'train'] == [1, 2, 3]
    evals = [row for row in rows if row['split'] == 'eval']
    assert evals and evals[-1]['step'] == 3
    assert all(math.isfinite(v) for row in evals for k, v in row.items() if k != 'split')
    assert os.path.isdir(workdir / 'checkpoints' / '3')
