"""Exits with code 124 when no training step finishes within `watchdog_secs`: a hung
collective or a stalled input pipeline must not burn a whole allocation.

The watchdog guards progress, not work that is slow by nature: the trainer runs compilation
(the first step, any recompile: `CompileListener`), evals and checkpoint saves inside
`paused(phase)`, and the allowance starts again when they end. When it
fires it writes every thread's Python stack (to stderr and to `stacks_path`) and the phase
the run was in, then exits: a hang shows where it is stuck.
"""

import contextlib
import faulthandler
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import jax
from absl import logging

WATCHDOG_EXIT_CODE = 124

# Tracing, lowering and compiling a jitted function: jax reports each one's start as a
# scalar (its start time) and its end as a duration, on the thread that does the work.
COMPILE_EVENTS = frozenset(
    {
        '/jax/core/compile/jaxpr_trace_duration',
        '/jax/core/compile/jaxpr_to_mlir_module_duration',
        '/jax/core/compile/backend_compile_duration',
    }
)


def _exit(code: int) -> None:
    os._exit(code)  # the main thread may be stuck in native code: no clean-up is possible


def thread_stacks() -> str:
    """Every thread's Python stack (faulthandler's dump, with the thread names)."""
    with tempfile.TemporaryFile('w+') as f:
        faulthandler.dump_traceback(f, all_threads=True)
        f.seek(0)
        dump = f.read()
    names = ', '.join(f'{t.ident:#018x} {t.name}' for t in threading.enumerate())
    return f'threads: {names}\n{dump}'


class Watchdog:
    """`ping()` after each step; the process exits with code 124 when `timeout_secs` pass
    without one, outside `paused` phases. `phase` says what the guarded code is doing (for
    the message). `timeout_secs` <= 0: off."""

    def __init__(self, timeout_secs: float, what: str = 'step', stacks_path: str | None = None):
        self.timeout = timeout_secs
        self.what = what
        self.stacks_path = stacks_path
        self.phase = 'training'
        self._paused: list[str] = []  # the phases that hold the watchdog, innermost last
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = None
        if timeout_secs > 0:
            self._thread = threading.Thread(target=self._run, daemon=True, name='watchdog')
            self._thread.start()

    def ping(self) -> None:
        self._last = time.monotonic()

    def pause(self, phase: str) -> None:
        self._paused.append(phase)

    def resume(self) -> None:
        if self._paused:
            self._paused.pop()
        self.ping()  # the allowance starts again when the phase ends

    @contextlib.contextmanager
    def paused(self, phase: str) -> Iterator[None]:
        """`phase` (an eval, a save, a compile, the test scoring) is not held to the timeout."""
        self.pause(phase)
        try:
            yield
        finally:
            self.resume()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            idle = time.monotonic() - self._last
            if idle > self.timeout and not self._paused and not self._stop.is_set():
                self._fire(idle)

    def _fire(self, idle: float) -> None:
        stacks = thread_stacks()
        where = ''
        if self.stacks_path:
            try:
                with open(self.stacks_path, 'w') as f:
                    f.write(f'watchdog: {self.phase}, no {self.what} finished in {idle:.0f}s\n')
                    f.write(stacks)
                where = f"; every thread's stack is in {self.stacks_path}"
            except OSError as e:
                where = f'; could not write {self.stacks_path}: {e}'
        sys.stderr.write(stacks)
        logging.error(
            'watchdog: no %s finished in %.0fs (watchdog_secs=%g) while %s; a collective or '
            'the input pipeline is hung (the stacks above show where)%s. Exiting with code %d; '
            'restart to resume from the last checkpoint',
            self.what,
            idle,
            self.timeout,
            self.phase,
            where,
            WATCHDOG_EXIT_CODE,
        )
        sys.stderr.flush()
        _exit(WATCHDOG_EXIT_CODE)


@contextlib.contextmanager
def compile_seconds() -> Iterator[Callable[[], float]]:
    """Inside the block, the seconds this thread has spent tracing, lowering and compiling
    since the block began (`with compile_seconds() as compiled: ...; compiled()`)."""
    total = [0.0]

    def add(seconds: float) -> None:
        total[0] += seconds

    listener = CompileListener(lambda: None, add)
    try:
        yield lambda: total[0]
    finally:
        listener.close()


class CompileListener:
    """Calls `begin()` when jax starts tracing, lowering or compiling a function on this
    thread and `end(seconds)` when that finishes, with its duration (one call each per
    event; they nest), so that a recompile anywhere in the loop is left out of the watchdog
    and the throughput clock. Other threads' compiles (a checkpointer's) are ignored.
    `close()` stops listening."""

    def __init__(self, begin: Callable[[], None], end: Callable[[float], None]):
        thread = threading.get_ident()

        def started(event: str, value: float, **kwargs) -> None:
            if event in COMPILE_EVENTS and threading.get_ident() == thread:
                begin()

        def finished(event: str, duration: float, **kwargs) -> None:
            if event in COMPILE_EVENTS and threading.get_ident() == thread:
                end(duration)

        self._listeners = (started, finished)
        jax.monitoring.register_scalar_listener(started)
        jax.monitoring.register_event_duration_secs_listener(finished)

    def close(self) -> None:
        if self._listeners:
            started, finished = self._listeners
            jax.monitoring.unregister_scalar_listener(started)
            jax.monitoring.unregister_event_duration_listener(finished)
            self._listeners = None
