"""What every stage entrypoint does around its trainer: logging, errors, exit codes.

Exit codes: 0 done (or preempted after saving), 1 error with a message naming the cause
and the fix, 124 watchdog (core/watchdog.py).
"""

import difflib
import importlib.util
import logging as pylogging
import os
import sys

from absl import logging

from core import config as config_lib
from core.errors import UserError

__all__ = ['UserError', 'check_config_overrides', 'run_stage']


def _argv_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + '='):
            return arg[len(flag) + 1 :]
    return None


def check_config_overrides(argv: list[str]) -> None:
    """Fails with exit code 1 and a did-you-mean message on an override of a config key
    that does not exist (ml_collections would raise a bare AttributeError mid-parse)."""
    spec = _argv_value(argv, '--config')
    if not spec:
        return
    path, _, preset = spec.partition(':')
    if not os.path.isfile(path):
        _fail(f'config file {path} not found; give e.g. --config configs/bert_mlm.py:tiny')
    module_spec = importlib.util.spec_from_file_location('_pretrax_config', path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        config = module.get_config(preset) if preset else module.get_config()
    except ValueError as e:  # unknown preset and the like
        _fail(f'{path}: {e}')
    keys = set(config_lib.flatten(config))
    config_lib.COMMAND_LINE_KEYS.update(
        a[len('--config.') :].split('=', 1)[0] for a in argv if a.startswith('--config.')
    )
    prefixes = {k.rsplit('.', i)[0] for k in keys for i in range(k.count('.') + 1)}
    for arg in argv:
        if not arg.startswith('--config.'):
            continue
        key = arg[len('--config.') :].split('=', 1)[0]
        if key not in prefixes:
            close = difflib.get_close_matches(key, sorted(keys), n=3)
            hint = f'; did you mean {", ".join(close)}?' if close else ''
            _fail(f'unknown config key {key!r} in {arg!r} for {spec}{hint}')


def _fail(message: str) -> None:
    sys.stderr.write(f'error: {message}\n')
    sys.exit(1)


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
