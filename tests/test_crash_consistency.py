"""Crash consistency, by repetition: a small MLM run is killed with SIGKILL at 20 moments
drawn from a seeded plan (during start-up and restore, training steps, asynchronous
checkpoint saves and evals) and restarted after each. Every restart resumes from the newest
complete checkpoint, metrics.jsonl never holds a step twice, no step is ever found
unreadable, and the run ends with the parameters and the loss curve of an uninterrupted run.

Cost: each restart pays Python and JAX start-up; compilations come from a persistent JAX
cache in the test's directory (warmed by the uninterrupted run), so a restart reaches its
first step in a few seconds. The plan mixes cheap kills during start-up with kills deep in
the run.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from interop import workdir as wd
from tests.conftest import ROOT, SMALL_RUN

KILLS = 20
SEED = 18
STEPS, SAVE_EVERY, EVAL_EVERY = 80, 5, 7
KINDS = ('start-up', 'step', 'save', 'eval')


def command(workdir: str, vocab: str) -> list[str]:
    return [
        sys.executable,
        'launch.py',
        'pretrain',
        '--config',
        'configs/bert_mlm.py:tiny',
        '--workdir',
        workdir,
        *SMALL_RUN,
        f'--config.data.vocab_file={vocab}',
        f'--config.total_steps={STEPS}',
        f'--config.checkpoint_every={SAVE_EVERY}',
        f'--config.eval_every={EVAL_EVERY}',
        '--config.log_every=1',
        '--config.keep_checkpoints=2',
    ]


def environment(cache: str) -> dict:
    """Every process compiles through one persistent cache: a restart loads its steps."""
    return dict(
        os.environ,
        JAX_PLATFORMS='cpu',
        PYTHONPATH=ROOT,
        JAX_COMPILATION_CACHE_DIR=cache,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1',
    )


def complete_steps(workdir: str) -> list[int]:
    directory = os.path.join(workdir, 'checkpoints')
    if not os.path.isdir(directory):
        return []
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def rows(workdir: str) -> list[dict]:
    path = os.path.join(workdir, 'metrics.jsonl')
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def check_no_step_twice(workdir: str, when: str) -> None:
    found = rows(workdir)
    for split in ('train', 'eval'):
        steps = [r['step'] for r in found if r['split'] == split]
        assert steps == sorted(set(steps)), f'{when}: {split} steps {steps}'


class Watch:
    """What a restarted process has written since it truncated metrics.jsonl (a start
    rewrites it with os.replace, so a new inode marks rows of this process)."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, 'metrics.jsonl')
        self.inode = self._inode()

    def _inode(self):
        try:
            return os.stat(self.path).st_ino
        except FileNotFoundError:
            return None

    def train_steps(self) -> set[int]:
        inode = self._inode()
        if inode is None or inode == self.inode:
            return set()
        try:
            with open(self.path) as f:
                lines = f.readlines()
        except FileNotFoundError:
            return set()
        return {
            json.loads(line)['step']
            for line in lines
            if line.endswith('\n') and '"split": "train"' in line
        }


def plan(rng: random.Random) -> list[tuple[str, float]]:
    """KILLS (kind, parameter) pairs: every kind at least 4 times, in a seeded order."""
    kinds = [k for k in KINDS for _ in range(4)]
    kinds += rng.choices(KINDS, k=KILLS - len(kinds))
    rng.shuffle(kinds)
    return [(k, rng.random()) for k in kinds]


def kill_at(proc, workdir: str, kind: str, u: float, resume: int) -> str:
    """Waits for the moment `kind` (u in [0, 1) places it) and kills `proc` there; returns
    what the moment was."""
    watch = Watch(workdir)
    target = {
        'start-up': 0.2 + 3.5 * u,  # seconds: imports, data, restore, compilation
        'step': resume + 1 + int(u * 2 * SAVE_EVERY),
        # the eval of a step runs right after its train row is written
        'eval': (resume // EVAL_EVERY + 1 + int(u * 2)) * EVAL_EVERY,
        'save': (resume // SAVE_EVERY + 1 + int(u * 2)) * SAVE_EVERY,
    }[kind]
    if kind != 'start-up':  # near the end: the last such moment of the run
        target = min(target, STEPS // EVAL_EVERY * EVAL_EVERY if kind == 'eval' else STEPS)
    in_flight = os.path.join(workdir, 'checkpoints', f'{target}.orbax-checkpoint-tmp')
    stale = os.path.exists(in_flight)  # left by the last kill: this start cleans it up first
    started = time.time()
    while True:
        if kind == 'start-up' and time.time() - started >= target:
            what = 'start-up'
        elif kind in ('step', 'eval') and target in watch.train_steps():
            what = f'{kind} after the train row of step {target}'
        elif kind == 'save' and os.path.exists(in_flight) and not stale:
            what = f'save of step {target} in flight'
        elif proc.poll() is not None:
            # Late in the run (or resumed after the last moment of this kind) the run may
            # finish first: then it must have finished cleanly, with its last checkpoint.
            assert proc.returncode == 0 and STEPS in complete_steps(workdir), (
                f'the run ended (code {proc.returncode}) before the {kind} kill at {target}'
            )
            return f'none: the run resumed at step {resume} and finished before the {kind} kill'
        elif time.time() - started > 240:
            raise AssertionError(f'no {kind} moment ({target}) within 240s')
        else:
            stale = stale and os.path.exists(in_flight)
            time.sleep(0.002)
            continue
        break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return f'{what} ({time.time() - started:.1f}s after the start)'


def final_params(workdir: str):
    return jax.tree.leaves(wd.saved_params(os.path.join(workdir, 'checkpoints', str(STEPS))))


def test_twenty_kills_and_restarts_end_as_an_uninterrupted_run(tmp_path, pydoc_vocab):
    env = environment(str(tmp_path / 'jax-cache'))
    straight, killed = str(tmp_path / 'straight'), str(tmp_path / 'killed')
    began = time.time()
    r = subprocess.run(
        command(straight, pydoc_vocab), cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-3000:]
    print(f'\nuninterrupted run: {time.time() - began:.1f}s')

    moments, resumes = [], []
    for i, (kind, u) in enumerate(plan(random.Random(SEED))):
        kept = complete_steps(killed)
        resume = max(kept, default=0)
        log = tmp_path / f'restart{i}.log'
        with open(log, 'w') as stderr:
            proc = subprocess.Popen(
                command(killed, pydoc_vocab),
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        moments.append(kill_at(proc, killed, kind, u, resume))
        text = log.read_text()
        if 'resumed from' in text:  # got that far: from the newest complete step
            assert f'resumed from {killed}/checkpoints/{resume}\n' in text, (moments, text[-2000:])
            resumes.append(resume)
        assert 'cannot be read' not in text, (moments, text[-3000:])
        assert not [d for d in os.listdir(os.path.join(killed, 'checkpoints')) if 'corrupt' in d]
        check_no_step_twice(killed, f'after kill {i + 1} ({moments[-1]})')

    began = time.time()
    r = subprocess.run(
        command(killed, pydoc_vocab), cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-3000:]
    moments.append(f'last restart: to the end in {time.time() - began:.1f}s')
    assert 'cannot be read' not in r.stderr
    print('\n'.join(moments))
    assert len(resumes) >= KILLS // 2, moments  # most restarts got as far as resuming
    check_no_step_twice(killed, 'at the end')

    for a, b in zip(final_params(straight), final_params(killed), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    expected = {(r['split'], r['step']): r for r in rows(straight) if r['split'] != 'test'}
    got = {(r['split'], r['step']): r for r in rows(killed)}
    assert sorted(got) == sorted(expected)  # every train and eval row, once
    for key, row in got.items():
        for name in ('loss', 'mlm_accuracy', 'mlm_loss'):
            if name in row:
                assert abs(row[name] - expected[key][name]) < 1e-5, (key, name)


def test_a_metrics_row_cut_short_is_left_out_on_restart(tmp_path):
    """A machine crash or a full disk can leave half a row at the end of metrics.jsonl:
    the next start drops it (with a warning) instead of failing to read the file."""
    from core import metrics

    path = tmp_path / 'metrics.jsonl'
    path.write_text('{"step": 0, "split": "eval", "x": 1.0}\n{"step": 1, "split": "tr')
    writer = metrics.MetricWriter(str(tmp_path))
    writer.truncate_after(5)
    writer.write(1, 'train', {'loss': 2.0})
    writer.close()
    assert [(r['step'], r['split']) for r in metrics.read_metrics(str(tmp_path))] == [
        (0, 'eval'),
        (1, 'train'),
    ]
