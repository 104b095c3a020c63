"""Same config, seed and data: the same vocabulary and the same run in any new workdir and on
any layout, dropout on (docs/pretraining.md, "Parallelism").

Every run starts in a fresh workdir and trains its own vocabulary (no shared vocab.txt),
with dropout 0.1 (tests/conftest.py's SMALL_RUN sets it; the tiny MLM preset has none):
1 device, pmap over 8 devices, jit over data / fsdp / tensor meshes, 2 processes x 4
devices (jit and pmap) and gradient accumulation all draw each example's dropout masks
(and SimCLR's augmentations) from (seed, step, global row of the example), so they agree
up to float reassociation. The runs are tests/test_topology.py's.
"""

import json
import os

import jax
import numpy as np
import pytest

from tests.test_topology import STEPS, final_params, run, simclr_run

# What a layout may change: the order of float sums (psum over devices, sharded matmuls).
RTOL, ATOL = 1e-5, 1e-6
TIMING = {
    'step_time_ms',
    'examples_per_sec',
    'tokens_per_sec',
    'mfu',
    'train_time_sec',
    'eval_time_sec',
    'wall_time_sec',
}


def mlm(workdir: str, devices: int = 1, processes: int = 1, *extra: str) -> str:
    """The MLM run of tests/test_topology.py, its vocabulary trained in the run, dropout on."""
    run(workdir, None, devices, processes, *extra)
    return workdir


def rows(workdir: str) -> list[dict]:
    """metrics.jsonl without the timing fields."""
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def vocab(workdir: str) -> bytes:
    with open(os.path.join(workdir, 'vocab.txt'), 'rb') as f:
        return f.read()


def train_losses(workdir: str) -> np.ndarray:
    train = [r for r in rows(workdir) if r['split'] == 'train']
    assert [r['step'] for r in train] == list(range(1, STEPS + 1))
    return np.array([r['loss'] for r in train])


def assert_same_run(workdir: str, reference: str) -> None:
    """Same losses and final params up to float reassociation; prints the largest gaps."""
    got, ref = train_losses(workdir), train_losses(reference)
    a, b = jax.tree.leaves(final_params(workdir)), jax.tree.leaves(final_params(reference))
    param_gap = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b))
    print(
        f'{os.path.basename(workdir)}: loss gap {np.max(np.abs(got - ref)):.2e}, '
        f'param gap {param_gap:.2e}'
    )
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL)


@pytest.fixture(scope='module')
def one_device(tmp_path_factory) -> str:
    return mlm(str(tmp_path_factory.mktemp('determinism') / 'one_device'))


def test_same_layout_twice_is_the_same_run(tmp_path, one_device):
    again = mlm(str(tmp_path / 'again'))
    assert vocab(again) == vocab(one_device)
    assert rows(again) == rows(one_device)
    assert abs(train_losses(one_device)[-1] - train_losses(one_device)[0]) > 1e-2  # it trained
    for x, y in zip(
        jax.tree.leaves(final_params(again)), jax.tree.leaves(final_params(one_device)), strict=True
    ):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
    'layout',
    [
        ('pmap', 8, '--config.parallelism=pmap'),
        ('data8', 8, '--config.mesh.data=8'),
        ('data2_fsdp4', 8, '--config.mesh.data=2', '--config.mesh.fsdp=4'),
        ('data4_tensor2', 8, '--config.mesh.data=4', '--config.mesh.tensor=2'),
        ('grad_accum2', 1, '--config.grad_accum_steps=2'),
    ],
    ids=lambda layout: layout[0],
)
def test_every_layout_and_grad_accumulation_is_the_same_run(tmp_path, one_device, layout):
    name, devices, *args = layout
    workdir = mlm(str(tmp_path / name), devices, 1, *args)
    assert vocab(workdir) == vocab(one_device)
    assert_same_run(workdir, one_device)


@pytest.mark.slow  # two runs of two processes: about a minute
@pytest.mark.parametrize('parallelism', ['jit', 'pmap'])
def test_two_processes_are_the_same_run(tmp_path, one_device, parallelism):
    """pmap's device index counts over both processes: rows follow the global batch."""
    workdir = mlm(str(tmp_path / 'two_by_four'), 4, 2, f'--config.parallelism={parallelism}')
    assert vocab(workdir) == vocab(one_device)
    assert_same_run(workdir, one_device)


@pytest.mark.slow  # three SimCLR runs, about a minute
def test_simclr_with_dropout_is_the_same_on_pmap_jit_and_one_device(tmp_path):
    """On-device augmentations and dropout drawn per example: pmap equals jit equals 1."""
    one, pmap, data8 = (str(tmp_path / name) for name in ('one', 'pmap', 'data8'))
    dropout = '--config.model.dropout_rate=0.1'
    simclr_run(one, 1, 1, dropout)
    simclr_run(pmap, 8, 1, dropout, '--config.parallelism=pmap')
    simclr_run(data8, 8, 1, dropout, '--config.mesh.data=8')
    for workdir in (pmap, data8):
        assert_same_run(workdir, one)
