"""Text classification from a prepared TFDS dataset by name (GLUE-style text + label
features), read without TensorFlow: the fixture of tests/tfds_fixture.py."""

import json
import os

from tests import tfds_fixture
from tests.conftest import launch

TINY_TEXT = [
    '--config.model.hidden_size=32',
    '--config.model.num_layers=1',
    '--config.model.num_heads=2',
    '--config.model.mlp_dim=64',
    '--config.model.vocab_size=1024',
    '--config.data.seq_len=32',
    '--config.batch_size=16',
    '--config.total_steps=2',
    '--config.eval_every=2',
    '--config.checkpoint_every=2',
]


def test_text_cls_reads_a_tfds_dataset_by_name(tmp_path, pydoc_vocab):
    data_dir = tfds_fixture.prepare(str(tmp_path / 'tfds'))
    workdir = str(tmp_path / 'cls')
    r = launch(
        'finetune',
        '--config',
        'configs/text_cls.py:tiny',
        '--workdir',
        workdir,
        *TINY_TEXT,
        f'--config.data.vocab_file={pydoc_vocab}',
        f'--config.data.name={tfds_fixture.NAME}',
        f'--config.data.data_dir={data_dir}',
        '--config.data.test_split=validation',  # validation: a tenth of each class of train
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (
        f'TFDS {tfds_fixture.NAME}, 54 train (of 54) / 6 validation examples, 2 classes; a '
        'test split scored at the end'
    ) in r.stderr
    with open(os.path.join(workdir, 'labels.json')) as f:
        assert '"0"' in f.read()
    rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
    evals = [row for row in rows if row['split'] == 'eval']
    assert [row['step'] for row in evals] == [0, 2]
    assert all(0.0 <= row['accuracy'] <= 1.0 for row in evals)
    assert rows[-1]['split'] == 'test' and rows[-1]['step'] == 2
    assert 'test: 10 examples' in r.stderr
