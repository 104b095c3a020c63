"""`init_from` starts a run from another run's parameters (continued pretraining), and a
half-written checkpoint directory left by a crash is ignored on restart."""

import json
import os

from tests.conftest import SMALL_RUN, launch


def run(workdir, vocab, *overrides):
    return launch(
        'pretrain',
        '--config',
        'configs/bert_mlm.py:tiny',
        '--workdir',
        str(workdir),
        *SMALL_RUN,
        f'--config.data.vocab_file={vocab}',
        '--config.eval_every=5',
        '--config.log_every=5',
        '--config.checkpoint_every=5',
        *overrides,
    )


def eval_rows(workdir) -> list[dict]:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        return [r for r in map(json.loads, f) if r['split'] == 'eval']


def test_init_from_continues_from_the_parameters(tmp_path, pydoc_vocab):
    first, second = tmp_path / 'first', tmp_path / 'second'
    r = run(first, pydoc_vocab, '--config.total_steps=10')
    assert r.returncode == 0, r.stderr[-2000:]
    r = run(second, pydoc_vocab, '--config.total_steps=5', f'--config.init_from={first}')
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'initialised params from' in r.stderr
    # Same eval data: the second run starts exactly where the first one ended.
    end_of_first = eval_rows(first)[-1]
    start_of_second = eval_rows(second)[0]
    assert start_of_second['step'] == 0
    assert abs(start_of_second['mlm_loss'] - end_of_first['mlm_loss']) < 1e-5
    # ... and not where a fresh model starts.
    assert abs(eval_rows(first)[0]['mlm_loss'] - end_of_first['mlm_loss']) > 1e-2


def test_half_written_checkpoint_is_ignored(tmp_path, pydoc_vocab):
    workdir = tmp_path / 'run'
    r = run(workdir, pydoc_vocab, '--config.total_steps=10')
    assert r.returncode == 0, r.stderr[-2000:]
    # What a crash during the save of step 10 leaves: the step still in its temporary
    # directory, never renamed; step 5 is the last complete one.
    checkpoints = workdir / 'checkpoints'
    (checkpoints / '10').rename(checkpoints / '10.orbax-checkpoint-tmp')
    (checkpoints / '10.orbax-checkpoint-tmp' / 'state' / 'garbage').write_bytes(b'\0' * 100)
    r = run(workdir, pydoc_vocab, '--config.total_steps=10')
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'resumed from' in r.stderr and '/checkpoints/5' in r.stderr
    assert sorted(os.listdir(checkpoints)) == ['10', '5']  # temporary directory cleaned up
    assert [r['step'] for r in eval_rows(workdir)] == [0, 5, 10]
