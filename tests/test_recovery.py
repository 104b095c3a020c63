"""Recovery: a resume past a damaged checkpoint, and a restart after kill -9.

A newest step that cannot be read (any part of it) is moved aside as
checkpoints/<step>.corrupt, kept as it was, and the run resumes from the older kept step,
ending with the parameters of an uninterrupted run. A restart after a kill before the
first checkpoint holds no step twice, in metrics.jsonl or TensorBoard.
"""

import asyncio
import gc
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from core import checkpoint
from core.errors import CheckpointError
from interop import workdir as wd
from tests.conftest import ROOT, SMALL_RUN, launch, tree_digest

STEPS = 4


def command(workdir, vocab: str, *extra: str) -> list[str]:
    return [
        'pretrain',
        '--config',
        'configs/bert_mlm.py:tiny',
        '--workdir',
        str(workdir),
        *SMALL_RUN,
        f'--config.data.vocab_file={vocab}',
        f'--config.total_steps={STEPS}',
        '--config.checkpoint_every=2',
        '--config.keep_checkpoints=2',
        '--config.eval_every=2',
        '--config.log_every=1',
        *extra,
    ]


@pytest.fixture(scope='module')
def finished(tmp_path_factory, pydoc_vocab):
    """A finished run keeping steps 2 and 4, cut into 2 data shards (so that 2 processes
    can resume it)."""
    workdir = tmp_path_factory.mktemp('recovery') / 'run'
    r = launch(*command(workdir, pydoc_vocab, '--config.data.shards=2'))
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']
    return workdir


def params(step_dir) -> list[np.ndarray]:
    """The parameters saved in a step, on one device whatever the layout that saved them."""
    return jax.tree.leaves(wd.saved_params(str(step_dir)))


def truncate_largest_array_file(step):
    files = [
        os.path.join(d, f) for d, _, fs in os.walk(step / 'state' / 'ocdbt.process_0') for f in fs
    ]
    largest = max(files, key=os.path.getsize)
    with open(largest, 'r+b') as f:
        f.truncate(os.path.getsize(largest) // 2)


def garbage(path):
    def damage(step):
        (step / path).write_text('{"not": json')

    return damage


def empty(step):
    shutil.rmtree(step)
    step.mkdir()


DAMAGE = {
    'state arrays truncated': truncate_largest_array_file,
    'state metadata garbage': garbage('state/_METADATA'),
    'state item missing': lambda step: shutil.rmtree(step / 'state'),
    'data-iterator state garbage': garbage('data/process_0-of-1.json'),
    'saved config garbage': garbage('config/metadata'),
    'empty step directory': empty,
}


def check_resumed_from_2(workdir, r, damaged: dict, expected: list) -> None:
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'Traceback' not in r.stderr
    assert 'checkpoint step 4 cannot be read' in r.stderr
    assert f'moved aside to {workdir}/checkpoints/4.corrupt' in r.stderr
    assert f'resumed from {workdir}/checkpoints/2' in r.stderr
    assert tree_digest(workdir / 'checkpoints' / '4.corrupt') == damaged  # kept as it was
    for a, b in zip(params(workdir / 'checkpoints' / '4'), expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    with open(workdir / 'metrics.jsonl') as f:
        rows = [json.loads(line) for line in f]
    for split in ('train', 'eval'):
        steps = [r['step'] for r in rows if r['split'] == split]
        assert steps == sorted(set(steps)), (split, steps)


@pytest.mark.parametrize('damage', list(DAMAGE))
def test_a_damaged_newest_step_is_moved_aside_and_the_run_resumes(
    tmp_path, finished, pydoc_vocab, damage
):
    workdir = tmp_path / 'w'
    shutil.copytree(finished, workdir)
    expected = params(workdir / 'checkpoints' / '4')  # the uninterrupted run's
    DAMAGE[damage](workdir / 'checkpoints' / '4')
    damaged = tree_digest(workdir / 'checkpoints' / '4')
    r = launch(*command(workdir, pydoc_vocab, '--config.data.shards=2'))
    check_resumed_from_2(workdir, r, damaged, expected)


def test_saved_steps_are_the_steps_orbax_would_restore_damaged_or_not(tmp_path):
    """Every finished step directory, readable or not (recovery moves the damaged ones
    aside); not a save in flight, a step moved aside, or anything else in checkpoints/."""
    directory = tmp_path / 'checkpoints'
    for name in ('2/state', '12', '30.orbax-checkpoint-tmp-1700000000', '4.corrupt', 'old_7'):
        (directory / name).mkdir(parents=True)
    (directory / '9').write_text('a file, not a step')
    assert checkpoint.saved_steps(str(directory)) == [2, 12]
    assert checkpoint.saved_steps(str(tmp_path / 'none')) == []
    assert checkpoint.resolve_checkpoint(str(tmp_path)) == (str(directory), 12)
    with pytest.raises(CheckpointError, match=r'kept steps: \[2, 12\]'):
        wd.checkpoint_path(str(tmp_path), 3)


def test_the_leftover_reads_of_a_failed_restore_log_nothing(caplog):
    """A failed Orbax read leaves sibling reads whose exceptions nobody retrieves: asyncio
    logs each (a Task's, a gather's _GatheringFuture's) with a full traceback after the
    failure was reported once. Those are dropped; any other unretrieved failure is not."""
    checkpoint._FailedReadLeftovers.install()

    async def read(message):
        raise Exception(message)

    async def main(message):
        futures = [asyncio.gather(read(message)), asyncio.ensure_future(read(message))]
        await asyncio.sleep(0.01)
        futures.clear()  # never retrieved
        gc.collect()

    with caplog.at_level(logging.ERROR, logger='asyncio'):
        asyncio.run(main('Encountered error while reading array index: (slice(0, 32, 1),)'))
        gc.collect()
        assert 'never retrieved' not in caplog.text
        asyncio.run(main('an unrelated failure'))
        gc.collect()
    assert '_GatheringFuture exception was never retrieved' in caplog.text
    assert 'Task exception was never retrieved' in caplog.text


def test_no_readable_step_says_so_and_moves_nothing(tmp_path, finished, pydoc_vocab):
    workdir = tmp_path / 'w'
    shutil.copytree(finished, workdir)
    truncate_largest_array_file(workdir / 'checkpoints' / '4')
    garbage('data/process_0-of-1.json')(workdir / 'checkpoints' / '2')
    before = tree_digest(workdir)
    r = launch(*command(workdir, pydoc_vocab, '--config.data.shards=2'))
    assert r.returncode == 1, r.stderr[-3000:]
    assert 'Traceback' not in r.stderr
    assert f'no checkpoint in {workdir}/checkpoints can be read' in r.stderr
    assert 'step 4: train state: OUT_OF_RANGE' in r.stderr  # tensorstore's cause, not Orbax's
    assert 'step 2: data-iterator state: ' in r.stderr
    assert 'process_0-of-1.json is not a JSON data state (Expecting value' in r.stderr
    assert '--config.overwrite=true' in r.stderr
    # Nothing moved or changed; log.txt, the run's log, only gained this start's lines.
    after = tree_digest(workdir)
    assert after.pop('log.txt') != before.pop('log.txt') and after == before
    with open(workdir / 'log.txt') as f:
        assert 'the run stopped: CheckpointError' in f.read()


def test_two_processes_agree_on_the_step_they_resume(tmp_path, finished, pydoc_vocab):
    """Each process reads the step (its own shards of it); the step they resume is the
    newest every process read. Here both fail on the damaged step alike: a failure on one
    process only is not staged, it takes the same path (an allgather of the outcome)."""
    workdir = tmp_path / 'w'
    shutil.copytree(finished, workdir)
    expected = params(workdir / 'checkpoints' / '4')
    truncate_largest_array_file(workdir / 'checkpoints' / '4')
    damaged = tree_digest(workdir / 'checkpoints' / '4')
    r = launch(*command(workdir, pydoc_vocab, '--config.data.shards=2'), '--local_processes', '2')
    check_resumed_from_2(workdir, r, damaged, expected)
    assert r.stderr.count(f'resumed from {workdir}/checkpoints/2') == 2  # both processes


# --- kill -9 before the first checkpoint --------------------------------------------------------


def tensorboard_events(directory) -> list:
    """The events of every file in `directory`, in the order written (TFRecord framing: a
    length, its CRC, the record, its CRC); a record cut short by a kill ends a file."""
    from tensorboardX.proto import event_pb2

    events = []
    for name in sorted(os.listdir(directory), key=lambda n: float(n.split('.')[3])):
        with open(os.path.join(directory, name), 'rb') as f:
            data = f.read()
        i = 0
        while i + 12 <= len(data):
            (n,) = struct.unpack('<Q', data[i : i + 8])
            if i + 12 + n + 4 > len(data):
                break
            events.append(event_pb2.Event.FromString(data[i + 12 : i + 12 + n]))
            i += 12 + n + 4
    return events


def tensorboard_scalars(directory) -> list[tuple[str, int]]:
    """(tag, step) of the scalars TensorBoard shows: a SessionLog START at step s hides the
    earlier events at steps >= s (how TensorBoard reads a restarted run)."""
    from tensorboardX.proto import event_pb2

    shown = []
    for event in tensorboard_events(directory):
        if event.session_log.status == event_pb2.SessionLog.START:
            shown = [(tag, step) for tag, step in shown if step < event.step]
        for value in event.summary.value:
            shown.append((value.tag, event.step))
    return shown


def test_kill_before_the_first_checkpoint_then_restart_holds_no_step_twice(tmp_path, pydoc_vocab):
    workdir = tmp_path / 'w'
    long = ['--config.total_steps=600', '--config.checkpoint_every=600']
    long += ['--config.eval_every=600']
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
    with open(tmp_path / 'log', 'w') as log:
        proc = subprocess.Popen(
            [sys.executable, 'launch.py', *command(workdir, pydoc_vocab, *long)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    metrics, tensorboard = workdir / 'metrics.jsonl', workdir / 'tensorboard'
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # steps 0-3 on disk, both kinds
        if metrics.exists() and '"step": 3,' in metrics.read_text() and tensorboard.exists():
            if ('train/loss', 3) in tensorboard_scalars(tensorboard):
                break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, 'the run ended before it could be killed'
    assert not [d for d in os.listdir(workdir / 'checkpoints') if d.isdigit()]

    r = launch(*command(workdir, pydoc_vocab, *long))
    assert r.returncode == 0, r.stderr[-3000:]
    with open(metrics) as f:
        rows = [json.loads(line) for line in f]
    for split in ('train', 'eval'):
        steps = [r['step'] for r in rows if r['split'] == split]
        assert steps == sorted(set(steps)), (split, steps[:10])
    assert [r['step'] for r in rows if r['split'] == 'eval'] == [0, 600]
    scalars = tensorboard_scalars(tensorboard)
    assert len(scalars) == len(set(scalars)), 'TensorBoard shows a step twice'
    assert ('train/loss', 3) in scalars


class _Stream:
    """A data iterator as the checkpointer sees it: a state to save and set."""

    def __init__(self):
        self.state = {'version': 1, 'num_shards': 1, 'shards': {'0': {'position': 3}}}

    def get_state(self):
        return self.state

    def set_state(self, state):
        self.state = state


def test_a_train_state_of_another_layout_is_named_as_such(tmp_path):
    """A step whose optimizer state is laid out otherwise than the run's (another
    optimizer's) cannot be resumed: the error says so and what its parameters still serve,
    and nothing moves."""
    saver = checkpoint.Checkpointer(str(tmp_path), every=1, keep=2, async_save=False)
    w = jnp.ones(3)
    earlier = {'params': {'head': w, 'frozen': w}, 'opt_state': {'mu': {'head': w, 'frozen': w}}}
    saver.save(1, earlier, _Stream(), ml_collections.ConfigDict({'seed': 0}), force=True)
    saver.close()
    now = {'params': {'head': w, 'frozen': w}, 'opt_state': {'mu': {'head': w}}}
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), now
    )
    reader = checkpoint.Checkpointer(str(tmp_path), every=1, keep=2, async_save=False)
    with pytest.raises(CheckpointError, match='laid out otherwise than this run') as e:
        reader.restore_latest(target, _Stream())
    assert '--config.init_from and launch.py evaluate' in str(e.value)
    assert os.listdir(tmp_path / 'checkpoints') == ['1']
    reader.close()


def test_a_frozen_run_of_an_earlier_pretrax_resumes(tmp_path, monkeypatch, pydoc_vocab):
    """A linear probe checkpointed by pretrax before 2026-11-30, whose optimizer kept Adam's
    moments for the frozen encoder, resumes with this code (the head's moments carried
    over, the encoder's zeros dropped) and ends bit for bit as the run that never
    stopped."""
    import orbax.checkpoint as ocp

    from configs import text_cls
    from core import optim, trainer

    def config():
        c = text_cls.get_config('tiny')
        c.model.update(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64, vocab_size=1024)
        c.data.update(seq_len=32, vocab_file=pydoc_vocab)
        c.update(batch_size=8, total_steps=4, warmup_steps=1, eval_every=2, checkpoint_every=2)
        c.transfer.freeze_backbone = True
        return c

    def saved(workdir, step):
        return ocp.StandardCheckpointer().restore(
            os.path.join(workdir, 'checkpoints', step, 'state')
        )

    size = lambda tree: sum(x.size for x in jax.tree.leaves(tree) if np.ndim(x))
    straight = str(tmp_path / 'straight')
    trainer.train_and_evaluate(config(), straight, 'finetune')
    earlier = str(tmp_path / 'earlier')
    make = optim.make_optimizer
    with monkeypatch.context() as m:  # the optimizer of before: state for every parameter
        m.setattr(optim, 'make_optimizer', lambda c, frozen_state=False: make(c, frozen_state=True))
        trainer.train_and_evaluate(config(), earlier, 'finetune')
    shutil.rmtree(os.path.join(earlier, 'checkpoints', '4'))  # cut off after step 2
    state = saved(earlier, '2')
    assert size(state['opt_state']) == 2 * size(state['params'])  # the earlier layout

    summary = trainer.train_and_evaluate(config(), earlier, 'finetune')
    assert summary['completed'] and summary['steps'] == 4
    resumed, uninterrupted = saved(earlier, '4'), saved(straight, '4')
    head = size(resumed['params']['head'])
    assert size(resumed['opt_state']) == 2 * head  # now the head's moments alone
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
