"""What a run tells its user and leaves beside its metrics: one concise line per log step
(loss first, no absl prefix), a start-up line, the end-of-run report on stdout,
WORKDIR/log.txt and WORKDIR/run.json (one entry per start), WORKDIR/curves.png; `launch.py
plot` overlaying runs; no Orbax metadata warning when a checkpoint is read."""

import json
import os
import re

import jax
import pytest

from tests.conftest import SMALL_RUN, check_evals_timed, launch
from tests.contract import check_workdir

ABSL_PREFIX = re.compile(r'^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\]', re.M)
PNG = b'\x89PNG\r\n\x1a\n'


def _pretrain(workdir: str, vocab: str, *extra: str):
    return launch(
        'pretrain',
        '--config',
        'configs/bert_mlm.py:tiny',
        '--workdir',
        workdir,
        *SMALL_RUN,
        f'--config.data.vocab_file={vocab}',
        '--config.log_every=2',
        '--config.eval_every=2',
        '--config.checkpoint_every=2',
        *extra,
    )


@pytest.fixture(scope='module')
def run(tmp_path_factory, pydoc_vocab):
    """A 4-step run, then its resumption to 6 steps: (workdir, first result, second, the
    first's summary)."""
    workdir = str(tmp_path_factory.mktemp('outputs') / 'mlm')
    first = _pretrain(workdir, pydoc_vocab, '--config.total_steps=4')
    assert first.returncode == 0, first.stderr[-3000:]
    with open(os.path.join(workdir, 'summary.json')) as f:
        summary = json.load(f)
    second = _pretrain(workdir, pydoc_vocab, '--config.total_steps=6')
    assert second.returncode == 0, second.stderr[-3000:]
    return workdir, first, second, summary


def test_a_run_prints_concise_lines_a_start_line_and_a_report(run):
    workdir, r, _, summary = run
    assert not ABSL_PREFIX.search(r.stderr), r.stderr[:2000]
    assert '\r' not in r.stderr  # no live bar: stderr is not a terminal
    lines = r.stderr.splitlines()
    # Before anything slow: what runs, and where.
    assert lines[0].startswith('pretrain mlm'), lines[:3]
    assert 'configs/bert_mlm.py:tiny' in lines[0] and workdir in lines[0]
    # One line per log step, the loss first.
    steps = [line for line in lines if line.startswith('step ')]
    assert [s.split()[1] for s in steps] == ['2/4', '4/4'], steps
    assert all(re.match(r'step \d+/4 \| loss [\d.]+ \|', s) for s in steps), steps
    # The report, on stdout: how far, what it reached, where everything is.
    out = r.stdout
    assert 'steps 4/4' in out, out
    assert f'mlm_accuracy {summary["final_mlm_accuracy"]:.4f}' in out, out
    assert f'best {summary["best_mlm_accuracy"]:.4f} at step {summary["best_step"]}' in out
    for name in ('summary.json', 'metrics.jsonl', 'tensorboard', 'checkpoints', 'curves.png'):
        assert os.path.join(workdir, name) in out, (name, out)


def test_every_eval_reports_its_time_and_only_the_first_compiles(run):
    workdir, first, second, _ = run
    check_evals_timed(workdir, first.stderr, [0, 2, 4])
    check_evals_timed(workdir, second.stderr, [6])  # the resumed process compiles again


def test_log_txt_and_run_json_record_every_start(run):
    workdir = run[0]
    log = open(os.path.join(workdir, 'log.txt')).read()
    assert log.count('pretrain mlm') == 2, log[:2000]  # both starts, appended
    assert ABSL_PREFIX.search(log)  # the full detail
    assert 'eval step 4' in log and f'resumed from {workdir}/checkpoints/4' in log
    starts = json.load(open(os.path.join(workdir, 'run.json')))
    assert isinstance(starts, list) and len(starts) == 2
    first = starts[0]
    assert (
        '--config.total_steps=4' in first['argv']
        and '--config.total_steps=6' in (starts[1]['argv'])
    )
    assert first['packages']['jax'] == jax.__version__
    for name in ('jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain', 'numpy'):
        assert first['packages'][name], name
    assert first['python'].startswith('3.')
    assert first['devices'] == {'platform': 'cpu', 'kind': 'cpu', 'count': 1}
    assert first['processes'] == 1
    assert first['start_step'] == 0 and starts[1]['start_step'] == 4
    assert 'commit' in first['code'] and 'dirty' in first['code'] or first['code'] is None
    assert first['start_time'].endswith('Z')
    check_workdir(workdir, 'mlm_accuracy')


def test_curves_png_is_written(run):
    workdir = run[0]
    with open(os.path.join(workdir, 'curves.png'), 'rb') as f:
        assert f.read(8) == PNG


def test_overwrite_moves_log_and_run_json_aside(run, pydoc_vocab, tmp_path):
    import shutil

    workdir = str(tmp_path / 'copy')
    shutil.copytree(run[0], workdir)
    r = _pretrain(
        workdir,
        pydoc_vocab,
        '--config.total_steps=2',
        '--config.learning_rate=0.5',
        '--config.overwrite=true',
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (moved,) = os.listdir(os.path.join(workdir, 'previous'))
    old = os.path.join(workdir, 'previous', moved)
    assert len(json.load(open(os.path.join(old, 'run.json')))) == 2
    assert open(os.path.join(old, 'log.txt')).read().count('pretrain mlm') == 2
    assert len(json.load(open(os.path.join(workdir, 'run.json')))) == 1
    log = open(os.path.join(workdir, 'log.txt')).read()
    assert log.count('pretrain mlm') == 1 and 'is now in' in log
    # A warning keeps its mark on stderr, without the absl prefix.
    assert any(line.startswith('warning: the earlier run in') for line in r.stderr.splitlines())
    assert not ABSL_PREFIX.search(r.stderr)


def test_plot_overlays_runs(run, tmp_path):
    workdir = run[0]
    out = str(tmp_path / 'both.png')
    r = launch(
        'plot', '--workdir', workdir, workdir, '--metrics', 'loss,mlm_accuracy', '--out', out
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert out in r.stdout
    with open(out, 'rb') as f:
        assert f.read(8) == PNG
    r = launch('plot', '--workdir', workdir, '--metrics', 'nosuch', '--out', out)
    assert r.returncode == 1 and 'nosuch' in r.stderr and 'Traceback' not in r.stderr


def test_plot_never_replaces_a_runs_own_file(run, tmp_path):
    """`plot` run from inside a workdir (the default --out is plot.png) or pointed at a
    run's curves.png refuses, and the run's file stays as it was."""
    workdir = run[0]
    curves = os.path.join(workdir, 'curves.png')
    with open(curves, 'rb') as f:
        before = f.read()
    r = launch('plot', '--workdir', workdir, '--out', curves)
    assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr[-2000:]
    assert f'--out {curves} is the curves.png of the run in {workdir}' in r.stderr, r.stderr
    with open(curves, 'rb') as f:
        assert f.read() == before


@pytest.mark.parametrize('bad', ['missing', 'empty'])
def test_plot_of_a_bad_workdir_is_one_line(tmp_path, bad):
    workdir = tmp_path / bad
    if bad == 'empty':
        workdir.mkdir()
    r = launch('plot', '--workdir', str(workdir), '--out', str(tmp_path / 'x.png'))
    assert r.returncode == 1
    assert r.stderr.startswith('error: ') and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert str(workdir) in r.stderr


def test_reading_a_checkpoint_prints_no_orbax_metadata_warning(run, tmp_path):
    r = launch('export-hf', '--from', run[0], '--to', str(tmp_path / 'hf'))
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'Metadata file does not exist' not in r.stderr


def test_tensorboard_is_installable_from_the_project_files():
    """TensorBoard, the viewer of WORKDIR/tensorboard, is an optional pinned install
    (requirements-tensorboard.txt), documented wherever `tensorboard --logdir` is; the core
    and CI do not depend on it."""
    from tests.conftest import ROOT

    with open(os.path.join(ROOT, 'requirements-tensorboard.txt')) as f:
        pins = [line.split('#')[0].strip() for line in f]
    assert any(re.fullmatch(r'tensorboard==[\d.]+', pin) for pin in pins), pins
    with open(os.path.join(ROOT, 'requirements.txt')) as f:
        assert not re.search(r'^tensorboard\b', f.read(), re.M)
    for doc in ('README.md', 'docs/outputs.md'):
        with open(os.path.join(ROOT, doc)) as f:
            text = f.read()
        assert 'tensorboard --logdir' in text, doc
        assert 'pip install -r requirements-tensorboard.txt' in text, doc


def test_a_terminal_gets_a_live_bar_that_log_lines_clear():
    import io
    import logging

    from core import runlog

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Terminal()
    bar = runlog.LiveBar(10, stream=tty, min_interval=0.0)
    bar.update(5, 3.0)
    assert tty.getvalue() == '\r\x1b[K[############............] 5/10 | eta 3s'
    record = logging.LogRecord('x', logging.INFO, 'x.py', 1, 'step 5/10 | loss 2', (), None)
    assert runlog.Concise().format(record) == '\r\x1b[Kstep 5/10 | loss 2'  # the bar cleared
    assert runlog.Concise().format(record) == 'step 5/10 | loss 2'  # and gone until redrawn
    bar.update(10, None)
    bar.close()
    assert tty.getvalue().endswith('] 10/10\r\x1b[K')
    # Not a terminal (a file, a pipe, CI): nothing.
    piped = io.StringIO()
    runlog.LiveBar(10, stream=piped, min_interval=0.0).update(5, 3.0)
    assert piped.getvalue() == ''
