"""One run, many topologies: MLM trained on 1 device, on 1 process x 8 devices and on 2
processes x 4 devices gives the same losses and parameters; a checkpoint written on 8
devices (fsdp=8) resumes on 4 (fsdp=2 x data=2) and then on 1, and one written by 2
processes resumes in 1 and back in 2, each continuing the same loss curve (dropout on).

Every run cuts its data into 2 shards (data.shards=2), so the global batch of each step is
the same whatever the process count. A resume is made deterministic by rewinding a finished
run to a checkpoint: deleting the later steps is exactly what a job preempted there leaves.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from core import checkpoint as ckpt_lib
from tests.conftest import SMALL_RUN, launch

STEPS, EVERY = 12, 4


def run(workdir: str, vocab: str | None, devices: int = 1, processes: int = 1, *extra: str) -> str:
    """Runs (or resumes) the MLM run in `workdir` on `processes` x `devices`; returns stderr.
    `vocab` None: the run trains its own vocabulary."""
    args = [
        'pretrain',
        '--config',
        'configs/bert_mlm.py:tiny',
        '--workdir',
        workdir,
        *SMALL_RUN,
        *([f'--config.data.vocab_file={vocab}'] if vocab else []),
        '--config.data.shards=2',
        f'--config.total_steps={STEPS}',
        f'--config.checkpoint_every={EVERY}',
        f'--config.eval_every={STEPS}',
        '--config.log_every=1',
        '--config.keep_checkpoints=5',
        *extra,
    ]
    if processes > 1:
        args += ['--local_processes', str(processes)]
    env = {'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
    r = launch(*args, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f'{devices * processes} devices, {processes} processes' in r.stderr, r.stderr[-2000:]
    return r.stderr


def rewind(workdir: str, step: int) -> None:
    """Leaves the run as a preemption after checkpoint `step` would: later steps gone."""
    directory = os.path.join(workdir, 'checkpoints')
    for name in os.listdir(directory):
        if name.isdigit() and int(name) > step:
            shutil.rmtree(os.path.join(directory, name))
    os.remove(os.path.join(workdir, 'summary.json'))


def losses(workdir: str) -> dict[int, float]:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        rows = [json.loads(line) for line in f]
    train = [r for r in rows if r['split'] == 'train']
    steps = [r['step'] for r in train]
    assert steps == list(range(1, STEPS + 1)), steps  # no step repeated or skipped
    return {r['step']: r['loss'] for r in train}


def final_params(workdir: str):
    """The last step's params, onto this process's one device (whatever mesh saved them)."""
    saved = ckpt_lib.saved_params_metadata(workdir)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved)
    params, step = ckpt_lib.restore_params(workdir, target)
    assert step == STEPS
    return params


def assert_same_run(workdir: str, reference: str) -> None:
    got, ref = losses(workdir), losses(reference)
    for step in ref:
        assert abs(got[step] - ref[step]) < 1e-4 * max(1.0, abs(ref[step])), (step, got, ref)
    assert abs(ref[STEPS] - ref[1]) > 1e-2  # it trained
    a, b = final_params(workdir), final_params(reference)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope='module')
def reference(tmp_path_factory, pydoc_vocab) -> str:
    workdir = str(tmp_path_factory.mktemp('topology') / 'one_device')
    run(workdir, pydoc_vocab)
    return workdir


def test_two_processes_and_eight_devices_train_like_one_device(tmp_path, reference, pydoc_vocab):
    eight = str(tmp_path / 'eight')
    run(eight, pydoc_vocab, 8, 1, '--config.mesh.data=2', '--config.mesh.fsdp=4')
    assert_same_run(eight, reference)
    two = str(tmp_path / 'two_by_four')
    run(two, pydoc_vocab, 4, 2)
    assert_same_run(two, reference)


def test_checkpoint_of_8_devices_resumes_on_4_then_on_1(tmp_path, reference, pydoc_vocab):
    workdir = str(tmp_path / 'resharded')
    run(workdir, pydoc_vocab, 8, 1, '--config.mesh.fsdp=8', '--config.mesh.data=1')
    rewind(workdir, EVERY)
    stderr = run(workdir, pydoc_vocab, 4, 1, '--config.mesh.fsdp=2', '--config.mesh.data=2')
    assert f'resumed from {workdir}/checkpoints/{EVERY}' in stderr
    rewind(workdir, 2 * EVERY)
    stderr = run(workdir, pydoc_vocab, 1, 1)
    assert f'resumed from {workdir}/checkpoints/{2 * EVERY}' in stderr
    assert_same_run(workdir, reference)


@pytest.mark.slow  # a minute; tests/test_shards.py checks the same data continuity in seconds
def test_two_processes_resume_in_one_and_back(tmp_path, reference, pydoc_vocab):
    workdir = str(tmp_path / 'elastic')
    run(workdir, pydoc_vocab, 1, 2)
    rewind(workdir, EVERY)
    run(workdir, pydoc_vocab, 1, 1)
    rewind(workdir, 2 * EVERY)
    run(workdir, pydoc_vocab, 1, 2)
    assert_same_run(workdir, reference)


def test_shards_that_processes_cannot_share_are_refused(tmp_path, pydoc_vocab):
    workdir = str(tmp_path / 'one_shard')
    args = ['--config.data.shards=1', '--config.total_steps=2', '--config.checkpoint_every=2']
    r = launch(
        'pretrain',
        '--config',
        'configs/bert_mlm.py:tiny',
        '--workdir',
        workdir,
        *SMALL_RUN,
        f'--config.data.vocab_file={pydoc_vocab}',
        *args,
        '--local_processes',
        '2',
    )
    assert r.returncode == 1
    assert 'cut into 1 shards (data.shards), which 2 processes cannot share evenly' in r.stderr


def simclr_run(workdir: str, devices: int = 1, processes: int = 1, *extra: str) -> None:
    """SimCLR (ViT on digits, augmentations on device) on `processes` x `devices`."""
    args = [
        'pretrain',
        '--config',
        'configs/vit_simclr.py:tiny',
        '--workdir',
        workdir,
        '--config.model.hidden_size=32',
        '--config.model.num_layers=1',
        '--config.model.num_heads=2',
        '--config.model.mlp_dim=64',
        '--config.model.proj_hidden=64',
        '--config.model.proj_dim=16',
        '--config.batch_size=32',
        '--config.data.shards=2',
        f'--config.total_steps={STEPS}',
        f'--config.checkpoint_every={STEPS}',
        f'--config.eval_every={STEPS}',
        '--config.log_every=1',
        '--config.eval_steps=1',
        '--config.eval.probe_train_examples=200',
        *extra,
    ]
    if processes > 1:
        args += ['--local_processes', str(processes)]
    r = launch(*args, env={'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'})
    assert r.returncode == 0, r.stderr[-3000:]
    assert f'{devices * processes} devices, {processes} processes' in r.stderr, r.stderr[-2000:]


@pytest.mark.slow  # three SimCLR runs, about a minute
def test_contrastive_loss_is_the_same_on_two_processes_eight_devices_and_one(tmp_path):
    """The contrastive loss reduces over the global batch (negatives from every host); its
    augmentations are drawn per example, so the layout does not change them."""
    one, eight, two = (str(tmp_path / name) for name in ('one', 'eight', 'two'))
    simclr_run(one)
    simclr_run(eight, 8, 1, '--config.mesh.data=2', '--config.mesh.fsdp=4')
    simclr_run(two, 4, 2)
    for workdir in (eight, two):
        assert_same_run(workdir, one)
