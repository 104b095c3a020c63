"""core/files.py: a file the code writes is there whole or not at all."""

import errno
import os

import pytest

from core import cli
from core.files import atomic_write


def test_atomic_write_replaces_the_file_only_when_the_block_ends(tmp_path):
    path = str(tmp_path / 'summary.json')
    with atomic_write(path) as f:
        f.write('first')
    with atomic_write(path, 'wb') as f:
        f.write(b'second')
        assert open(path).read() == 'first'  # a reader meanwhile sees the old file whole
    assert open(path).read() == 'second'
    assert os.listdir(tmp_path) == ['summary.json']
    # Permissions as any file the process creates (umask), not a temp file's 0600.
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask


def test_atomic_write_failure_leaves_the_old_file_and_no_temporary(tmp_path):
    path = str(tmp_path / 'metrics.jsonl')
    with atomic_write(path) as f:
        f.write('kept\n')
    with pytest.raises(OSError) as failed:
        with atomic_write(path) as f:
            f.write('half')
            raise OSError(errno.ENOSPC, 'No space left on device')
    assert failed.value.errno == errno.ENOSPC
    assert open(path).read() == 'kept\n'
    assert os.listdir(tmp_path) == ['metrics.jsonl']


def test_atomic_write_into_a_missing_directory_names_the_path(tmp_path):
    path = str(tmp_path / 'gone' / 'config.json')
    with pytest.raises(FileNotFoundError) as failed:
        with atomic_write(path) as f:
            f.write('{}')
    assert path in cli.error_message(failed.value)


def test_two_writers_of_one_path_at_once_never_mix(tmp_path):
    """Two processes writing one file at once (the corpus cache of two runs starting
    together): each writes a temporary file of its own, the last to finish wins whole."""
    path = str(tmp_path / 'corpus.json')
    with atomic_write(path) as first:
        first.write('a' * 1000)
        with atomic_write(path) as second:
            second.write('b' * 10)
        assert open(path).read() == 'b' * 10
        first.write('a')
    assert open(path).read() == 'a' * 1001
    assert os.listdir(tmp_path) == ['corpus.json']
