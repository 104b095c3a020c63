"""End to end: the pretrain stage leaves a workdir that satisfies ../shared/ARCHITECTURE.md,
checked by the shared contract tool, through both entrypoints."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, SMALL_RUN, launch

CHECKER = os.path.join(os.path.dirname(ROOT), 'shared', 'tools', 'check_contract.py')


def check_contract(workdir: str, metric: str) -> None:
    r = subprocess.run(
        [sys.executable, CHECKER, workdir, '--metric', metric], capture_output=True, text=True
    )
    assert r.returncode == 0 and 'contract ok' in r.stdout, r.stdout + r.stderr


@pytest.mark.skipif(not os.path.isfile(CHECKER), reason='needs ../shared beside the checkout')
def test_pretrain_workdir_meets_the_contract(tmp_path, pydoc_vocab):
    workdir = str(tmp_path / 'mlm')
    r = launch(
        'pretrain',
        '--config',
        'configs/bert_mlm.py:tiny',
        '--workdir',
        workdir,
        *SMALL_RUN,
        f'--config.data.vocab_file={pydoc_vocab}',
        '--config.total_steps=4',
        '--config.log_every=1',
        '--config.eval_every=2',
        '--config.checkpoint_every=2',
    )
    assert r.returncode == 0, r.stderr[-3000:]
    check_contract(workdir, 'mlm_accuracy')
    with open(os.path.join(workdir, 'summary.json')) as f:
        summary = json.load(f)
    assert summary['steps'] == 4 and summary['completed']
    assert 0.0 <= summary['final_mlm_accuracy'] <= 1.0
    assert 'most_frequent_token_accuracy' in summary
    with open(os.path.join(workdir, 'config.json')) as f:
        assert json.load(f)['total_steps'] == 4
    rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
    train = [r for r in rows if r['split'] == 'train']
    assert [r['step'] for r in train] == [1, 2, 3, 4]
    for key in ('loss', 'learning_rate', 'grad_norm'):
        assert all(key in r for r in train), key
    # Throughput times training steps only: step 1 compiled, so its row has none.
    for key in ('examples_per_sec', 'tokens_per_sec', 'step_time_ms'):
        assert all(key in r for r in train[1:]) and key not in train[0], key
    assert sorted(os.listdir(os.path.join(workdir, 'checkpoints')))[-1] == '4'


@pytest.mark.skipif(not os.path.isfile(CHECKER), reason='needs ../shared beside the checkout')
def test_module_entrypoint_and_pmap_mode(tmp_path, pydoc_vocab):
    """`python -m pretrain.main` is the same stage; parallelism=pmap runs it data parallel."""
    workdir = str(tmp_path / 'pmap')
    env = dict(
        os.environ,
        JAX_PLATFORMS='cpu',
        PYTHONPATH=ROOT,
        XLA_FLAGS='--xla_force_host_platform_device_count=2',
    )
    r = subprocess.run(
        [
            sys.executable,
            '-m',
            'pretrain.main',
            '--config',
            'configs/bert_mlm.py:tiny',
            '--workdir',
            workdir,
            *SMALL_RUN,
            f'--config.data.vocab_file={pydoc_vocab}',
            '--config.total_steps=4',
            '--config.log_every=2',
            '--config.eval_every=2',
            '--config.checkpoint_every=2',
            '--config.parallelism=pmap',
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'pmap over 2 devices' in r.stderr
    check_contract(workdir, 'mlm_accuracy')


@pytest.mark.skipif(not os.path.isfile(CHECKER), reason='needs ../shared beside the checkout')
def test_two_local_processes(tmp_path, pydoc_vocab):
    """`--local_processes 2`: two jax.distributed processes (gloo) train one model; process
    0 writes the workdir, both write the checkpoint."""
    workdir = str(tmp_path / 'mp')
    r = launch(
        'pretrain',
        '--local_processes',
        '2',
        '--config',
        'configs/bert_mlm.py:tiny',
        '--workdir',
        workdir,
        *SMALL_RUN,
        f'--config.data.vocab_file={pydoc_vocab}',
        '--config.total_steps=4',
        '--config.log_every=2',
        '--config.eval_every=2',
        '--config.checkpoint_every=2',
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'jit over 2 devices, 2 processes' in r.stderr
    check_contract(workdir, 'mlm_accuracy')
