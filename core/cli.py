"""What every stage entrypoint does around its trainer: logging, errors, exit codes.

Exit codes: 0 done (or preempted after saving), 1 error with a message naming the cause
and the fix, 124 watchdog (core/watchdog.py).
"""

import logging as pylogging
import sys

from absl import logging

from core.errors import UserError

__all__ = ['UserError', 'run_stage']


class _QuietLibraries(pylogging.Filter):
    """Keeps Orbax's and Grain's per-operation INFO lines out of the run's log."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        noisy = any(f'/{lib}/' in record.pathname for lib in ('orbax', 'grain', 'jax'))
        return record.levelno >= pylogging.WARNING or not noisy


def setup_logging() -> None:
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())


def run_stage(fn, config, workdir: str) -> dict:
    setup_logging()
    try:
        return fn(config, workdir)
    except UserError as e:
        logging.error('%s', e)
        sys.stderr.write(f'error: {e}\n')
        sys.stderr.flush()
        sys.exit(1)
