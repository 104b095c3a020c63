"""A run is never lost to its workdir: a failed start leaves the workdir as it found it,
`overwrite` checks the new run first and then moves the old one aside (a user's files stay
where they are), and a finished run continues to a larger `total_steps`."""

import json
import os
import shutil

import pytest

from configs import bert_mlm
from core import rundir
from core.errors import ConfigError
from tests.conftest import SMALL_RUN, launch, tree_digest

BASE = ['pretrain', '--config', 'configs/bert_mlm.py:tiny']
NOTES = 'notes.txt'


def run(workdir, *overrides):
    return launch(*BASE, '--workdir', str(workdir), *SMALL_RUN, *overrides)


@pytest.fixture(scope='module')
def finished(tmp_path_factory, pydoc_vocab):
    """A finished 2-step run with a linear decay and no warmup (tests copy it)."""
    workdir = tmp_path_factory.mktemp('finished') / 'run'
    r = run(workdir, *short(pydoc_vocab))
    assert r.returncode == 0, r.stderr[-2000:]
    return workdir


def short(vocab: str, steps: int = 2) -> list[str]:
    return [
        f'--config.data.vocab_file={vocab}',
        f'--config.total_steps={steps}',
        '--config.warmup_steps=0',
        '--config.checkpoint_every=2',
        '--config.eval_every=2',
    ]


def with_notes(source, target) -> str:
    """A copy of the run `source` at `target`, with a user's file in it."""
    shutil.copytree(source, target)
    (target / NOTES).write_text('my notes on this run\n')
    return target


def read_json(path):
    with open(path) as f:
        return json.load(f)


# --- a failed start leaves the workdir as it found it --------------------------------------


def test_a_refused_start_in_the_task_build_leaves_nothing(tmp_path, pydoc_vocab):
    """The vocabulary is checked in the task build; the value its message suggests then
    starts (it is not refused as 'a different config')."""
    workdir = tmp_path / 'w'
    r = run(workdir, *short(pydoc_vocab), '--config.model.vocab_size=512')
    assert r.returncode == 1, r.stderr[-2000:]
    assert '--config.model.vocab_size=1024' in r.stderr
    assert not workdir.exists()
    r = run(workdir, *short(pydoc_vocab), '--config.model.vocab_size=1024')
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_bad_data_path_leaves_the_workdir_as_found(tmp_path):
    workdir = tmp_path / 'w'
    workdir.mkdir()
    (workdir / NOTES).write_text('mine\n')
    before = tree_digest(workdir)
    r = run(workdir, '--config.data.files=/no/such/dir/*.txt')
    assert r.returncode == 1, r.stderr[-2000:]
    assert 'no files match' in r.stderr
    assert tree_digest(workdir) == before
    r = run(tmp_path / 'new' / 'run', '--config.data.files=/no/such/dir/*.txt')
    assert r.returncode == 1 and not (tmp_path / 'new').exists()


def test_a_workdir_that_cannot_hold_a_run_is_named(tmp_path):
    """A file, or a damaged config.json (its fix: the config saved with each checkpoint)."""
    c = bert_mlm.get_config('tiny')
    (tmp_path / 'file').write_text('')
    with pytest.raises(ConfigError, match='is a file; give a directory'):
        rundir.check_workdir(c, str(tmp_path / 'file'))
    (tmp_path / 'config.json').write_text(c.to_json()[:100])
    with pytest.raises(ConfigError, match='cannot be read .*checkpoints/<step>/config/metadata'):
        rundir.check_workdir(c, str(tmp_path))


# --- overwrite: checks first, then moves the old run aside ---------------------------------


def test_overwrite_with_a_bad_data_path_keeps_the_old_run(tmp_path, finished, pydoc_vocab):
    workdir = with_notes(finished, tmp_path / 'w')
    before = tree_digest(workdir)
    r = run(
        workdir,
        *short(pydoc_vocab),
        '--config.learning_rate=0.5',
        '--config.overwrite=true',
        '--config.data.files=/no/such/dir/*.txt',
    )
    assert r.returncode == 1, r.stderr[-2000:]
    assert 'no files match' in r.stderr
    assert tree_digest(workdir) == before


def test_overwrite_moves_the_old_run_aside_and_keeps_user_files(tmp_path, finished, pydoc_vocab):
    workdir = with_notes(finished, tmp_path / 'w')
    before = tree_digest(workdir)
    r = run(workdir, *short(pydoc_vocab), '--config.learning_rate=0.5', '--config.overwrite=true')
    assert r.returncode == 0, r.stderr[-2000:]
    (moved,) = os.listdir(workdir / 'previous')
    old_run = {k: v for k, v in before.items() if k != NOTES}
    assert tree_digest(workdir / 'previous' / moved) == old_run  # byte for byte
    assert f'previous/{moved}' in r.stderr
    assert tree_digest(workdir)[NOTES] == before[NOTES]
    assert read_json(workdir / 'config.json')['learning_rate'] == 0.5
    assert read_json(workdir / 'summary.json')['steps'] == 2


def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path):
    """A config.json that pretrax did not write (here a Hugging Face model's)."""
    model = tmp_path / 'hf_model'
    model.mkdir()
    (model / 'config.json').write_text('{"model_type": "bert", "hidden_size": 32}')
    (model / 'model.safetensors').write_bytes(b'\0' * 64)
    before = tree_digest(model)
    r = run(model, '--config.total_steps=1', '--config.overwrite=true')
    assert r.returncode == 1, r.stderr[-2000:]
    assert 'not the config of a pretrax run' in r.stderr
    assert tree_digest(model) == before


# --- a finished run continues to a larger total_steps --------------------------------------


def test_a_finished_run_continues_to_a_larger_total_steps(tmp_path, finished, pydoc_vocab):
    workdir = tmp_path / 'w'
    shutil.copytree(finished, workdir)
    r = run(workdir, *short(pydoc_vocab, steps=4))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f'resumed from {workdir}/checkpoints/2' in r.stderr
    # Linear decay from 2e-3 (the tiny preset's lr): it ended at step 2, now it ends at step 4.
    assert (
        'total_steps 2 -> 4: the linear learning-rate schedule now ends at step 4 (was 2)'
        in r.stderr
    )
    assert 'at step 2 the learning rate goes from 0 to 0.001' in r.stderr
    assert read_json(workdir / 'summary.json')['steps'] == 4
    assert read_json(workdir / 'config.json')['total_steps'] == 4
    with open(workdir / 'config_history.jsonl') as f:
        (change,) = [json.loads(line) for line in f]
    assert change['step'] == 2 and change['changed'] == {'total_steps': [2, 4]}
    with open(workdir / 'metrics.jsonl') as f:
        rows = [json.loads(line) for line in f]
    train = [r['step'] for r in rows if r['split'] == 'train']
    assert train == sorted(set(train)) and train[-1] == 4

    # Any other key still makes it another run, and the message names it and the fix.
    r = run(workdir, *short(pydoc_vocab, steps=4), '--config.learning_rate=0.5')
    assert r.returncode == 1, r.stderr[-2000:]
    assert 'holds a run with a different config (learning_rate: 0.002 -> 0.5)' in r.stderr
    assert 'total_steps' in r.stderr  # the keys that may change are named
