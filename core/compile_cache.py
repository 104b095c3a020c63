"""JAX's persistent compilation cache, on by default: a second start of the same model,
batch, mesh and jax version reads its compiled steps from disk instead of compiling them.

Where (`directory`): `PRETRAX_COMPILATION_CACHE` (a directory, or `off` to disable it),
else `JAX_COMPILATION_CACHE_DIR`, else pretrax's cache directory's `jax/`
(`~/.cache/pretrax/jax`; `PRETRAX_CACHE_DIR=off` turns every cache off: core/files.py).
JAX keys every entry on the computation, its compile options, the devices and the
jax/jaxlib versions, so versions and device kinds never mix. Every compilation is cached,
however short (a tiny model's steps compile in under JAX's default 1 s threshold); the
directory is kept under `MAX_BYTES`, the least recently used entries evicted first, under
a file lock that also keeps processes sharing the directory from writing over each other.
An entry that cannot be read (cut short by a crash, say) is recompiled: JAX goes on
(`jax_raise_persistent_cache_errors` stays off), so a run never fails on its cache; its
warning per entry is counted here instead, and said once with the fix (`damaged`).

`CacheStats` counts what the cache did for this process (JAX's own monitoring events), for
the start-up line: how many compilations were read from the cache and the time that saved.
"""

import os
import warnings

import jax
from jax import monitoring

from core.files import CACHE_ENV, turns_cache_off, user_cache_dir

ENV = 'PRETRAX_COMPILATION_CACHE'
MAX_BYTES = 4 * 2**30
_UNREADABLE = 'Error reading persistent compilation cache entry'


def _setting() -> tuple[str, str | None]:
    """(the environment variable that decides the cache directory, the directory this
    process uses or None when disabled): PRETRAX_COMPILATION_CACHE, else JAX's own
    JAX_COMPILATION_CACHE_DIR, else pretrax's cache directory (PRETRAX_CACHE_DIR)."""
    if ENV in os.environ:
        value = os.environ[ENV].strip()
        return ENV, None if turns_cache_off(value) else os.path.expanduser(value)
    if os.environ.get('JAX_COMPILATION_CACHE_DIR'):
        return 'JAX_COMPILATION_CACHE_DIR', os.environ['JAX_COMPILATION_CACHE_DIR']
    return CACHE_ENV, user_cache_dir('jax')


def directory() -> str | None:
    """The cache directory this process uses, or None when disabled."""
    return _setting()[1]


class CacheStats:
    """Compilations this process asked the cache for, found there, and the seconds saved."""

    def __init__(self):
        self.requests = self.hits = self.unreadable = 0
        self.saved_s = 0.0
        self.unusable = ''  # why directory() cannot be used (the cache is then off)
        monitoring.register_event_listener(self._event)
        monitoring.register_event_duration_secs_listener(self._duration)

    def _event(self, event: str, **kwargs) -> None:
        if event == '/jax/compilation_cache/compile_requests_use_cache':
            self.requests += 1
        elif event == '/jax/compilation_cache/cache_hits':
            self.hits += 1

    def _duration(self, event: str, duration: float, **kwargs) -> None:
        if event == '/jax/compilation_cache/compile_time_saved_sec':
            self.saved_s += duration

    def describe(self) -> str:
        where = directory()
        if self.unusable:
            return (
                f'compilation cache off: {self.unusable}; set {_setting()[0]} to a writable '
                'directory (or off)'
            )
        if where is None:
            return 'compilation cache off'
        return (
            f'{self.hits} of {self.requests} compilations read from the cache {where} '
            f'(saved {self.saved_s:.1f}s)'
        )


STATS: CacheStats | None = None


def _count_unreadable() -> None:
    """JAX warns once per entry it cannot read, with its own file and line: counted instead
    (`damaged` says it once); every other warning is shown as before."""
    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if STATS is not None and str(message).startswith(_UNREADABLE):
            STATS.unreadable += 1
            return
        show(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning


def damaged() -> str | None:
    """The warning for entries this process could not read, or None."""
    if STATS is None or not STATS.unreadable:
        return None
    n = STATS.unreadable
    one = n == 1
    return (
        f'{n} {"entry" if one else "entries"} of the compilation cache {directory()} '
        f'could not be read (damaged, e.g. by a crash while written) and '
        f'{"was" if one else "were"} compiled again; JAX does not replace '
        f'{"it" if one else "them"}: delete that directory to clear '
        f'{"it" if one else "them"} (or set {ENV}=off)'
    )


def preparing(what: str) -> str:
    """What the process is about to do to run `what` for the first time (a line before a
    silent wait): compile it, or read it from the cache when there is one."""
    if STATS is None or STATS.unusable or directory() is None:
        return f'compiling {what}'
    return f'compiling {what} or reading it from the compilation cache'


def describe() -> str:
    """What the cache did for this process so far (for the start-up line)."""
    if STATS is None:
        return 'compilation cache not in use'
    return STATS.describe()


def enable() -> None:
    """Points JAX at `directory()` (or turns its cache off); call before the first
    compilation. Starts counting `STATS`."""
    global STATS
    if STATS is None:
        STATS = CacheStats()
        _count_unreadable()
    where = directory()
    if where is not None:
        try:  # a directory this process cannot write is no cache, not a failed run
            os.makedirs(where, exist_ok=True)
            if not os.access(where, os.W_OK | os.X_OK):
                raise PermissionError('not writable')
        except OSError as e:
            STATS.unusable = f'{where} cannot be used ({e.strerror or e})'
            where = None
    if where is None:
        jax.config.update('jax_enable_compilation_cache', False)
    else:
        jax.config.update('jax_enable_compilation_cache', True)
        jax.config.update('jax_compilation_cache_dir', where)
        jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
        jax.config.update('jax_compilation_cache_max_size', MAX_BYTES)
