"""Files written whole or not at all."""

import contextlib
import os
from collections.abc import Iterator
from typing import IO


@contextlib.contextmanager
def atomic_write(path: str, mode: str = 'w', **open_args) -> Iterator[IO]:
    """A file opened on PATH.tmp that replaces `path` (os.replace) when the block ends, so a
    reader, or a crash, never meets half a file. If the block raises, `path` is left as it
    was and PATH.tmp is removed. `mode` and `open_args` go to `open`; the file gets the
    permissions of any file the process creates."""
    tmp = path + '.tmp'
    try:
        with open(tmp, mode, **open_args) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
