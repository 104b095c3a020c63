"""Where the seconds before a run's first step go: one line when the first step is done,
the same figures in summary.json (`startup_sec`).

The phases, in order (a resumed run restores instead of initialising and has no step-0
eval): `start` (the interpreter, imports and the config, from the process's start when
launch.py started it), `data` (the task's build: corpus, vocabulary, data pipelines,
fixed eval batches, the model), `setup` (optimizer, state shardings, the step functions,
the workdir written), `init` (the state initialised or restored, on device), `eval0` (the
step-0 eval, its compilation included), `step1` (the first train step, compiled and run).
"""

import contextlib
import threading
import time
from collections.abc import Iterator

from absl import logging

# A slow start-up phase says it is still running after this long (core/startup.heartbeat):
# two phases in a row that each end just before it leave at most twice this silent.
HEARTBEAT_SECS = 1.5

# time.time() when launch.py began, for the `start` phase of the process's first run; None
# after it (a study runs several in one process) and when a run is started some other way
# (a test calling the trainer): such a run's profile starts at set-up.
PROCESS_STARTED: float | None = None

NAMES = {
    'start': 'start',
    'data': 'data and model',
    'setup': 'optimizer and step',
    'init': 'init',
    'restore': 'restore',
    'eval0': 'step-0 eval',
    'step1': 'first step',
}


class Profile:
    """Seconds per phase of one start, in the order they ran."""

    def __init__(self, started: float):
        global PROCESS_STARTED
        self.phases: dict[str, float] = {}
        if PROCESS_STARTED is not None:  # the process's first run: its imports too
            self.phases['start'] = max(started - PROCESS_STARTED, 0.0)
            PROCESS_STARTED = None

    @contextlib.contextmanager
    def phase(self, name: str):
        began = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - began

    def add(self, name: str, seconds: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + seconds

    def total(self) -> float:
        return sum(self.phases.values())

    def line(self) -> str:
        parts = ', '.join(f'{NAMES.get(k, k)} {v:.1f}s' for k, v in self.phases.items())
        return f'{self.total():.1f}s ({parts})'

    def summary(self) -> dict[str, float]:
        return {**{k: round(v, 3) for k, v in self.phases.items()}, 'total': round(self.total(), 3)}


class NoProfile:
    """What a caller that keeps no profile passes (a dry run, evaluate)."""

    @contextlib.contextmanager
    def phase(self, name: str):
        yield

    def add(self, name: str, seconds: float) -> None:
        pass


@contextlib.contextmanager
def heartbeat(what: str, first: float = HEARTBEAT_SECS) -> Iterator[None]:
    """A line `what: still at it after Ns` when the block has run `first` seconds, then at
    twice the interval each time (1.5, 4.5, 10.5 s, ...): a long compile or restore is never a
    silent stretch, and a long one does not fill the log."""
    done, began = threading.Event(), time.perf_counter()

    def beat() -> None:
        wait = first
        while not done.wait(wait - (time.perf_counter() - began)):
            logging.info('%s: still at it after %.0fs', what, time.perf_counter() - began)
            wait = 2 * wait + first

    thread = threading.Thread(target=beat, name='heartbeat', daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
