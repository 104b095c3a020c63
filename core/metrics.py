"""Metrics to `metrics.jsonl`, TensorBoard and the log; `summary.json` at the end.

Only process 0 writes; the others get a writer that does nothing, so callers need no
`if process_index == 0` around every call.
"""

import json
import os
import time

from absl import logging


class MetricWriter:
    def __init__(self, workdir: str, enabled: bool = True):
        self.workdir = workdir
        self.enabled = enabled
        self._tb = None  # opened by truncate_after (the start of a run) or the first write
        self._path = os.path.join(workdir, 'metrics.jsonl')

    def _open_tensorboard(self, purge_step: int | None = None) -> None:
        from tensorboardX import SummaryWriter  # TensorBoard files without TensorFlow

        self._tb = SummaryWriter(
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
        with open(self._path) as f:
            rows = [line for line in f if line.strip() and json.loads(line)['step'] <= step]
        tmp = self._path + '.tmp'
        with open(tmp, 'w') as f:
            f.writelines(rows)
        os.replace(tmp, self._path)

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

    def write_summary(self, summary: dict) -> None:
        if not self.enabled:
            return
        path = os.path.join(self.workdir, 'summary.json')
        with open(path + '.tmp', 'w') as f:
            json.dump(summary, f, indent=2, sort_keys=True)
        os.replace(path + '.tmp', path)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f if line.strip()]


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'
    if seconds >= 60:
        return f'{seconds // 60}m{seconds % 60:02d}s'
    return f'{seconds}s'


class Progress:
    """Throughput and ETA over the steps since the last report."""

    def __init__(self, start_step: int, total_steps: int):
        self.total_steps = total_steps
        self._step, self._time = start_step, time.perf_counter()

    def update(self, step: int) -> tuple[float, float]:
        """(seconds per step since the last call, estimated seconds to the end)."""
        now = time.perf_counter()
        per_step = (now - self._time) / max(step - self._step, 1)
        self._step, self._time = step, now
        return per_step, per_step * (self.total_steps - step)

    def log(self, step: int, row: dict, eta: float) -> None:
        shown = ' | '.join(
            f'{k} {v:.4g}' for k, v in row.items() if k not in ('step', 'split', 'learning_rate')
        )
        logging.info(
            'step %d/%d | %s | eta %s', step, self.total_steps, shown, format_duration(eta)
        )
