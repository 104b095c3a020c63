"""Exits with code 124 when no step finishes within `watchdog_secs`: a hung collective or
a stalled input pipeline must not burn a whole allocation."""

import os
import sys
import threading
import time

WATCHDOG_EXIT_CODE = 124


class Watchdog:
    def __init__(self, timeout_secs: float, what: str = 'step'):
        self.timeout = timeout_secs
        self.what = what
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = None
        if timeout_secs > 0:
            self._thread = threading.Thread(target=self._run, daemon=True, name='watchdog')
            self._thread.start()

    def ping(self) -> None:
        self._last = time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            idle = time.monotonic() - self._last
            if idle > self.timeout:
                sys.stderr.write(
                    f'watchdog: no {self.what} finished in {idle:.0f}s (watchdog_secs='
                    f'{self.timeout:g}); a collective or the input pipeline is hung. Exiting '
                    f'with code {WATCHDOG_EXIT_CODE}; restart to resume from the last '
                    'checkpoint\n'
                )
                sys.stderr.flush()
                os._exit(WATCHDOG_EXIT_CODE)
