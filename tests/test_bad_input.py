"""Bad input stops the run before compiling, with exit code 1 and a message naming the
problem and the fix. The same table is in docs/errors.md."""

import shutil

import pytest

from tests.conftest import SMALL_RUN, launch

BASE = ['pretrain', '--config', 'configs/bert_mlm.py:tiny']


def run(workdir, *overrides, env=None):
    return launch(*BASE, '--workdir', str(workdir), *SMALL_RUN, *overrides, env=env)


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory, pydoc_vocab):
    """A 2-step run to restart with another config and to init from."""
    workdir = tmp_path_factory.mktemp('done')
    r = run(workdir, '--config.total_steps=2', f'--config.data.vocab_file={pydoc_vocab}')
    assert r.returncode == 0, r.stderr[-2000:]
    return workdir


def write(path, text):
    path.write_text(text)
    return str(path)


CASES = {
    'unknown key': (['--config.learning_rat=1e-3'], "unknown config key 'learning_rat'"),
    'wrong type': (['--config.total_steps=ten'], 'invalid literal for int()'),
    'bad choice': (['--config.precision=float16'], "--config.precision='float16' is not one of"),
    'seq_len above position table': (
        ['--config.data.seq_len=1024'],
        'data.seq_len 1024 exceeds the position table model.max_len 512',
    ),
    'missing data files': (
        ['--config.data.files=/no/such/dir/*.txt'],
        "no files match '/no/such/dir/*.txt'",
    ),
    'missing vocab file': (
        ['--config.data.vocab_file=/no/such/vocab.txt'],
        'vocabulary file /no/such/vocab.txt not found',
    ),
    'unprepared TFDS dataset': (
        ['--config.data.name=no_such_dataset'],
        "TFDS dataset 'no_such_dataset' split 'train' could not be opened",
    ),
    'dropout above 1': (
        ['--config.model.dropout_rate=1.5'],
        '--config.model.dropout_rate=1.5 is out of range: expected a probability in [0, 1)',
    ),
    'learning rate nan': (
        ['--config.learning_rate=nan'],
        '--config.learning_rate=nan is not a finite number',
    ),
    'heads do not divide width': (
        ['--config.model.num_heads=3'],
        'model.hidden_size 32 is not divisible by model.num_heads 3',
    ),
}


@pytest.mark.parametrize('name', list(CASES))
def test_bad_config(tmp_path, name):
    overrides, message = CASES[name]
    r = run(tmp_path / 'w', *overrides)
    assert r.returncode == 1, (name, r.returncode, r.stderr[-1500:])
    assert message in r.stderr, (name, r.stderr[-1500:])
    assert 'Traceback' not in r.stderr


def test_empty_corpus(tmp_path):
    files = write(tmp_path / 'empty.txt', '\n\n')
    r = run(tmp_path / 'w', f'--config.data.files={files}')
    assert r.returncode == 1
    assert 'holds no documents' in r.stderr


def test_jsonl_without_text_field(tmp_path):
    files = write(tmp_path / 'c.jsonl', '{"body": "some text"}\n')
    r = run(tmp_path / 'w', f'--config.data.files={files}')
    assert r.returncode == 1
    assert "has no field 'text'" in r.stderr and '--config.data.text_field' in r.stderr


def test_vocab_larger_than_model(tmp_path, pydoc_vocab):
    r = run(
        tmp_path / 'w', f'--config.data.vocab_file={pydoc_vocab}', '--config.model.vocab_size=512'
    )
    assert r.returncode == 1
    assert 'has 1024 tokens but model.vocab_size is 512' in r.stderr
    assert '--config.model.vocab_size=1024' in r.stderr


def test_batch_not_divisible_by_devices(tmp_path):
    r = run(
        tmp_path / 'w',
        '--config.batch_size=12',
        env={'XLA_FLAGS': '--xla_force_host_platform_device_count=8'},
    )
    assert r.returncode == 1
    assert 'batch_size 12 (micro-batch 12) is not divisible by 8' in r.stderr


def test_workdir_of_another_config_is_refused_then_overwritten(finished_run, pydoc_vocab):
    vocab = f'--config.data.vocab_file={pydoc_vocab}'
    r = run(finished_run, '--config.total_steps=2', vocab, '--config.learning_rate=0.5')
    assert r.returncode == 1
    assert 'holds a run with a different config (learning_rate: 0.002 -> 0.5)' in r.stderr
    assert '--config.overwrite=true' in r.stderr
    r = run(
        finished_run,
        '--config.total_steps=2',
        vocab,
        '--config.learning_rate=0.5',
        '--config.overwrite=true',
    )
    assert r.returncode == 0, r.stderr[-2000:]


def test_init_from_checkpoint_of_another_size(tmp_path, finished_run, pydoc_vocab):
    r = run(
        tmp_path / 'w',
        f'--config.init_from={finished_run}',
        '--config.model.hidden_size=64',
        f'--config.data.vocab_file={pydoc_vocab}',
    )
    assert r.returncode == 1
    assert 'does not match the model' in r.stderr
    differs = 'shape differs: backbone/embeddings/token/embedding checkpoint (1024, 32)'
    assert differs + ' vs model (1024, 64)' in r.stderr


def test_init_from_without_its_vocabulary(tmp_path, finished_run, pydoc_vocab):
    """A text run never reads restored token embeddings under another vocabulary."""
    bare = tmp_path / 'copied'  # a checkpoints/ directory copied without its run
    shutil.copytree(finished_run / 'checkpoints', bare)
    r = run(tmp_path / 'w', f'--config.init_from={bare}')
    assert r.returncode == 1, r.stderr[-1500:]
    assert f'init_from {bare} has no vocabulary' in r.stderr
    assert '--config.data.vocab_file=PATH/vocab.txt' in r.stderr
    assert not (tmp_path / 'w').exists()  # refused before the workdir is written
    lines = open(pydoc_vocab).read().splitlines()
    other = write(tmp_path / 'other.txt', '\n'.join(lines[:5] + lines[:4:-1]) + '\n')
    r = run(
        tmp_path / 'w',
        f'--config.init_from={finished_run}/checkpoints/2',
        f'--config.data.vocab_file={other}',
    )
    assert r.returncode == 1, r.stderr[-1500:]
    assert f'--config.data.vocab_file={other} differs from {finished_run}/vocab.txt' in r.stderr


def test_missing_init_from_checkpoint(tmp_path):
    r = run(tmp_path / 'w', '--config.init_from=/no/such/run')
    assert r.returncode == 1
    assert 'no checkpoint found at /no/such/run' in r.stderr
    assert 'check --config.init_from' in r.stderr


def test_mesh_that_does_not_fit_the_devices(tmp_path):
    r = run(
        tmp_path / 'w',
        '--config.mesh.fsdp=3',
        env={'XLA_FLAGS': '--xla_force_host_platform_device_count=8'},
    )
    assert r.returncode == 1
    assert "'fsdp': 3, 'tensor': 1} does not divide the 8 devices" in r.stderr


@pytest.mark.parametrize(
    'flags,message',
    [
        (
            ['--coordinator_address', '127.0.0.1:1234'],
            '--coordinator_address needs --num_processes',
        ),
        (['--local_processes', 'two'], "argument --local_processes: invalid int value: 'two'"),
    ],
)
def test_bad_launch_flags(tmp_path, flags, message):
    """launch.py's own flags: argparse's usage error, exit code 2."""
    r = run(tmp_path / 'w', *flags)
    assert r.returncode == 2, r.stderr[-1500:]
    assert message in r.stderr


def test_unknown_stage():
    """A mistyped stage: one line with the closest command, exit code 2, no traceback."""
    r = launch('pretrian', '--config', 'configs/bert_mlm.py:tiny', '--workdir', '/tmp/x')
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "no command 'pretrian'; did you mean pretrain?" in r.stderr
