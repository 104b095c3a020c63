"""SimCLR over two jax.distributed processes (gloo): each host reads its shard of the
labelled splits, the frozen features are gathered from both, and the probes see every
image once, so the step-0 figures equal a single-process run's."""

import json
import os

import pytest

from tests.conftest import launch

TINY_VIT = [
    '--config.model.hidden_size=32',
    '--config.model.num_layers=1',
    '--config.model.num_heads=2',
    '--config.model.mlp_dim=64',
    '--config.model.proj_hidden=64',
    '--config.model.proj_dim=16',
    '--config.batch_size=32',
    '--config.total_steps=2',
    '--config.log_every=1',
    '--config.eval_every=2',
    '--config.checkpoint_every=2',
    '--config.eval_steps=2',
    '--config.eval.probe_train_examples=300',
]


def step0_eval(workdir: str) -> dict:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        rows = [json.loads(line) for line in f]
    return next(r for r in rows if r['split'] == 'eval' and r['step'] == 0)


@pytest.mark.slow  # ~45 s: two launches, one of them 2 processes
def test_two_processes_probe_every_image_like_one(tmp_path):
    one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
    common = ['--config', 'configs/vit_simclr.py:tiny', *TINY_VIT]
    r = launch('pretrain', *common, '--workdir', one)
    assert r.returncode == 0, r.stderr[-3000:]
    r = launch('pretrain', '--local_processes', '2', *common, '--workdir', two)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'jit over 2 devices, 2 processes' in r.stderr
    a, b = step0_eval(one), step0_eval(two)
    for key in ('knn_accuracy', 'linear_probe_accuracy', 'linear_probe_5shot_accuracy'):
        assert abs(a[key] - b[key]) < 1e-6, (key, a[key], b[key])
    assert os.path.isdir(os.path.join(two, 'checkpoints', '2'))
