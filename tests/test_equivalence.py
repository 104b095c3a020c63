"""pmap, jit over 8 devices (data; data x fsdp x tensor; fsdp) and jit on 1 device give the
same losses and parameters after several steps, dropout on; so does gradient accumulation."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_layouts(layouts: list[str], dropout: float = 0.0) -> dict:
    env = dict(
        os.environ,
        XLA_FLAGS='--xla_force_host_platform_device_count=8',
        JAX_PLATFORMS='cpu',
        PYTHONPATH=ROOT,
    )
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, 'tests', 'equivalence_run.py'),
            ','.join(layouts),
            str(dropout),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith('RESULT '))
    return json.loads(line[len('RESULT ') :])


LAYOUTS = ['pmap', 'data8', 'data2_fsdp2_tensor2', 'fsdp8', 'data8_accum2', 'single_accum2']


@pytest.fixture(scope='module')
def results():
    # Dropout on: every example's masks come from (rng, step, its global row), whatever the
    # layout or the number of micro-batches.
    return run_layouts(LAYOUTS, dropout=0.1)


@pytest.mark.parametrize('layout', LAYOUTS)
def test_same_losses_and_params_as_one_device(results, layout):
    ref = results['single']['losses']
    got = results[layout]['losses']
    assert len(got) == len(ref) == 4
    for a, b in zip(got, ref):
        assert abs(a - b) < 1e-4 * max(1.0, abs(b)), (layout, got, ref)
    assert results[layout]['max_param_diff'] < 1e-5, results[layout]
    # The run really trained: the loss moved (its batches are random tokens, so the
    # curve is flat, but its steps differ).
    assert max(ref) - min(ref) > 1e-3
