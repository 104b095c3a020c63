"""A study's results as a table (mean and std over seeds per arm and budget), written as
study.json / study.csv, printed as Markdown, and drawn as study.png."""

import csv
import json
import os

import numpy as np

COLUMNS = (
    'arm',
    'budget',
    'train_examples',
    'seeds',
    'mean',
    'std',
    'best_mean',
    'reached',
    'steps_to_target',
    'time_to_target_sec',
    'wall_time_sec',
)


def _mean_or_none(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def aggregate(rows: list[dict], metric: str) -> list[dict]:
    """One row per (arm, budget): the final `metric` over seeds (mean, sample std), how many
    seeds reached the target, and their mean steps and training seconds to reach it."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row['arm'], row['budget']), []).append(row)
    table = []
    for (arm, budget), group in groups.items():
        final = np.array([r[f'final_{metric}'] for r in group], np.float64)
        reached = [r for r in group if r['steps_to_target'] is not None]
        table.append(
            {
                'arm': arm,
                'budget': budget,
                'train_examples': _mean_or_none([r['train_examples'] for r in group]),
                'seeds': len(group),
                'mean': float(final.mean()),
                'std': float(final.std(ddof=1)) if len(group) > 1 else 0.0,
                'best_mean': float(np.mean([r[f'best_{metric}'] for r in group])),
                'reached': len(reached),
                'steps_to_target': _mean_or_none([r['steps_to_target'] for r in reached]),
                'time_to_target_sec': _mean_or_none(
                    [r['train_time_to_target_sec'] for r in reached]
                ),
                'wall_time_sec': float(np.mean([r['wall_time_sec'] for r in group])),
            }
        )
    table.sort(key=lambda t: t['budget'])  # stable: arms stay in the study's order
    return table


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return '-'
    if isinstance(value, float):
        return f'{value:.{digits}f}'
    return str(value)


def markdown(table: list[dict], metric: str, target: float) -> str:
    """The table: a line per budget; per arm the final metric (mean ± std over seeds) and
    the steps and training seconds to reach `target` (mean over the seeds that did)."""
    arms = list(dict.fromkeys(t['arm'] for t in table))
    by_key = {(t['arm'], t['budget']): t for t in table}
    budgets = sorted({t['budget'] for t in table})
    head = ['budget', 'labels', *(f'{arm} {metric}' for arm in arms)]
    gain = 'pretrained' in arms and 'scratch' in arms
    if gain:
        head.append('pretrained - scratch')
    head += [f'{arm}: steps (s) to {target:g}' for arm in arms]
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for budget in budgets:
        rows = [by_key.get((arm, budget)) for arm in arms]
        first = next(t for t in rows if t)
        line = [f'{budget:g}', _fmt(first['train_examples'], 0)]
        line += [f'{t["mean"]:.3f} ± {t["std"]:.3f}' if t else '-' for t in rows]
        if gain:
            p, s = by_key.get(('pretrained', budget)), by_key.get(('scratch', budget))
            line.append(f'{p["mean"] - s["mean"]:+.3f}' if p and s else '-')
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


def plot(path: str, table: list[dict], metric: str, target: float, title: str) -> None:
    """Accuracy against labelled examples (log scale), one line per arm, std error bars."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for arm in dict.fromkeys(t['arm'] for t in table):
        rows = sorted((t for t in table if t['arm'] == arm), key=lambda t: t['budget'])
        x = [t['train_examples'] or t['budget'] for t in rows]
        ax.errorbar(
            x,
            [t['mean'] for t in rows],
            yerr=[t['std'] for t in rows],
            marker='o',
            capsize=3,
            label=arm,
        )
    ax.axhline(target, color='gray', linestyle=':', linewidth=1, label=f'target {target:g}')
    ax.set_xscale('log')
    ax.set_xlabel('labelled training examples')
    ax.set_ylabel(f'final {metric} (mean ± std over seeds)')
    ax.set_title(title)
    ax.grid(True, which='both', alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(workdir: str, result: dict) -> None:
    """study.json (everything), study.csv (the table), study.png; each replaced atomically."""
    path = os.path.join(workdir, 'study.json')
    with open(path + '.tmp', 'w') as f:
        json.dump(result, f, indent=2)
    os.replace(path + '.tmp', path)
    path = os.path.join(workdir, 'study.csv')
    with open(path + '.tmp', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: t[k] for k in COLUMNS} for t in result['table'])
    os.replace(path + '.tmp', path)
    path = os.path.join(workdir, 'study.png')
    title = f'{result["study"]}: pretrained vs from scratch'
    plot(path + '.tmp.png', result['table'], result['metric'], result['target'], title)
    os.replace(path + '.tmp.png', path)
