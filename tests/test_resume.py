"""Kill -9 a run in the middle of an asynchronous checkpoint save and start it again: the
half-written step is ignored, the run resumes from the last complete one with its data
iterator, and the curve and final parameters equal those of an uninterrupted run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.conftest import ROOT, SMALL_RUN, launch

STEPS, EVERY = 60, 20
# A state of ~20 MB: its save stays in flight for a few hundred milliseconds.
WIDER = ['--config.model.hidden_size=256', '--config.model.mlp_dim=1024']


def command(workdir: str, vocab: str) -> list[str]:
    return [
        'pretrain',
        '--config',
        'configs/bert_mlm.py:tiny',
        '--workdir',
        workdir,
        *SMALL_RUN,
        *WIDER,
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


def start_until(workdir: str, vocab: str, path: str) -> subprocess.Popen:
    """Starts the run in the background; returns as soon as WORKDIR/checkpoints/PATH exists.
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
    target = os.path.join(workdir, 'checkpoints', path)
    deadline = time.time() + 300
    while not os.path.exists(target) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.001)
    return proc


def start_until_first_checkpoint(workdir: str, vocab: str) -> subprocess.Popen:
    return start_until(workdir, vocab, os.path.join(str(EVERY), 'state'))


def test_kill_during_async_save_resumes_from_last_complete_step(tmp_path, pydoc_vocab):
    straight, killed = str(tmp_path / 'straight'), str(tmp_path / 'killed')
    r = launch(*command(straight, pydoc_vocab))
    assert r.returncode == 0, r.stderr[-3000:]

    # Orbax writes step 40 into 40.orbax-checkpoint-tmp and renames it when complete.
    in_flight = f'{2 * EVERY}.orbax-checkpoint-tmp'
    proc = start_until(killed, pydoc_vocab, in_flight)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, 'the run ended before it could be killed'
    left = sorted(os.listdir(os.path.join(killed, 'checkpoints')))
    assert left == [str(EVERY), in_flight], f'not killed mid-save: {left}'

    r = launch(*command(killed, pydoc_vocab))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f'resumed from {killed}/checkpoints/{EVERY}' in r.stderr
    assert in_flight not in os.listdir(os.path.join(killed, 'checkpoints'))

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


@pytest.mark.slow  # a minute: two processes of the wider model, then a resume
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path, pydoc_vocab):
    """A preemption notice that reaches one host only: both save the same step, exit 0."""
    workdir = str(tmp_path / 'two')
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        address = f'127.0.0.1:{sock.getsockname()[1]}'
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
    logs = [workdir + f'.{i}.log' for i in range(2)]
    procs = []
    for i in range(2):
        with open(logs[i], 'w') as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, 'launch.py', *command(workdir, pydoc_vocab)]
                    + ['--coordinator_address', address, '--num_processes', '2']
                    + ['--process_id', str(i)],
                    cwd=ROOT,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )
            )
    first = os.path.join(workdir, 'checkpoints', str(EVERY), 'state')
    deadline = time.time() + 300
    while not os.path.isdir(first) and time.time() < deadline and procs[1].poll() is None:
        time.sleep(0.01)
    procs[1].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=300) for p in procs]
    stderr = [open(log).read() for log in logs]
    assert codes == [0, 0], [s[-2000:] for s in stderr]
    saved = max(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())
    assert EVERY < saved < STEPS
    for s in stderr:
        assert f'SIGTERM: saved step {saved}' in s

    r = launch(*command(workdir, pydoc_vocab), '--local_processes', '2')
    assert r.returncode == 0, r.stderr[-2000:]
    with open(os.path.join(workdir, 'summary.json')) as f:
        assert json.load(f)['steps'] == STEPS
