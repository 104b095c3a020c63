"""The workdir contract (ARCHITECTURE.md, "Workdir"), checked by the project's own tests:
`check_workdir(WORKDIR, metric)` after a run of any stage.

  config.json        the resolved config, JSON
  metrics.jsonl      one JSON object a line: int `step`, str `split`, numbers otherwise;
                     train rows with loss, learning_rate, grad_norm, examples_per_sec (and
                     tokens_per_sec for text; none on a row of the compiled step alone); an
                     eval row at step 0; the metric in every eval row; with a test split, one
                     test row at the end
  tensorboard/       an event file
  checkpoints/<step> at least one step
  summary.json       written last: the final eval figure of the metric (and, with a test
                     split, test_<metric> and test_step of the test row)
"""

import json
import math
import os

TRAIN_KEYS = ('loss', 'learning_rate', 'grad_norm', 'examples_per_sec')
THROUGHPUT_KEYS = ('examples_per_sec', 'tokens_per_sec')


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _read_json(path: str, problems: list[str]):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        problems.append(f'missing {os.path.basename(path)}')
    except ValueError as e:
        problems.append(f'{os.path.basename(path)} is not JSON: {e}')
    return None


def _read_rows(path: str, problems: list[str]) -> list[dict]:
    if not os.path.isfile(path):
        problems.append('missing metrics.jsonl')
        return []
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                problems.append(f'metrics.jsonl line {n} is not JSON')
                continue
            if not isinstance(row, dict):
                problems.append(f'metrics.jsonl line {n} is not an object')
                continue
            step, split = row.get('step'), row.get('split')
            if not (isinstance(step, int) and not isinstance(step, bool)):
                problems.append(f'metrics.jsonl line {n}: step {step!r} is not an int')
            if not isinstance(split, str):
                problems.append(f'metrics.jsonl line {n}: split {split!r} is not a str')
            for key, value in row.items():
                if key not in ('step', 'split') and not _is_number(value):
                    problems.append(f'metrics.jsonl line {n}: {key}={value!r} is not a number')
            rows.append(row)
    return rows


def _same(a, b) -> bool:
    return _is_number(a) and _is_number(b) and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def workdir_problems(
    workdir: str, metric: str, *, text: bool | None = None, test_split: bool | None = None
) -> list[str]:
    """What in `workdir` breaks the contract (empty: nothing). `text`: train rows must carry
    tokens_per_sec (default: the config has a vocabulary, data.vocab_file). `test_split`:
    the run had one (default: its config names data.test_files / data.test_split, or it
    wrote a test row or test_<metric>)."""
    workdir = str(workdir)
    problems: list[str] = []
    config = _read_json(os.path.join(workdir, 'config.json'), problems)
    if config is not None and not isinstance(config, dict):
        problems.append('config.json is not a JSON object')
    data = config.get('data', {}) if isinstance(config, dict) else {}
    rows = _read_rows(os.path.join(workdir, 'metrics.jsonl'), problems)
    summary_path = os.path.join(workdir, 'summary.json')
    summary = _read_json(summary_path, problems)
    if summary is not None and not isinstance(summary, dict):
        problems.append('summary.json is not a JSON object')
        summary = None

    train = [r for r in rows if r.get('split') == 'train']
    evals = [r for r in rows if r.get('split') == 'eval']
    if not train:
        problems.append('no train rows')
    if text is None:
        text = 'vocab_file' in data
    keys = TRAIN_KEYS + (('tokens_per_sec',) if text else ())
    previous = 0
    for row in train:
        missing = [k for k in keys if k not in row]
        # Throughput times training steps only: a row whose one step is the compiled first
        # step of a start has none to time, and carries no throughput (the others must).
        if missing and set(missing) <= set(THROUGHPUT_KEYS) and row.get('step') == previous + 1:
            missing = []
        if missing:
            problems.append(f'train row of step {row.get("step")} lacks {missing}')
        previous = row.get('step') if isinstance(row.get('step'), int) else previous
    if train and not any('examples_per_sec' in r for r in train):
        problems.append('no train row carries examples_per_sec')
    if not any(r.get('step') == 0 for r in evals):
        problems.append('no eval row at step 0')
    for row in evals:
        if metric not in row:
            problems.append(f'eval row of step {row.get("step")} lacks {metric}')

    if test_split is None:
        test_split = (
            bool(data.get('test_files') or data.get('test_split'))
            or any(r.get('split') == 'test' for r in rows)
            or (summary is not None and f'test_{metric}' in summary)
        )
    if test_split:
        tests = [i for i, r in enumerate(rows) if r.get('split') == 'test']
        if len(tests) != 1:
            problems.append(f'{len(tests)} test rows; a run with a test split ends with one')
        else:
            row = rows[tests[0]]
            after = [r.get('split') for r in rows[tests[0] + 1 :]]
            if any(split in ('train', 'eval') for split in after):
                problems.append(f'the test row is followed by {after}: it must end the run')
            if metric not in row:
                problems.append(f'the test row lacks {metric}')
            if summary is not None:
                if not _same(summary.get(f'test_{metric}'), row.get(metric)):
                    problems.append(
                        f'summary.json test_{metric}={summary.get(f"test_{metric}")!r}, the '
                        f'test row {row.get(metric)!r}'
                    )
                if summary.get('test_step') != row.get('step'):
                    problems.append(
                        f'summary.json test_step={summary.get("test_step")!r}, the test row '
                        f'{row.get("step")!r}'
                    )

    if summary is not None and evals and metric in evals[-1]:
        final = summary.get(f'final_{metric}')
        if not _same(final, evals[-1][metric]):
            problems.append(
                f'summary.json final_{metric}={final!r}, the last eval row {evals[-1][metric]!r}'
            )
    if summary is not None:
        newer = [
            name
            for name in ('config.json', 'metrics.jsonl', 'checkpoints')
            if os.path.exists(os.path.join(workdir, name))
            and os.path.getmtime(os.path.join(workdir, name)) > os.path.getmtime(summary_path)
        ]
        if newer:
            problems.append(f'summary.json is not written last: {newer} changed after it')

    checkpoints = os.path.join(workdir, 'checkpoints')
    steps = (
        [d for d in os.listdir(checkpoints) if d.isdigit()] if os.path.isdir(checkpoints) else []
    )
    if not steps:
        problems.append('no checkpoints/<step> directory')
    tensorboard = os.path.join(workdir, 'tensorboard')
    events = (
        [f for f in os.listdir(tensorboard) if f.startswith('events.out.tfevents')]
        if os.path.isdir(tensorboard)
        else []
    )
    if not events:
        problems.append('no TensorBoard event file in tensorboard/')
    return problems


def check_workdir(
    workdir: str, metric: str, *, text: bool | None = None, test_split: bool | None = None
) -> None:
    """Asserts that `workdir` meets the contract; the message lists every problem."""
    problems = workdir_problems(workdir, metric, text=text, test_split=test_split)
    assert not problems, f'{workdir} breaks the workdir contract:\n' + '\n'.join(problems)
