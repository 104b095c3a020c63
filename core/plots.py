"""Every picture pretrax draws (matplotlib, Agg backend: no display needed).

curves(WORKDIR, metric)   WORKDIR/curves.png at the end of every run: train loss,
                          learning rate and the eval metric against steps
overlay(WORKDIRS, ...)    `launch.py plot --workdir RUN [RUN ...] [--metrics loss,accuracy]
                          [--out FILE]`: several runs' curves in one PNG, one panel a metric
study(...)                the study's study.png (study/report.py)
"""

import argparse
import json
import os
import sys
from typing import IO

import numpy as np

from core import runlog
from core.errors import UserError
from core.files import atomic_write
from core.metrics import read_metrics
from core.rundir import RUN_OUTPUTS


def _pyplot():
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    return plt


def _series(rows: list[dict], split: str, name: str) -> tuple[list[int], list[float]]:
    points = [(r['step'], r[name]) for r in rows if r.get('split') == split and name in r]
    return [s for s, _ in points], [v for _, v in points]


def _panel(rows_of_runs: list[list[dict]], metric: str) -> tuple[str, str]:
    """(split, name) of `metric` (`eval/accuracy`, `train/loss`, or a bare name: the eval
    rows' when any run's eval rows carry it, else the train rows')."""
    if '/' in metric:
        split, name = metric.split('/', 1)
        return split, name
    in_eval = any(r.get('split') == 'eval' and metric in r for rows in rows_of_runs for r in rows)
    return ('eval' if in_eval else 'train'), metric


def draw(out: str | IO, runs: dict[str, list[dict]], panels: list[tuple[str, str]], title: str):
    """One panel per (split, metric), one line per run (label: rows), against steps."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for ax, (split, name) in zip(axes[0], panels, strict=True):
        for i, (label, rows) in enumerate(runs.items()):
            steps, values = _series(rows, split, name)
            if steps:
                marker = 'o' if split != 'train' or len(steps) < 30 else None
                ax.plot(steps, values, marker=marker, markersize=3, label=label, color=f'C{i}')
        ax.set_xlabel('step')
        ax.set_title(f'{split} {name}')
        ax.grid(True, alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize='small')
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, format='png', dpi=100)
    plt.close(fig)


def curves(workdir: str, metric: str, out: str | None = None) -> str:
    """WORKDIR/curves.png (or `out`): train loss, learning rate, eval `metric`; returns the
    path. Written atomically."""
    rows = read_metrics(workdir)
    panels = [('train', 'loss'), ('train', 'learning_rate'), ('eval', metric)]
    panels = [p for p in panels if _series(rows, *p)[0]]
    out = out or os.path.join(workdir, 'curves.png')
    with atomic_write(out, 'wb') as f:
        draw(f, {os.path.basename(os.path.abspath(workdir)): rows}, panels, workdir)
    return out


def _run_metric(workdir: str) -> str | None:
    """The task metric of a finished run (summary.json's best_<metric>)."""
    try:
        with open(os.path.join(workdir, 'summary.json')) as f:
            return runlog.summary_metric(json.load(f))
    except (OSError, ValueError):
        return None


def _labels(workdirs: list[str]) -> list[str]:
    """The shortest distinct tail of each workdir's path."""
    parts = [os.path.abspath(w).split(os.sep) for w in workdirs]
    for n in range(1, max(len(p) for p in parts) + 1):
        labels = [os.sep.join(p[-n:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [os.path.abspath(w) for w in workdirs]  # the same run twice


def load_runs(workdirs: list[str]) -> dict[str, list[dict]]:
    """{label: metrics rows} of each workdir; a UserError naming a workdir that holds no
    run's metrics."""
    runs = {}
    for label, workdir in zip(_labels(workdirs), workdirs, strict=True):
        if not os.path.isdir(workdir):
            raise UserError(f'--workdir {workdir}: no such directory; give the workdir of a run')
        if not os.path.isfile(os.path.join(workdir, 'metrics.jsonl')):
            raise UserError(
                f'--workdir {workdir} holds no metrics.jsonl: not a run, or one that has not '
                'logged a step yet'
            )
        runs[label] = read_metrics(workdir)
    return runs


def overlay(workdirs: list[str], metrics: list[str] | None, out: str) -> str:
    """Several runs' curves in one PNG at `out`; returns its path. A run's own file
    (rundir.RUN_OUTPUTS in a directory holding a config.json) is never replaced."""
    target = os.path.abspath(out)
    folder, name = os.path.split(target)
    if name in RUN_OUTPUTS and os.path.isfile(os.path.join(folder, 'config.json')):
        raise UserError(
            f'--out {out} is the {name} of the run in {folder}; give another --out (e.g. '
            '--out plot.png in another directory)'
        )
    runs = load_runs(workdirs)
    if not metrics:
        metric = next(filter(None, map(_run_metric, workdirs)), None)
        metrics = ['train/loss', *([f'eval/{metric}'] if metric else [])]
    panels = [_panel(list(runs.values()), m) for m in metrics]
    for split, name in panels:
        if not any(_series(rows, split, name)[0] for rows in runs.values()):
            found = sorted(
                {f'{r["split"]}/{k}' for rows in runs.values() for r in rows for k in r}
                - {f'{s}/{k}' for s in ('train', 'eval', 'test') for k in ('step', 'split')}
            )
            raise UserError(
                f'no {split} row of these runs has {name!r}; --metrics takes names from '
                f'their metrics.jsonl: {", ".join(found)}'
            )
    title = ' vs '.join(runs) if len(runs) <= 3 else f'{len(runs)} runs'
    with atomic_write(out, 'wb') as f:
        draw(f, runs, panels, title)
    return os.path.abspath(out)


def main(argv: list[str]) -> int:
    """`launch.py plot`: exit code 0, or 1 with one line naming a bad workdir or metric."""
    parser = argparse.ArgumentParser(
        prog='launch.py plot',
        description='Draws the curves of one or more runs into one PNG (e.g. pretrained '
        'against scratch), one panel a metric, one line a run.',
    )
    parser.add_argument('--workdir', nargs='+', required=True, help='the runs to draw')
    parser.add_argument(
        '--metrics',
        default='',
        help='comma-separated names from metrics.jsonl, optionally split/name (train/loss, '
        "eval/accuracy); a bare name is the eval rows' when they have it. Default: the train "
        "loss and the first run's task metric",
    )
    parser.add_argument('--out', default='plot.png', help='the PNG to write (plot.png)')
    args = parser.parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(',') if m.strip()]
    try:
        path = overlay(args.workdir, metrics, args.out)
    except (UserError, OSError) as e:
        from core.cli import error_message

        message = error_message(e)
        if message is None:
            raise
        sys.stderr.write(f'error: {message}\n')
        return 1
    print(f'{len(args.workdir)} run(s) drawn to {path}')
    return 0


def _error_bars(rows: list[dict], mean: str, low: str, high: str) -> np.ndarray:
    """2 x N distances from the mean to the interval ends (0 where there is no interval)."""
    return np.array(
        [
            [t[mean] - t[low] if t[low] is not None else 0.0 for t in rows],
            [t[high] - t[mean] if t[high] is not None else 0.0 for t in rows],
        ]
    )


def study(out: str | IO, table: list[dict], metric: str, target: float, title: str) -> None:
    """Left: the test metric against labelled examples (log scale), one line per arm, 95%
    intervals over seeds as error bars. Right (when the study has a scratch arm): each
    arm's paired difference to scratch, with its 95% interval."""
    plt = _pyplot()
    arms = list(dict.fromkeys(t['arm'] for t in table))
    colour = {arm: f'C{i}' for i, arm in enumerate(arms)}  # an arm's colour in both panels
    compared = [a for a in arms if a != 'scratch' and 'scratch' in arms]
    fig, axes = plt.subplots(1, 2 if compared else 1, figsize=(11 if compared else 6.4, 4.2))
    axes = np.atleast_1d(axes)
    ax = axes[0]
    for arm in arms:
        rows = sorted((t for t in table if t['arm'] == arm), key=lambda t: t['budget'])
        x = [t['train_examples'] or t['budget'] for t in rows]
        yerr = _error_bars(rows, 'test_mean', 'test_ci_low', 'test_ci_high')
        means = [t['test_mean'] for t in rows]
        ax.errorbar(x, means, yerr=yerr, marker='o', capsize=3, label=arm, color=colour[arm])
    ax.axhline(target, color='gray', linestyle=':', linewidth=1, label=f'target {target:g}')
    ax.set_xscale('log')
    ax.set_xlabel('labelled training examples')
    ax.set_ylabel(f'test {metric} (mean, 95% CI over seeds)')
    ax.set_title(title)
    ax.grid(True, which='both', alpha=0.3)
    ax.legend()
    if compared:
        ax = axes[1]
        for arm in compared:
            rows = sorted(
                (t for t in table if t['arm'] == arm and t['diff_vs_scratch'] is not None),
                key=lambda t: t['budget'],
            )
            x = [t['train_examples'] or t['budget'] for t in rows]
            yerr = _error_bars(rows, 'diff_vs_scratch', 'diff_ci_low', 'diff_ci_high')
            ax.errorbar(
                x,
                [t['diff_vs_scratch'] for t in rows],
                yerr=yerr,
                marker='o',
                capsize=3,
                label=f'{arm} - scratch',
                color=colour[arm],
            )
        ax.axhline(0.0, color='gray', linewidth=1)
        ax.set_xscale('log')
        ax.set_xlabel('labelled training examples')
        ax.set_ylabel(f'paired test {metric} difference (95% CI)')
        ax.set_title('against scratch, same seeds')
        ax.grid(True, which='both', alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, format='png', dpi=120)
    plt.close(fig)
