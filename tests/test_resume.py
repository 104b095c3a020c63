"""Kill -9 a run after a checkpoint and start it again: the curve continues and the final
parameters equal those of an uninterrupted run with the same seed."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from tests.conftest import ROOT, SMALL_RUN, launch

STEPS, EVERY = 120, 20


def command(workdir: str, vocab: str) -> list[str]:
    return [
        'pretrain',
        '--config',
        'configs/bert_mlm.py:tiny',
        '--workdir',
        workdir,
        *SMALL_RUN,
        f'--config.data.vocab_file={vocab}',
        f'--config.total_steps={STEPS}',
        f'--config.checkpoint_every={EVERY}',
        f'--config.eval_every={EVERY}',
        '--config.log_every=10',
        '--config.keep_checkpoints=10',
    ]


def final_params(workdir: str):
    path = os.path.join(workdir, 'checkpoints', str(STEPS), 'state')
    return ocp.StandardCheckpointer().restore(path)['params']


def train_rows(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if r['split'] == 'train']


def test_kill_and_resume_matches_uninterrupted(tmp_path, pydoc_vocab):
    straight, killed = str(tmp_path / 'straight'), str(tmp_path / 'killed')
    r = launch(*command(straight, pydoc_vocab))
    assert r.returncode == 0, r.stderr[-3000:]

    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
    proc = subprocess.Popen(
        [sys.executable, 'launch.py', *command(killed, pydoc_vocab)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first_ckpt = os.path.join(killed, 'checkpoints', str(EVERY), 'state')
    deadline = time.time() + 300
    while not os.path.isdir(first_ckpt) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, 'the run ended before it could be killed'
    done = [int(d) for d in os.listdir(os.path.join(killed, 'checkpoints')) if d.isdigit()]
    assert max(done) < STEPS, done

    r = launch(*command(killed, pydoc_vocab))
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'resumed from' in r.stderr

    a, b = final_params(straight), final_params(killed)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)

    rows_a, rows_b = train_rows(straight), train_rows(killed)
    steps_b = [r['step'] for r in rows_b]
    assert steps_b == sorted(set(steps_b)), 'the resumed curve repeats or skips steps'
    loss_a = {r['step']: r['loss'] for r in rows_a}
    for row in rows_b:
        if row['step'] in loss_a and row['step'] > 10:  # after the first logged interval
            assert abs(row['loss'] - loss_a[row['step']]) < 1e-5, row['step']
