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


def start_until_first_checkpoint(workdir: str, vocab: str) -> subprocess.Popen:
    """Starts the run in the background; returns once its first checkpoint is complete.
    Its log goes to WORKDIR.log (a pipe nobody reads could fill up and stall the run)."""
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
    with open(workdir + '.log', 'w') as log:
        proc = subprocess.Popen(
            [sys.executable, 'launch.py', *command(workdir, vocab)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    first_ckpt = os.path.join(workdir, 'checkpoints', str(EVERY), 'state')
    deadline = time.time() + 300
    while not os.path.isdir(first_ckpt) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    return proc


def test_kill_and_resume_matches_uninterrupted(tmp_path, pydoc_vocab):
    straight, killed = str(tmp_path / 'straight'), str(tmp_path / 'killed')
    r = launch(*command(straight, pydoc_vocab))
    assert r.returncode == 0, r.stderr[-3000:]

    proc = start_until_first_checkpoint(killed, pydoc_vocab)
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


def test_sigterm_saves_and_exits_zero(tmp_path, pydoc_vocab):
    """Preemption: SIGTERM finishes the step, saves it, exits 0; the next start resumes."""
    workdir = str(tmp_path / 'preempted')
    proc = start_until_first_checkpoint(workdir, pydoc_vocab)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    with open(workdir + '.log') as f:
        stderr = f.read()
    assert proc.returncode == 0, stderr[-2000:]
    saved = [int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit()]
    assert EVERY < max(saved) < STEPS, saved  # saved where it stopped, off the schedule
    assert f'SIGTERM: saved step {max(saved)}' in stderr
    assert not os.path.exists(os.path.join(workdir, 'summary.json'))

    r = launch(*command(workdir, pydoc_vocab))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f'checkpoints/{max(saved)}' in r.stderr
    with open(os.path.join(workdir, 'summary.json')) as f:
        assert json.load(f)['steps'] == STEPS


def test_watchdog_exits_124_when_no_step_finishes(tmp_path, pydoc_vocab):
    """1 s is shorter than compiling the first step: the watchdog must fire, with its code."""
    r = launch(*command(str(tmp_path / 'hung'), pydoc_vocab), '--config.watchdog_secs=1')
    assert r.returncode == 124, r.stderr[-2000:]
    assert 'watchdog: no step finished in' in r.stderr
