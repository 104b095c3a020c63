"""Metrics to `metrics.jsonl`, TensorBoard, the trackers `config.loggers` names (W&B,
MLflow: core/trackers.py) and the log; `summary.json` at the end.

Only process 0 writes; the others get a writer that does nothing, so callers need no
`if process_index == 0` around every call.
"""

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from absl import logging

from core import trackers as trackers_lib
from core.files import atomic_write
from core.runlog import LiveBar


class MetricWriter:
    """`config` (optional) names the loggers (`config.loggers`, default jsonl and
    TensorBoard) and is what trackers get as hyper-parameters."""

    def __init__(self, workdir: str, enabled: bool = True, config=None):
        self.workdir = workdir
        self.enabled = enabled
        self.config = config
        loggers = (config or {}).get('loggers', 'jsonl,tensorboard')
        self._names = trackers_lib.parse(loggers) if enabled else ()
        self._tb = None  # opened by truncate_after (the start of a run) or the first write
        # Opened by the first write: a run found complete (which writes nothing) opens none.
        self._trackers = None
        self._path = os.path.join(workdir, 'metrics.jsonl')

    def _open_trackers(self) -> list:
        if self._trackers is None:
            self._trackers = trackers_lib.open_trackers(self.workdir, self.config or {})
        return self._trackers

    def _open_tensorboard(self, purge_step: int | None = None) -> None:
        if 'tensorboard' not in self._names:
            self._tb = _NoTensorBoard()
            return
        self._tb = _summary_writer()(
            os.path.join(self.workdir, 'tensorboard'), flush_secs=30, purge_step=purge_step
        )

    def truncate_after(self, step: int) -> None:
        """Drops rows past `step` (-1: every row), once, as a run starts: on resume from a
        checkpoint at `step` the steps after it are redone, and a start with no checkpoint
        redoes all; no step is held twice. metrics.jsonl is rewritten; TensorBoard, whose
        event files are append-only, is told to hide the events past `step` (tensorboardX's
        purge_step: a SessionLog START at step + 1)."""
        if not self.enabled:
            return
        if self._tb is None:
            self._open_tensorboard(purge_step=step + 1)
        if not os.path.exists(self._path):
            return
        rows = [line for line, row in _rows(self._path) if row['step'] <= step]
        with atomic_write(self._path) as f:
            f.writelines(rows)

    def write(self, step: int, split: str, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {'step': int(step), 'split': split}
        row.update({k: float(v) for k, v in scalars.items()})
        with open(self._path, 'a') as f:
            f.write(json.dumps(row) + '\n')
        if self._tb is None:
            self._open_tensorboard()
        for k, v in scalars.items():
            self._tb.add_scalar(f'{split}/{k}', float(v), int(step))
        for tracker in self._open_trackers():
            tracker.log(int(step), split, {k: float(v) for k, v in scalars.items()})

    def write_summary(self, summary: dict) -> None:
        if not self.enabled:
            return
        with atomic_write(os.path.join(self.workdir, 'summary.json')) as f:
            json.dump(summary, f, indent=2, sort_keys=True)
        for tracker in self._open_trackers():
            tracker.summary(summary)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        for tracker in self._trackers or ():
            tracker.close()


class _NoTensorBoard:
    """What `config.loggers` without tensorboard writes to TensorBoard: nothing."""

    def add_scalar(self, *args) -> None:
        pass

    def close(self) -> None:
        pass


def _summary_writer():
    """tensorboardX's SummaryWriter (TensorBoard files without TensorFlow), imported
    without PyTorch: tensorboardX imports torch when it is installed only to accept torch
    tensors, which pretrax never passes, and that import costs every run seconds of
    start-up (its x2num imports torch itself if ever given one)."""
    if 'tensorboardX.writer' not in sys.modules and 'torch' not in sys.modules:
        sys.modules['torch'] = None  # `import torch` raises ImportError: tensorboardX's fallback
        try:
            import tensorboardX.writer  # noqa: F401
        finally:
            del sys.modules['torch']
    from tensorboardX import SummaryWriter

    return SummaryWriter


def _rows(path: str) -> list[tuple[str, dict]]:
    """(line, row) of metrics.jsonl. A line that is not a JSON row (cut short by a crash of
    the machine or a full disk) is left out with a warning."""
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                row['step']
            except (ValueError, KeyError, TypeError):
                logging.warning('%s line %d is not a metrics row (cut short?); left out', path, n)
                continue
            rows.append((line if line.endswith('\n') else line + '\n', row))
    return rows


def read_metrics(workdir: str) -> list[dict]:
    return [row for _, row in _rows(os.path.join(workdir, 'metrics.jsonl'))]


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'
    if seconds >= 60:
        return f'{seconds // 60}m{seconds % 60:02d}s'
    return f'{seconds}s'


class Progress:
    """Throughput of the training steps, and the run's ETA.

    Throughput runs on a clock of training steps only: it starts once the first step of
    this process is done (that step compiled; it is not timed) and stops inside
    `paused()`: evals, checkpoint saves, any recompilation, the test scoring. `sync` (the
    trainer's: wait for the steps dispatched so far) runs as the clock stops, so with
    asynchronous dispatch a step started before a pause is timed in full and nothing of the
    pause is; `update` runs after the trainer has fetched its metrics, also synchronised.

    The ETA is wall time, evals and saves included at the rate they have occurred: the
    remaining steps times the mean wall seconds per step since the clock started.
    """

    def __init__(
        self,
        start_step: int,
        total_steps: int,
        sync: Callable[[], Any] = lambda: None,
        live: bool = False,
    ):
        self.total_steps = total_steps
        self.bar = LiveBar(total_steps, enabled=live)  # on a terminal only: `tick`
        self._sync = sync
        self._seconds = 0.0  # on the clock, up to its last stop
        self._running_since: float | None = None
        self._depth = 0  # nested pauses
        self._first: tuple[int, float] | None = None  # (step, wall time) as the clock started
        self._reported = (start_step, 0.0)  # (step, clock seconds) at the last update

    def start(self, step: int) -> None:
        """The clock runs from here: `step` (the compiled one) is done."""
        self._first = (step, time.perf_counter())
        self._reported = (step, self.seconds())
        if not self._depth:
            self._running_since = time.perf_counter()

    def seconds(self) -> float:
        """Seconds on the training clock so far."""
        running = self._running_since
        return self._seconds + (time.perf_counter() - running if running is not None else 0.0)

    def pause(self) -> None:
        if not self._depth and self._running_since is not None:
            self._sync()
            self._seconds = self.seconds()
            self._running_since = None
        self._depth += 1

    def resume(self) -> None:
        self._depth = max(self._depth - 1, 0)
        if not self._depth and self._first is not None:
            self._running_since = time.perf_counter()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def update(self, step: int) -> tuple[float | None, float | None]:
        """(training seconds per step over the steps timed since the last call, None when
        none was; estimated seconds to the end, None before any step was timed)."""
        now = self.seconds()
        since = max(self._reported[0], self._first[0]) if self._first else step
        per_step = (now - self._reported[1]) / (step - since) if step > since else None
        self._reported = (step, now)
        return per_step, self.eta(step)

    def eta(self, step: int) -> float | None:
        """Estimated wall seconds to the end; None before any step was timed."""
        if self._first is None or step <= self._first[0]:
            return None
        wall = (time.perf_counter() - self._first[1]) / (step - self._first[0])
        return wall * (self.total_steps - step)

    def tick(self, step: int) -> None:
        """`step` is dispatched: the live bar (a terminal's only) redrawn; nothing to
        compute per step elsewhere."""
        if self.bar.enabled:
            self.bar.update(step, self.eta(step))

    def log(self, step: int, row: dict, eta: float | None) -> None:
        """One line: `step 20/100 | loss 6.93 | <task metrics> | grad_norm 1.6 | lr 1e-04 |
        1939 ex/s | eta 1m05s`; tokens/s, step time and the rest are in metrics.jsonl."""
        logging.info('%s', log_line(step, self.total_steps, row, eta))


# Train-row keys the log line shows in its own words (or leaves to metrics.jsonl).
_SHOWN_APART = (
    'step',
    'split',
    'loss',
    'grad_norm',
    'learning_rate',
    'examples_per_sec',
    'tokens_per_sec',
    'step_time_ms',
    'mfu',
    'skipped_steps',
)


def log_line(step: int, total_steps: int, row: dict, eta: float | None) -> str:
    parts = [f'step {step}/{total_steps}']
    if 'loss' in row:
        parts.append(f'loss {row["loss"]:.4g}')
    parts += [f'{k} {v:.4g}' for k, v in row.items() if k not in _SHOWN_APART]
    if 'grad_norm' in row:
        parts.append(f'grad_norm {row["grad_norm"]:.3g}')
    if 'learning_rate' in row:
        parts.append(f'lr {row["learning_rate"]:.3g}')
    if 'examples_per_sec' in row:
        parts.append(f'{row["examples_per_sec"]:.4g} ex/s')
    if 'mfu' in row:
        parts.append(f'mfu {row["mfu"]:.1%}')
    if row.get('skipped_steps'):
        parts.append(f'skipped {int(row["skipped_steps"])}')
    parts.append(f'eta {format_duration(eta)}' if eta is not None else 'eta -')
    return ' | '.join(parts)
