"""The train-step benchmarks' commands (BENCHMARKS.md) run end to end at a toy size and
print their results table: pretrax and the PyTorch reference side by side. Slow (~1 min):
two compiles and two PyTorch models per script. No timing is asserted."""

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def run_benchmark(script: str, *args: str) -> str:
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'benchmarks', script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def result_row(out: str, first_cell: str) -> list[str]:
    table = out[out.index('## Results') :]
    row = next(line for line in table.splitlines() if line.startswith(f'| {first_cell} |'))
    return [cell.strip() for cell in row.strip('|').split('|')]


def test_mlm_step_benchmark_prints_both_sides():
    out = run_benchmark(
        'mlm_step.py', '--sizes', 'tiny', '--batch', '2', '--steps', '1', '--warmup', '1',
        '--no-profile', '--no-breakdown',
    )  # fmt: skip
    params, pretrax_ms, reference_ms, speedup = result_row(out, 'tiny')[1:5]
    assert params == '4.42M'  # the same parameter count on both sides
    assert float(pretrax_ms) > 0 and float(reference_ms) > 0 and speedup.endswith('x')
    assert 'pretrax step, XLA cost analysis' in out


def test_simclr_step_benchmark_prints_both_sides():
    out = run_benchmark(
        'simclr_step.py', '--sizes', 'ti', '--batch', '1', '--steps', '1', '--warmup', '1',
        '--no-profile', '--no-augment-row',
    )  # fmt: skip
    row = result_row(out, 'ViT-TI/16')
    assert row[1] == '10.38M'
    assert 'params: pretrax 10,378,304, reference 10,378,304' in out


def test_profile_step_prints_every_section():
    out = run_benchmark(
        'profile_step.py', '--model', 'mlm-tiny', '--batch', '2', '--steps', '1', '--warmup', '1',
        '--idle', '0', '--xla_flags=--xla_cpu_use_xnnpack=false',
    )  # fmt: skip
    profile = out[out.index('## profile') : out.index('## matmul')]
    counted, xla = map(
        float, re.search(r'in the HLO ([\d.]+) \(XLA .* step ([\d.]+)\)', profile).groups()
    )
    assert 0.8 * xla <= counted <= 1.01 * xla  # dots: most of the step, as XLA counts it
    rates = [line.split('|')[-2].strip() for line in profile.splitlines() if '+dot' in line]
    assert any(r != 'async' and float(r) > 0 for r in rates), rates  # GFLOP/s of a dot kind
    assert out.count('| forward x @ W') == 1
    flags = out[out.index('## XLA flags') : out.index('## alone')]
    for row in ('| (none) |', '| `--xla_cpu_use_xnnpack=false` |'):
        line = next(line for line in flags.splitlines() if line.startswith(row))
        assert float(line.split('|')[2]) > 0, line  # a step time, not 'failed'
    assert '| alternating with the reference |' in out
