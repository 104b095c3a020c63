"""Files written whole or not at all; where pretrax keeps its caches."""

import contextlib
import os
import secrets
from collections.abc import Iterator
from typing import IO


@contextlib.contextmanager
def atomic_write(path: str, mode: str = 'w', **open_args) -> Iterator[IO]:
    """A file opened on a temporary name beside `path` (PATH.<pid>-<random>.tmp, one of its
    own per writer) that replaces `path` (os.replace) when the block ends, so a reader, or a
    crash, never meets half a file, and several processes writing `path` at once never mix
    their bytes (the last to finish wins, whole). If the block raises, `path` is left as it
    was and the temporary file is removed. `mode` and `open_args` go to `open`; the file gets
    the permissions of any file the process creates."""
    tmp = f'{path}.{os.getpid()}-{secrets.token_hex(4)}.tmp'
    try:
        with open(tmp, mode, **open_args) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


CACHE_ENV = 'PRETRAX_CACHE_DIR'


def turns_cache_off(value: str) -> bool:
    """Whether a cache variable's value (PRETRAX_CACHE_DIR, PRETRAX_COMPILATION_CACHE) says
    no cache rather than a directory."""
    return value.strip().lower() in ('off', '0', 'false', 'no', 'none', '')


def user_cache_dir(kind: str) -> str | None:
    """The directory of pretrax's `kind` cache (`jax` compilations, `corpus` embedded
    corpora): under `PRETRAX_CACHE_DIR` (`off`: no cache at all), else
    `$XDG_CACHE_HOME/pretrax`, else `~/.cache/pretrax`. None when caching is off."""
    base = os.environ.get(CACHE_ENV)
    if base is not None:
        if turns_cache_off(base):
            return None
        return os.path.join(os.path.expanduser(base), kind)
    home = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(home, 'pretrax', kind)
