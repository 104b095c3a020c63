"""Throughput rows time training steps only, and the watchdog guards progress only:
compilation, evals and checkpoint saves are left out of both. A hung step exits 124 with
every thread's stack written where the user finds it."""

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest

from core import metrics as metrics_lib
from core import watchdog as watchdog_lib
from tests.conftest import ROOT, SMALL_RUN

EVAL_SLEEP = 3.0  # seconds each eval of the slow-eval run sleeps
WATCHDOG_SECS = 2  # shorter than an eval, and than compiling the first step here


def small_config(vocab: str, *overrides: str):
    """configs/bert_mlm.py:tiny with SMALL_RUN and `overrides` (--config.key=value)."""
    from configs import bert_mlm

    config = bert_mlm.get_config('tiny')
    for arg in (*SMALL_RUN, f'--config.data.vocab_file={vocab}', *overrides):
        key, value = arg[len('--config.') :].split('=', 1)
        *parents, leaf = key.split('.')
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = type(node[leaf])(value)
    return config


@pytest.fixture(scope='module')
def slow_eval_run(tmp_path_factory, pydoc_vocab):
    """A run whose evals sleep EVAL_SLEEP s, with watchdog_secs=WATCHDOG_SECS, in this process
    (os._exit patched so that a watchdog firing is recorded, not fatal): (workdir, exits)."""
    from core import trainer
    from pretrain import mlm

    workdir = str(tmp_path_factory.mktemp('slow_eval') / 'run')
    config = small_config(
        pydoc_vocab,
        '--config.total_steps=8',
        '--config.log_every=2',
        '--config.eval_every=4',
        '--config.checkpoint_every=4',
        f'--config.watchdog_secs={WATCHDOG_SECS}',
    )
    exits = []
    build = mlm.build

    def with_slow_eval(*args):
        task = build(*args)

        def evaluate(stepper, params):
            time.sleep(EVAL_SLEEP)
            return task.evaluate(stepper, params)

        return dataclasses.replace(task, evaluate=evaluate)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mlm, 'build', with_slow_eval)
        mp.setattr(os, '_exit', exits.append)
        trainer.train_and_evaluate(config, workdir, 'pretrain')
    return workdir, exits


def test_train_rows_leave_evals_and_saves_out_of_step_time(slow_eval_run):
    workdir, _ = slow_eval_run
    train = {r['step']: r for r in metrics_lib.read_metrics(workdir) if r['split'] == 'train'}
    assert sorted(train) == [2, 4, 6, 8]
    # Steps 5-6 come after the eval (and save) at step 4: that row's two steps would take
    # EVAL_SLEEP / 2 each if the eval counted; rows 4 and 8 have no eval in their interval.
    after_eval = train[6]['step_time_ms']
    assert after_eval < 1e3 * EVAL_SLEEP / 2 / 4, train[6]
    assert after_eval < 4 * max(train[4]['step_time_ms'], train[8]['step_time_ms']) + 100
    assert train[6]['examples_per_sec'] == pytest.approx(16 / (after_eval / 1e3))


def test_watchdog_does_not_fire_during_compilation_evals_or_saves(slow_eval_run):
    workdir, exits = slow_eval_run
    assert exits == []
    with open(os.path.join(workdir, 'summary.json')) as f:
        assert json.load(f)['completed']


def test_progress_clock_stops_while_paused_and_syncs_first():
    synced = []
    progress = metrics_lib.Progress(0, 10, sync=lambda: synced.append(time.perf_counter()))
    progress.start(1)
    time.sleep(0.05)
    with progress.paused():
        assert len(synced) == 1  # the steps before the pause are waited for
        time.sleep(0.5)
        with progress.paused():  # nested: no second sync
            pass
    assert len(synced) == 1
    per_step, eta = progress.update(3)
    assert per_step < 0.25 / 2  # 2 steps timed: 50 ms of clock, not the 500 ms pause
    assert eta > per_step * 7  # the ETA counts wall time, the pause included


def test_compile_listener_sees_a_recompile_on_this_thread_only():
    import threading

    import jax
    import jax.numpy as jnp

    events = []
    dispatched = [jnp.arange(3) + 1]  # the trainer's pending metrics, say
    progress = metrics_lib.Progress(0, 10, sync=lambda: jax.block_until_ready(dispatched))
    progress.start(0)

    def begin():  # as the trainer does: stop the clock (waiting for the device), then note
        progress.pause()
        events.append('begin')

    def end(seconds):
        events.append('end')
        progress.resume()

    listener = watchdog_lib.CompileListener(begin, end)
    try:
        f = jax.jit(lambda x: x * 2)
        f(jnp.ones(3))
        seen = len(events)
        f(jnp.ones(3))  # cached: nothing
        assert len(events) == seen
        f(jnp.ones(4))  # a new shape: a recompile
        other = threading.Thread(target=lambda: f(jnp.ones(5)))
        other.start()
        other.join()
    finally:
        listener.close()
    assert seen > 0 and len(events) > seen
    before = progress.seconds()
    time.sleep(0.01)
    assert progress.seconds() > before  # every pause ended: the clock runs again
    assert events.count('begin') == events.count('end')
    f(jnp.ones(6))
    assert events.count('begin') == events.count('end') == len(events) // 2  # closed


HANG = """
import dataclasses, sys, time
import launch
from pretrain import mlm

build = mlm.build

def stalled_input_pipeline():
    time.sleep(3600)

def batches(stream):
    for _ in range(3):
        yield next(stream)
    stalled_input_pipeline()

def with_stalling_input(*args):
    task = build(*args)
    return dataclasses.replace(task, train_iter=batches(task.train_iter))

mlm.build = with_stalling_input
sys.exit(launch.main(['pretrain', *sys.argv[1:]]))
"""


def test_a_hung_step_exits_124_and_writes_every_threads_stack(tmp_path, pydoc_vocab):
    workdir = str(tmp_path / 'hung')
    r = subprocess.run(
        [sys.executable, '-c', HANG, '--config', 'configs/bert_mlm.py:tiny', '--workdir',
         workdir, *SMALL_RUN, f'--config.data.vocab_file={pydoc_vocab}',
         '--config.total_steps=20', '--config.log_every=1', '--config.eval_every=100',
         f'--config.watchdog_secs={WATCHDOG_SECS}'],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT),
    )  # fmt: skip
    assert r.returncode == 124, r.stderr[-3000:]
    assert 'watchdog: no step finished in' in r.stderr
    assert 'while reading the batch of step 4' in r.stderr
    with open(os.path.join(workdir, 'watchdog_stacks.txt')) as f:
        stacks = f.read()
    assert 'stalled_input_pipeline' in stacks and 'MainThread' in stacks
    assert 'stalled_input_pipeline' in r.stderr  # the stacks are in the log too
