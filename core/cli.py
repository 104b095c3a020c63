"""What every stage entrypoint does around its trainer: logging, errors, exit codes.

Exit codes: 0 done (or preempted after saving), 1 error with a message naming the cause
and the fix (no traceback: `error_message` says which errors are a user's), 124 watchdog
(core/watchdog.py), 130 Ctrl-C (a line saying so, no traceback).
"""

import difflib
import errno
import os
import sys
import traceback

from absl import logging

from core import config as config_lib
from core import reference, runlog
from core.errors import UserError

__all__ = [
    'UserError',
    'argv_value',
    'check_config_overrides',
    'error_message',
    'fail_with',
    'interrupted',
    'run_stage',
]


def argv_value(argv: list[str], flag: str) -> str | None:
    """The value of `flag` in `argv` (`--flag VALUE` or `--flag=VALUE`), or None."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + '='):
            return arg[len(flag) + 1 :]
    return None


def check_config_overrides(argv: list[str], default=None) -> None:
    """Fails with exit code 1 and a did-you-mean message on an override of a config key
    that does not exist (ml_collections would raise a bare AttributeError mid-parse).
    `default`: the config when argv has no --config (evaluate's: the run's own)."""
    spec = argv_value(argv, '--config')
    if not spec and default is None:
        return
    if not spec:
        spec, config = "the run's config.json", default
    else:
        config = _load_config(spec)
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


def _load_config(spec: str):
    """get_config(PRESET) of `FILE[:PRESET]`; a missing file, an unknown preset or a config
    file that fails exits 1 with one line."""
    path, _, preset = spec.partition(':')
    if not os.path.isfile(path):
        _fail(f'config file {path} not found; give e.g. --config configs/bert_mlm.py:tiny')
    try:
        module = reference.load_file(path)
        return module.get_config(preset) if preset else module.get_config()
    except ValueError as e:  # unknown preset and the like
        _fail(f'{path}: {e}')
    except Exception as e:  # the config file's own code failed: say where
        what = e.msg if isinstance(e, SyntaxError) else str(e)
        _fail(f'{spec}: {_where_in(e, path)}{type(e).__name__}: {what}; fix the config file')


def _where_in(e: BaseException, path: str) -> str:
    """'FILE line N: ' of the innermost frame of `e` in `path` (a syntax error's own line)."""
    if isinstance(e, SyntaxError) and e.lineno:
        return f'line {e.lineno}: '
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == path]
    return f'line {frames[-1].lineno}: ' if frames else ''


def error_message(e: BaseException) -> str | None:
    """The one-line message for an error a user caused, or None for one that is a bug (its
    traceback is then shown). UserError: its message. An OSError on a path (a directory
    where a file was expected, no permission, a missing parent) or a full disk: the path,
    the system's reason and where to look."""
    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f' writing {e.filename}' if e.filename else ''
        return (
            f'{e.strerror}{where}; free space on that disk (old runs, checkpoints), or give '
            'a --workdir on another'
        )
    if isinstance(e, OSError) and e.filename:
        target = f' -> {e.filename2}' if e.filename2 else ''
        return (
            f'{e.filename}{target}: {e.strerror} ({type(e).__name__}); check that path, given '
            'on the command line or in the config, and its permissions'
        )
    return None


def fail_with(e: BaseException) -> int:
    """Reports a user's error (`error_message`) on stderr and in the log; returns exit
    code 1. Anything else is re-raised, traceback and all."""
    message = error_message(e)
    if message is None:
        raise e
    logging.error('%s', message, extra=runlog.ONLY)  # for log.txt
    sys.stderr.write(f'error: {message}\n')
    sys.stderr.flush()
    return 1


def interrupted(what: str) -> int:
    """Ctrl-C: a line saying so instead of a traceback; returns exit code 130 (the shell's
    for SIGINT)."""
    logging.warning('interrupted (Ctrl-C)', extra=runlog.ONLY)
    sys.stderr.write(f'interrupted (Ctrl-C): {what}\n')
    sys.stderr.flush()
    return 130


def _fail(message: str) -> None:
    sys.stderr.write(f'error: {message}\n')
    sys.exit(1)


def setup_logging() -> None:
    """Concise lines on stderr, quiet libraries, records held for WORKDIR/log.txt
    (core/runlog.py)."""
    runlog.setup(logging.INFO)


REPORTED = ('pretrain', 'finetune')  # the stages whose end is reported on stdout


def run_stage(fn, config, workdir: str, stage: str | None = None) -> dict:
    """Runs a stage's `fn(config, workdir)` with its logging set up, a start-up line first
    and the report of a training run last; a user's error or Ctrl-C exits with its code."""
    setup_logging()
    if stage is not None:  # what runs, before anything slow
        argv = sys.argv[1:]
        spec = argv_value(argv, '--config')
        logging.info('%s', runlog.start_line(stage, config, workdir, argv, spec))
    try:
        result = fn(config, workdir)
    except KeyboardInterrupt:
        sys.exit(interrupted('the run stops here; rerun the same command to resume it'))
    except Exception as e:  # a user's error exits 1 with its message; a bug re-raises
        sys.exit(fail_with(e))
    if stage in REPORTED and isinstance(result, dict) and 'completed' in result:
        import jax  # (loaded by the run)

        if jax.process_index() == 0:  # what the run reached and where its files are
            print(runlog.report(result, workdir, config.total_steps), flush=True)
    return result
