"""A study's results as a table, written as study.json / study.csv, printed as Markdown,
and drawn as study.png.

What it reports, per arm and label budget: the **test** figure of each run's
validation-selected checkpoint (the kept checkpoint best on the validation eval rows),
as a mean over seeds with a 95% confidence interval (Student t, n - 1 degrees of freedom;
none with one seed), and each arm's paired difference to scratch (the same seeds, so the
same validation split and labelled subset on both sides) with its own 95% interval; plus
how many seeds reached the target on the validation rows and how soon.
"""

import csv
import json
import math
import os

import numpy as np
from scipy import stats

from core import plots
from core.files import atomic_write

CONFIDENCE = 0.95

COLUMNS = (
    'arm',
    'budget',
    'train_examples',
    'seeds',
    'learning_rates',
    'test_mean',
    'test_ci_low',
    'test_ci_high',
    'diff_vs_scratch',
    'diff_ci_low',
    'diff_ci_high',
    'pairs',
    'diff_vs_start',
    'start_ci_low',
    'start_ci_high',
    'val_mean',
    'reached',
    'steps_to_target',
    'time_to_target_sec',
    'params',
    'step_time_ms',
    'wall_time_sec',
)


def _mean_or_none(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def mean_interval(values) -> tuple[float, float | None, float | None]:
    """(mean, low, high): the CONFIDENCE interval of the mean of `values` by Student's t
    (n - 1 degrees of freedom); no interval (Nones) from a single value."""
    values = np.asarray(values, np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, None, None
    t = float(stats.t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1))
    half = t * float(values.std(ddof=1)) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def aggregate(rows: list[dict], metric: str) -> list[dict]:
    """One row per (arm, budget): the test `metric` of the validation-selected checkpoints
    over seeds (mean and 95% interval), the paired difference to the scratch arm over the
    seeds both ran (mean and 95% interval; and, for an arm in START, to the arm whose start
    it adapts), the validation figure of those checkpoints,
    how many seeds reached the target (validation rows) with their mean steps and
    training seconds to reach it, and the model's size (a distilled run: the student's)
    and median training step time."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row['arm'], row['budget']), []).append(row)
    table = []
    for (arm, budget), group in groups.items():
        test_mean, low, high = mean_interval([r[f'test_{metric}'] for r in group])
        diff, diff_low, diff_high, pairs = (None, None, None, 0)
        if arm != 'scratch':
            diff, diff_low, diff_high, pairs = _paired_difference(
                group, groups.get(('scratch', budget), []), metric
            )
        vs_start = _paired_difference(group, groups.get((START.get(arm, ''), budget), []), metric)
        reached = [r for r in group if r['steps_to_target'] is not None]
        table.append(
            {
                'arm': arm,
                'budget': budget,
                'train_examples': _mean_or_none([r['train_examples'] for r in group]),
                'seeds': len(group),
                'learning_rates': _rates(group),
                'test_mean': test_mean,
                'test_ci_low': low,
                'test_ci_high': high,
                'diff_vs_scratch': diff,
                'diff_ci_low': diff_low,
                'diff_ci_high': diff_high,
                'pairs': pairs,
                'diff_vs_start': vs_start[0],
                'start_ci_low': vs_start[1],
                'start_ci_high': vs_start[2],
                'val_mean': _mean_or_none([r.get(f'val_{metric}') for r in group]),
                'reached': len(reached),
                'steps_to_target': _mean_or_none([r['steps_to_target'] for r in reached]),
                'time_to_target_sec': _mean_or_none(
                    [r['train_time_to_target_sec'] for r in reached]
                ),
                'params': _mean_or_none([r.get('params') for r in group]),
                'step_time_ms': _mean_or_none([r.get('step_time_ms') for r in group]),
                'wall_time_sec': float(np.mean([r['wall_time_sec'] for r in group])),
            }
        )
    table.sort(key=lambda t: t['budget'])  # stable: arms stay in the study's order
    return table


def _paired_difference(group: list[dict], baseline: list[dict], metric: str) -> tuple:
    """(mean, low, high, pairs): the test `metric` of `group`'s runs less `baseline`'s of
    the same seed, mean and 95% interval over the seeds both ran; Nones and 0 for none."""
    by_seed = {r['seed']: r for r in baseline}
    paired = [r for r in group if r['seed'] in by_seed]
    if not paired:
        return None, None, None, 0
    key = f'test_{metric}'
    return *mean_interval([r[key] - by_seed[r['seed']][key] for r in paired]), len(paired)


def _rates(group: list[dict]) -> str:
    """The learning rates the seeds ran at (chosen on validation, with a grid), '/'-joined
    in seed order; one when they agree; '' when the rows do not say."""
    rates = [r.get('learning_rate') for r in sorted(group, key=lambda r: r['seed'])]
    if any(r is None for r in rates):
        return ''
    return f'{rates[0]:g}' if len(set(rates)) == 1 else '/'.join(f'{r:g}' for r in rates)


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return '-'
    if isinstance(value, float):
        return f'{value:.{digits}f}'
    return str(value)


def _with_interval(mean: float, low: float | None, high: float | None, sign: str = '') -> str:
    """'0.700 [0.452, 0.948]'; the mean alone without an interval."""
    if low is None:
        return f'{mean:{sign}.3f}'
    return f'{mean:{sign}.3f} [{low:{sign}.3f}, {high:{sign}.3f}]'


FINE_TUNED = ('pretrained', 'imported', 'distilled', 'domain_adapted', 'mae')
# An arm that adds a step to another arm's start, and that arm: its paired difference to it
# (`diff_vs_start`) says what the step adds (domain adaptation of the imported encoder).
START = {'domain_adapted': 'imported'}


def markdown(table: list[dict], metric: str, target: float) -> str:
    """The table: a line per budget; per arm the test metric of the validation-selected
    checkpoints (mean [95% interval] over seeds), the paired difference [95% interval] of
    each trained arm (pretrained, imported, distilled, domain_adapted, mae) to scratch and
    of domain_adapted to imported, and the steps and training
    seconds to reach `target` on the validation rows (mean over the seeds that did)."""
    arms = list(dict.fromkeys(t['arm'] for t in table))
    by_key = {(t['arm'], t['budget']): t for t in table}
    budgets = sorted({t['budget'] for t in table})
    head = ['budget', 'labels', *(f'{arm} test {metric}' for arm in arms)]
    # The paired gains of the arms that fine-tune a start (probes: only their own column).
    gains = [a for a in arms if a in FINE_TUNED] if 'scratch' in arms else []
    head += [f'{arm} - scratch (paired)' for arm in gains]
    adapted = [a for a in arms if START.get(a) in arms]
    head += [f'{arm} - {START[arm]} (paired)' for arm in adapted]
    head += [f'{arm}: steps (s) to {target:g} (validation)' for arm in arms]
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for budget in budgets:
        rows = [by_key.get((arm, budget)) for arm in arms]
        first = next(t for t in rows if t)
        line = [f'{budget:g}', _fmt(first['train_examples'], 0)]
        line += [
            _with_interval(t['test_mean'], t['test_ci_low'], t['test_ci_high'])
            + (f' (lr {t["learning_rates"]})' if t.get('learning_rates') else '')
            if t
            else '-'
            for t in rows
        ]
        line += [_paired(by_key.get((arm, budget)), 'diff_vs_scratch', 'diff') for arm in gains]
        line += [_paired(by_key.get((arm, budget)), 'diff_vs_start', 'start') for arm in adapted]
        for t in rows:
            if not t:
                line.append('-')
            elif not t['reached']:
                line.append(f'never (0/{t["seeds"]})')
            else:
                steps, secs = t['steps_to_target'], t['time_to_target_sec']
                line.append(f'{steps:.0f} ({_fmt(secs, 0)} s), {t["reached"]}/{t["seeds"]}')
        lines.append('| ' + ' | '.join(line) + ' |')
    return '\n'.join(lines)


def _paired(row: dict | None, key: str, interval: str) -> str:
    """A row's paired difference `key` with its interval (`<interval>_ci_low/high`), or
    '-' without one."""
    if not row or row[key] is None:
        return '-'
    return _with_interval(row[key], row[f'{interval}_ci_low'], row[f'{interval}_ci_high'], '+')


def write(workdir: str, result: dict) -> None:
    """study.json (everything), study.csv (the table), study.png; each replaced atomically."""
    with atomic_write(os.path.join(workdir, 'study.json')) as f:
        json.dump(result, f, indent=2)
    with atomic_write(os.path.join(workdir, 'study.csv'), newline='') as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: t[k] for k in COLUMNS} for t in result['table'])
    title = f'{result["study"]}: pretrained vs from scratch'
    with atomic_write(os.path.join(workdir, 'study.png'), 'wb') as f:
        plots.study(f, result['table'], result['metric'], result['target'], title)
