"""What the training loop keeps track of, one small object a concern (core/trainer.py runs
the loop): the pauses of the watchdog and the throughput clock, the training clock of eval
rows, the eval history and early stopping, SIGTERM and the processes' agreement on it, the
non-finite guard, the loss-rise warning, and the train rows made from the steps' metrics.
"""

import contextlib
import functools
import os
import signal
import time
from collections.abc import Callable, Iterator

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from core import flops as flops_lib
from core import metrics as metrics_lib
from core import recipe
from core import watchdog as watchdog_lib
from core.errors import UserError


class NonFiniteLossError(UserError, RuntimeError):
    """The loss or the gradient norm became NaN or Inf; the message gives the step."""


ADVICE = 'Lower learning_rate, raise warmup_steps or check the data'


class Pauses:
    """Phases that are slow by nature (compilation, evals, saves, the test scoring) count
    neither as training time nor against the watchdog."""

    def __init__(self, watchdog: watchdog_lib.Watchdog, progress: metrics_lib.Progress):
        self.watchdog, self.progress = watchdog, progress

    @contextlib.contextmanager
    def paused(self, phase: str) -> Iterator[None]:
        """The clock stops first, waiting for the steps dispatched so far (under the
        watchdog), so every step before the pause is timed in full."""
        with self.progress.paused(), self.watchdog.paused(phase):
            yield

    def compile_began(self) -> None:
        self.progress.pause()
        self.watchdog.pause('compiling')

    def compile_ended(self, seconds: float) -> None:  # (the compile's duration: not needed)
        self.watchdog.resume()
        self.progress.resume()


class TrainClock:
    """The training clock of eval rows (`train_time_sec`): seconds spent training, evals
    left out and compilation kept in, carried across restarts; it measures time-to-accuracy."""

    def __init__(self, offset: float):
        self.offset, self.start, self.evals = offset, time.perf_counter(), 0.0

    def now(self) -> float:
        return self.offset + time.perf_counter() - self.start - self.evals

    def leave_out(self, since: float) -> None:
        """The time from perf_counter() value `since` to now was not training."""
        self.evals += time.perf_counter() - since


class EvalHistory:
    """The eval rows of this start of the run; early stopping after `patience` evals without
    a new best of `metric` (0: never)."""

    def __init__(self, metric: str, patience: int):
        self.metric, self.patience = metric, patience
        self.rows: list[dict] = []

    def add(self, step: int, result: dict) -> None:
        self.rows.append({'step': step, **result})

    def best(self) -> dict:
        return max(self.rows, key=lambda r: r.get(self.metric, -np.inf))

    def at(self, step: int) -> dict | None:
        """The eval row of `step`, if the last eval was at that step."""
        return self.rows[-1] if self.rows and self.rows[-1]['step'] == step else None

    def should_stop(self, step: int) -> bool:
        if not self.patience or self.at(step) is None:
            return False
        return len(self.rows) - 1 - self.rows.index(self.best()) >= self.patience

    def stop_message(self, step: int) -> str:
        best = self.best()
        return (
            f'early stopping at step {step}: {self.metric} has not improved for '
            f'{self.patience} evals (best {best[self.metric]:.4f} at step {best["step"]})'
        )


class Preemption:
    """SIGTERM (preemption): finish the step, save, exit 0. On several processes the signal
    may reach them at different steps: they agree at the next step where every process
    checks (a log, eval or save step), so all save the same step and none is left waiting
    in a collective. A context: the handler is installed inside it."""

    def __enter__(self) -> 'Preemption':
        self.signalled: list[bool] = []
        self._previous = signal.signal(signal.SIGTERM, lambda *_: self.signalled.append(True))
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def agreed(self, check_point: bool) -> bool:
        if jax.process_count() == 1:
            return bool(self.signalled)
        if not check_point:
            return False
        flags = multihost_utils.process_allgather(np.array([bool(self.signalled)], np.int32))
        return bool(np.any(flags))


class NonFiniteGuard:
    """A NaN/Inf loss or gradient norm stops the run (its update has already made the
    parameters NaN, and no checkpoint may save them), unless `skip_nonfinite_steps` > 0:
    then such updates were skipped by the step and the run stops after more in a row."""

    def __init__(self, max_skipped: int, last_good: Callable[[], str]):
        self.max_skipped, self.last_good = max_skipped, last_good
        self.total = self.streak = 0  # skipped updates, in all and in a row

    def drop_skipped(self, host: list[dict], first: int) -> list[dict]:
        """Counts the skipped steps among `host` (steps `first`, `first` + 1, ...); returns
        the others. Raises once more than `max_skipped` were skipped in a row."""
        for i, h in enumerate(host):
            if not h['skipped']:
                self.streak = 0
                continue
            self.total += 1
            self.streak += 1
            logging.warning('step %d: non-finite loss or gradient norm, update skipped', first + i)
            if self.streak > self.max_skipped:
                raise NonFiniteLossError(
                    f'{self.streak} steps in a row up to step {first + i} had a non-finite loss '
                    f'or gradient norm (skip_nonfinite_steps={self.max_skipped}); '
                    f'{self.last_good()}. {ADVICE}'
                )
        return [h for h in host if not h['skipped']]

    def check(self, host: list[dict], first: int, last: int) -> None:
        for i, h in enumerate(host):
            what = [k for k in ('loss', 'grad_norm') if k in h and not np.isfinite(h[k])]
            if what:
                name = 'loss' if what[0] == 'loss' else 'gradient norm'
                raise NonFiniteLossError(
                    f'the {name} became non-finite at step {first + i} (steps {first}-{last} '
                    f'checked); {self.last_good()}. {ADVICE}'
                )


class LossRise:
    """Warns once when a train row's loss is more than twice (and 1 nat above) the loss of
    the first step of this start of the run (computed before its update): a diverging run,
    not noise. `step` is the row where it did (None: it did not)."""

    def __init__(self, message: Callable[[str, float, float], str]):
        self.message = message  # (steps, loss, start) -> the warning
        self.start: float | None = None
        self.step: int | None = None

    def check(self, steps: str, step: int, loss: float | None, first: float | None) -> None:
        if loss is None or self.step is not None:
            return
        if self.start is None:
            if first is None or not np.isfinite(first):  # every step skipped: no start yet
                return
            self.start = float(first)
        if loss > 2 * self.start and loss > self.start + 1.0:
            self.step = step
            logging.warning('%s', self.message(steps, loss, self.start))


class TrainRows:
    """The steps' device metrics since the last train row, made into that row at a log,
    eval or save step: averaged, checked (non-finite, loss rise), with the throughput of the
    training steps among them (no eval, save or compile in the interval counts, and a row
    whose only step is the compiled first one carries no throughput)."""

    def __init__(
        self, config, task, writer, progress, watchdog, guard, loss_rise, peak, start_step
    ):
        self.config, self.task, self.writer = config, task, writer
        self.progress, self.watchdog, self.guard, self.loss_rise = (
            progress,
            watchdog,
            guard,
            loss_rise,
        )
        self.peak = peak  # FLOP/s per device, 0 when not known
        self.pending: list[dict] = []
        self.last = start_step  # the step of the last row

    def add(self, metrics: dict) -> None:
        self.pending.append(metrics)

    def flush(self, step: int) -> None:
        if not self.pending:
            return
        first = self.last + 1
        self.watchdog.phase = f'waiting for steps {first}-{step} to finish (their metrics)'
        host = jax.device_get(self.pending)
        if self.guard.max_skipped:
            host = self.guard.drop_skipped(host, first) or [
                {k: v for k, v in host[-1].items() if k in ('learning_rate', 'skipped')}
            ]
        rows = {k: float(np.mean([h[k] for h in host])) for k in host[0]}
        if self.guard.max_skipped:
            rows.pop('skipped')
            rows['skipped_steps'] = float(self.guard.total)  # by this start of the run
        self.guard.check(host, first, step)
        per_step, eta = self.progress.update(step)
        if per_step is not None:
            batch, task = self.config.batch_size, self.task
            rows['examples_per_sec'] = batch / per_step
            if task.tokens_per_example:
                rows['tokens_per_sec'] = batch * task.tokens_per_example / per_step
            rows['step_time_ms'] = per_step * 1e3
            if self.peak and task.flops_per_step:
                rows['mfu'] = task.flops_per_step / per_step / (self.peak * jax.device_count())
        self.writer.write(step, 'train', rows)
        self.progress.log(step, rows, eta)
        self.loss_rise.check(f'{first}-{step}', step, rows.get('loss'), host[0].get('loss'))
        self.pending, self.last = [], step


def train_time_at(workdir: str, step: int) -> float:
    """The training clock at `step` of an earlier run in `workdir` (0 for a new run)."""
    try:
        rows = metrics_lib.read_metrics(workdir)
    except FileNotFoundError:
        return 0.0
    times = [r['train_time_sec'] for r in rows if r['step'] <= step and 'train_time_sec' in r]
    return times[-1] if times else 0.0


class Trackers:
    """Everything above, made for one start of a run, and the eval (under a pause, left out
    of the training clock, written and kept in the history)."""

    def __init__(self, config, task, workdir: str, writer, last_good, start_step: int):
        self.task, self.writer = task, writer
        stacks = 'watchdog_stacks.txt'
        if jax.process_count() > 1:
            stacks = f'watchdog_stacks.process{jax.process_index()}.txt'
        self.watchdog = watchdog_lib.Watchdog(
            config.watchdog_secs, stacks_path=os.path.join(workdir, stacks)
        )
        self.progress = metrics_lib.Progress(
            start_step,
            config.total_steps,
            sync=lambda: jax.block_until_ready(self.rows.pending),
            live=jax.process_index() == 0,
        )
        self.pauses = Pauses(self.watchdog, self.progress)
        self.clock = TrainClock(train_time_at(workdir, start_step))
        self.history = EvalHistory(task.metric, config.get('early_stopping_patience', 0))
        guard = NonFiniteGuard(config.get('skip_nonfinite_steps', 0), last_good)
        self.loss_rise = LossRise(functools.partial(loss_rise_message, config))
        precision = config.get('precision', 'float32')
        peak = flops_lib.peak_flops_per_device(config.peak_tflops, precision)
        self.rows = TrainRows(
            config,
            task,
            writer,
            self.progress,
            self.watchdog,
            guard,
            self.loss_rise,
            peak,
            start_step,
        )

    def evaluate(self, step: int, stepper, params) -> None:
        """The eval at `step`: its row (with `eval_time_sec`, the eval's own wall time once
        the steps before it are done) and its line, which says how much of that time was
        compiling (the first eval compiles the eval functions; later ones should not)."""
        began = time.perf_counter()
        train_time = self.clock.now()
        with self.pauses.paused(f'evaluating at step {step}'):
            eval_began = time.perf_counter()  # the steps before it are done: not counted
            with watchdog_lib.compile_seconds() as compiled:
                result = self.task.evaluate(stepper, params)
            seconds = time.perf_counter() - eval_began
        self.clock.leave_out(began)
        self.writer.write(
            step, 'eval', {**result, 'train_time_sec': train_time, 'eval_time_sec': seconds}
        )
        self.history.add(step, result)
        took = f'{seconds:.1f}s' + (f' ({compiled():.1f}s compiling)' if compiled() >= 0.05 else '')
        figures = ' | '.join(f'{k} {v:.4f}' for k, v in result.items())
        logging.info('eval step %d | %s | %s', step, figures, took)


# --- What a run gone wrong is told: collapse and loss rise ------------------------------


def _rate_advice(config) -> str:
    """The likely cause of a collapsed or diverging run, and the flags to change."""
    if config.get('init_from'):
        start = f'from the pretrained encoder of {config.init_from}'
        text = not config.model.get('patch_size')
        row = recipe.recipe_for(config.model.hidden_size).learning_rate if text else 0.0
        lower = (
            f"{row:g}, the recipe's for this encoder"
            if 0 < row < config.learning_rate
            else f'{config.learning_rate / 10:g}'
        )
    else:
        start, lower = 'from scratch', f'{config.learning_rate / 10:g}'
    return (
        f'This run starts {start} at learning_rate={config.learning_rate:g}; the likely cause '
        f'is a rate too high for that start (or, from scratch, too few steps): rerun with a '
        f'lower --config.learning_rate (e.g. {lower}) or a longer --config.warmup_steps'
    )


def collapsed_since(eval_history: list[dict]) -> int | None:
    """The step from which every eval to the last one predicted a single class (a
    classifier that ends as a constant), or None. The step-0 eval is left out: a new head
    predicts one class by construction (zero-initialised), and so may the first evals of
    a healthy run from scratch; what counts is where the run ends."""
    since = None
    for row in reversed(eval_history):
        if row['step'] == 0 or row.get('predicted_classes') != 1:
            break
        since = row['step']
    return since


def collapse_message(config, since: int, last: int) -> str:
    """The warning for a run whose validation predictions end as all one class."""
    return (
        f'collapse: every validation prediction is one class (the model predicts a '
        f'constant) at every eval from step {since} to step {last}. {_rate_advice(config)}. '
        'summary.json records it as collapsed_step.'
    )


def loss_rise_message(config, steps: str, loss: float, start: float) -> str:
    """The warning for a training loss far above where the run started."""
    return (
        f'loss rose: the training loss of steps {steps} is {loss:.4g}, more than twice its '
        f'{start:.4g} at the start of this run. {_rate_advice(config)}. summary.json records '
        'it as loss_rose_step.'
    )
