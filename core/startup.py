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
import time

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
