"""The train-step benchmarks' commands (BENCHMARKS.md) run end to end at a toy size and
print their results table: pretrax and the PyTorch reference side by side. Slow (~1 min):
two compiles and two PyTorch models per script. No timing is asserted. corpus_scale.py: its
corpus and one tiny pretrain run through it."""

import json
import os
import re
import subprocess
import sys

import pytest

from benchmarks import corpus_scale
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


def table_rows(out: str, first_cell: str) -> list[list[str]]:
    """Every markdown row of `out` whose first cell starts with `first_cell`."""
    return [
        [cell.strip() for cell in line.strip().strip('|').split('|')]
        for line in out.splitlines()
        if line.startswith(f'| {first_cell}')
    ]


def number(cell: str) -> float:
    """A printed figure such as '1,234.5' or '16.31x' as a float."""
    return float(cell.replace(',', '').rstrip('x'))


def test_input_pipeline_benchmark_rates_the_stream_against_the_step():
    out = run_benchmark(
        'input_pipeline.py', '--which', 'text,images', '--steps', '2', '--warmup', '1',
        '--step_steps', '1', '--gpu_step_examples_per_s', 'images/tiny/256=1000',
    )  # fmt: skip
    rates = {row[0]: row for row in table_rows(out, 'text/') + table_rows(out, 'images/')}
    for name in ('text/tiny/32', 'text/base/256', 'images/tiny/256'):
        assert name in rates, out[-3000:]
    host = next(r for r in table_rows(out, 'images/tiny/256') if r[1] == 'host pipeline')
    pipeline, step_rate, ratio = number(host[4]), number(host[8]), number(host[9])
    assert pipeline > 0 and step_rate > 0 and host[9].endswith('x')
    # The table prints rounded rates and a ratio of the unrounded ones: they agree to
    # within what the rounding of each printed figure can move the quotient.
    slack = (0.5 / pipeline + 0.05 / step_rate) * pipeline / step_rate + 0.05
    assert ratio == pytest.approx(pipeline / step_rate, abs=slack * 1.01)
    given = out[out.index('## Pipeline (this host) vs step rates measured elsewhere') :]
    row = table_rows(given, 'images/tiny/256')[0]
    assert row[2] == '1,000' and row[3].endswith('x')
    assert number(row[3]) == pytest.approx(pipeline / 1000, abs=(0.5 / 1000 + 0.005) * 1.01)


def test_contrastive_memory_benchmark_shows_the_ring_flat_and_the_gather_growing():
    """What BENCHMARKS.md reads off this table: the ring sigmoid loss's per-device memory
    stays flat as devices are added, the all-gathered losses' grows with them."""
    out = run_benchmark('contrastive_memory.py', '--per_device', '512', '--dim', '16')
    temp = {row[0]: [float(x) for x in row[1:]] for row in table_rows(out, 's')}
    ring, gathered = temp['sigmoid (ring)'], temp['softmax (all-gather)']
    assert len(ring) == 4  # 1, 2, 4 and 8 devices
    assert ring[3] <= 1.1 * ring[1]
    assert gathered[3] >= 3.5 * gathered[1]
    assert temp['sigmoid (all-gather)'][3] > ring[3]


def test_corpus_scale_sizes_are_decimal():
    assert corpus_scale.parse_size('2M') == 2_000_000
    assert corpus_scale.parse_size('500k') == 500_000
    assert corpus_scale.parse_size('1.5G') == 1_500_000_000
    assert corpus_scale.parse_size('1234') == 1234
    assert [corpus_scale.size_name(n) for n in (2 * 10**9, 500_000, 1234)] == ['2G', '500K', '1234']
    for bad in ('2X', '', '-1M', '0'):
        with pytest.raises(ValueError):
            corpus_scale.parse_size(bad)


def test_corpus_scale_corpus_has_the_size_and_is_deterministic(tmp_path):
    size = 300_000
    (tmp_path / 'a').mkdir()
    (tmp_path / 'b').mkdir()
    path, nbytes, how = corpus_scale.corpus(str(tmp_path / 'a'), size)
    assert os.path.basename(path) == 'corpus_300K.txt' and how.startswith('written')
    assert size <= nbytes == os.path.getsize(path) <= 1.01 * size
    other, _, _ = corpus_scale.corpus(str(tmp_path / 'b'), size)
    with open(path, 'rb') as f, open(other, 'rb') as g:
        text = f.read()
        assert text == g.read()  # seeded: the same bytes every time
    docs = text.decode().split('\n\n')[:-1]  # the last document ends the file
    assert all(3 <= len(doc.split('\n')) <= 12 for doc in docs), 'documents of 3-12 sentences'
    assert corpus_scale.corpus(str(tmp_path / 'a'), size) == (path, nbytes, 'reused')


def test_corpus_scale_benchmark_measures_a_run_and_kills_one_over_its_memory(tmp_path):
    common = ['--sizes', '300K', '--steps', '2', '--dir', str(tmp_path)]
    out = run_benchmark('corpus_scale.py', *common, '--label', 'ok')
    row = next(line for line in out.splitlines() if line.startswith('| 300,'))
    cells = [cell.strip() for cell in row.strip('|').split('|')]
    assert cells[1] == 'ok'
    rss, first, wall, rate = map(float, cells[2:])
    assert 0 < rss < 20 and 0 < first < wall and rate > 0
    out = run_benchmark('corpus_scale.py', *common, '--label', 'small', '--max_rss_gb', '0.01')
    assert '| small | killed: RSS > 0.01 GB after ' in out
    with open(tmp_path / 'corpus_scale.jsonl') as f:
        rows = [json.loads(line) for line in f]
    assert [r['side'] for r in rows] == ['ok', 'small'] and 'killed' in rows[1]
    assert rows[0]['command'].endswith('--config.total_steps=2') and rows[0]['commit']
