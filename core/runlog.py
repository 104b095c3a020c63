"""What a run says and records about itself beside its metrics.

stderr: one concise line a record (the message alone; warnings and errors marked
`warning: ` / `error: `), unless PRETRAX_LOG_PREFIX=1 asks for absl's prefix (level, time,
thread, file:line). WORKDIR/log.txt: every record of every start of the run in absl's full
format, appended (process 0); what was logged before the workdir was settled is held and
written first. WORKDIR/run.json: one entry per start (command line, versions, code
revision, devices, processes). `report`: the run's end on stdout.
"""

import contextlib
import importlib.metadata
import json
import logging as pylogging
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator

from absl import logging

from core.files import atomic_write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain', 'numpy')
LOG_FILE, RUN_FILE = 'log.txt', 'run.json'
ONLY = {'file_only': True}  # logging's `extra` of a record kept off stderr (in log.txt only)


_CLEAR = '\r\x1b[K'  # to the start of the line, erased: a live bar's line is free again
_bar_shown: list = []  # [the stream] while a LiveBar's line is on it


class Concise(pylogging.Formatter):
    """The message alone; a warning or an error keeps a mark. A live bar on the terminal
    is cleared first (the next step redraws it under the record)."""

    def format(self, record: pylogging.LogRecord) -> str:
        clear = _CLEAR if _bar_shown else ''
        _bar_shown.clear()
        return clear + self._format(record)

    def _format(self, record: pylogging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += '\n' + self.formatException(record.exc_info)
        if record.levelno >= pylogging.ERROR:
            return f'error: {message}'
        if record.levelno >= pylogging.WARNING:
            return f'warning: {message}'
        return message


class LiveBar:
    """On a terminal, a status line redrawn in place at most every `min_interval` seconds:
    `[######......] 13/100 | eta 40s`. Off when the stream is not a terminal (a file, a
    pipe, CI) or absl's prefixed lines were asked for; log records clear it (Concise)."""

    WIDTH = 24

    def __init__(self, total: int, stream=None, min_interval: float = 0.2, enabled=True):
        self.total, self.stream = max(total, 1), stream or sys.stderr
        self.min_interval = min_interval
        isatty = getattr(self.stream, 'isatty', lambda: False)
        self.enabled = enabled and isatty() and not _prefixed()
        self._last = -float('inf')

    def update(self, step: int, eta: float | None) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self._last < self.min_interval and step < self.total):
            return
        from core.metrics import format_duration

        self._last = now
        filled = self.WIDTH * min(step, self.total) // self.total
        text = f'[{"#" * filled}{"." * (self.WIDTH - filled)}] {step}/{self.total}'
        if eta is not None:
            text += f' | eta {format_duration(eta)}'
        self.stream.write(_CLEAR + text)
        self.stream.flush()
        _bar_shown[:] = [self.stream]

    def close(self) -> None:
        """The bar's line erased (the report and any later line start clean)."""
        if self.enabled and _bar_shown:
            self.stream.write(_CLEAR)
            self.stream.flush()
            _bar_shown.clear()


def _prefixed() -> bool:
    return os.environ.get('PRETRAX_LOG_PREFIX', '') in ('1', 'true')


class Quiet(pylogging.Filter):
    """Orbax's, Grain's and JAX's per-operation INFO lines stay out of the log. On stderr
    (`stderr`), a record logged with extra={'file_only': True} is left out too."""

    def __init__(self, stderr: bool):
        super().__init__()
        self.stderr = stderr

    def filter(self, record: pylogging.LogRecord) -> bool:
        if self.stderr and getattr(record, 'file_only', False):
            return False  # said on stderr in its own words (core/cli.py fail_with)
        noisy = any(f'/{lib}/' in record.pathname for lib in ('orbax', 'grain', 'jax'))
        return record.levelno >= pylogging.WARNING or not noisy


class OrbaxMetadataWarning(pylogging.Filter):
    """Orbax warns `Metadata file does not exist: .../_CHECKPOINT_METADATA` on every read of
    a checkpoint saved without that optional file; nothing for a user to act on."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return not (
            '/orbax/' in record.pathname
            and str(record.msg).startswith('Metadata file does not exist')
        )


class _Held(pylogging.Handler):
    """Records logged before the run's workdir is settled, for its log.txt."""

    LIMIT = 10_000

    def __init__(self):
        super().__init__()
        self.records: list[pylogging.LogRecord] = []

    def emit(self, record: pylogging.LogRecord) -> None:
        if len(self.records) < self.LIMIT:
            self.records.append(record)


def setup(verbosity: int = logging.INFO) -> None:
    """absl's stderr handler concise (or prefixed with PRETRAX_LOG_PREFIX=1), the quiet
    filters on, and records held for log.txt. Idempotent."""
    logging.set_verbosity(verbosity)
    handler = logging.get_absl_handler()
    if not any(isinstance(f, Quiet) for f in handler.filters):
        handler.addFilter(Quiet(stderr=True))
    if not _prefixed():
        handler.setFormatter(Concise())
    absl_logger = logging.get_absl_logger()
    if not any(isinstance(f, OrbaxMetadataWarning) for f in absl_logger.filters):
        absl_logger.addFilter(OrbaxMetadataWarning())
    root = pylogging.getLogger()
    if not any(isinstance(h, _Held) for h in root.handlers):
        root.addHandler(_Held())


@contextlib.contextmanager
def log_file(workdir: str, enabled: bool = True) -> Iterator[None]:
    """WORKDIR/log.txt takes every record from here to the end of the block (appended),
    after the records held since `setup`; nothing when not `enabled` (processes > 0)."""
    root = pylogging.getLogger()
    held = [h for h in root.handlers if isinstance(h, _Held)]
    for h in held:
        root.removeHandler(h)
    if not enabled:
        yield
        return
    handler = pylogging.FileHandler(os.path.join(workdir, LOG_FILE), encoding='utf-8')
    handler.setFormatter(logging.PythonFormatter())
    handler.addFilter(Quiet(stderr=False))
    for h in held:
        for record in h.records:
            handler.handle(record)
    root.addHandler(handler)
    try:
        yield
    except BaseException as e:  # what stopped the run, traceback and all, for log.txt only
        logging.error('the run stopped: %s: %s', type(e).__name__, e, exc_info=True, extra=ONLY)
        raise
    finally:
        root.removeHandler(handler)
        handler.close()


def start_line(stage: str, config, workdir: str, argv: list[str], spec: str | None) -> str:
    """`pretrain mlm: configs/bert_mlm.py:tiny (+3 overrides) -> WORKDIR`; `spec` is the
    --config value (None: evaluate reads the run's own config.json)."""
    spec = spec or os.path.join(workdir, 'config.json')
    overrides = sum(a.startswith('--config.') for a in argv)
    more = f' (+{overrides} overrides)' if overrides else ''
    task = config.get('task', '') if hasattr(config, 'get') else ''
    return f'{stage} {task}'.strip() + f': {spec}{more} -> {os.path.abspath(workdir)}'


def code_revision() -> dict | None:
    """{'commit', 'dirty'} of the git checkout holding this code; None when it is not in
    one, or git is missing."""

    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(
                ['git', '-C', ROOT, *args], capture_output=True, text=True, timeout=20
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout if r.returncode == 0 else None

    commit = git('rev-parse', 'HEAD')
    if not commit:
        return None
    status = git('status', '--porcelain', '--untracked-files=no')
    return {'commit': commit.strip(), 'dirty': None if status is None else bool(status.strip())}


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def record_start(workdir: str, start_step: int) -> dict:
    """Appends this start's entry to WORKDIR/run.json (a list, replaced atomically)."""
    import jax

    devices = jax.devices()
    entry = {
        'start_time': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
        'start_step': int(start_step),
        'argv': list(sys.argv),
        'command': shlex.join([sys.executable, *sys.argv]),
        'cwd': os.getcwd(),
        'python': platform.python_version(),
        'packages': {name: _version(name) for name in PACKAGES},
        'code': code_revision(),
        'devices': {
            'platform': devices[0].platform,
            'kind': devices[0].device_kind,
            'count': jax.device_count(),
        },
        'processes': jax.process_count(),
        'host': platform.node(),
    }
    path = os.path.join(workdir, RUN_FILE)
    starts = []
    if os.path.isfile(path):
        try:
            with open(path) as f:
                starts = json.load(f)
        except (OSError, ValueError):
            starts = None
        if not isinstance(starts, list):
            logging.warning('%s is not a list of starts; a new one replaces it', path)
            starts = []
    with atomic_write(path) as f:
        json.dump([*starts, entry], f, indent=2)
    return entry


def summary_metric(summary: dict) -> str | None:
    """The task metric of a run's summary (its `best_<metric>`)."""
    not_metrics = ('best_step', 'best_checkpoint_step')
    names = [k[len('best_') :] for k in summary if k.startswith('best_') and k not in not_metrics]
    return names[0] if names else None


def report(summary: dict, workdir: str, total_steps: int) -> str:
    """The run's end in a few lines: steps, wall time, final and best eval figures, test
    figures, and where its files are."""
    from core.metrics import format_duration

    metric = summary_metric(summary)

    status = 'completed' if summary.get('completed') else 'stopped'
    if summary.get('early_stopped'):
        status = 'early stopped'
    lines = [
        f'{summary.get("stage", "run")} {summary.get("task", "")}: steps '
        f'{summary.get("steps")}/{total_steps} in '
        f'{format_duration(summary.get("wall_time_sec", 0.0))} ({status})'
    ]
    final = {k[len('final_') :]: v for k, v in summary.items() if k.startswith('final_')}
    if final:
        shown = ' | '.join(f'{k} {v:.4f}' for k, v in final.items() if isinstance(v, float))
        lines.append(f'  final eval: {shown}')
    best = summary.get(f'best_{metric}')
    if best is not None:
        lines.append(f'  {metric}: best {best:.4f} at step {summary.get("best_step")}')
    test = {
        k[len('test_') :]: v
        for k, v in summary.items()
        if k.startswith('test_') and k != 'test_step' and isinstance(v, float)
    }
    if test:
        shown = ' | '.join(f'{k} {v:.4f}' for k, v in test.items())
        step = summary.get('test_step')
        lines.append(f'  test (step {step}, the kept checkpoint best on validation): {shown}')
    workdir = os.path.abspath(workdir)
    for label, name in (
        ('summary', 'summary.json'),
        ('metrics', 'metrics.jsonl'),
        ('tensorboard', 'tensorboard'),
        ('checkpoints', 'checkpoints'),
        ('curves', 'curves.png'),
        ('log', LOG_FILE),
    ):
        path = os.path.join(workdir, name)
        if os.path.exists(path):
            lines.append(f'  {label + ":":13s}{path}')
    return '\n'.join(lines)
