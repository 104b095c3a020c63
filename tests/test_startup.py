"""A run's start: the start-up profile (core/startup.py) says where the seconds before the
first step went, on the terminal and in summary.json; the persistent compilation cache
(core/compile_cache.py) is on by default under the user's cache directory, a second start
of the same config reads its compiled steps from it (and computes the same numbers),
`PRETRAX_COMPILATION_CACHE=off` turns it off, and a damaged entry is recompiled, never a
failed run; the embedded corpus is kept there too, and read back the same."""

import json
import os
import re

import pytest

from tests.conftest import SMALL_RUN, launch

pytestmark = pytest.mark.slow


def run(tmp_path, name: str, vocab: str, stderr: bool = False, **env):
    workdir = tmp_path / name
    r = launch(
        'pretrain',
        '--config',
        'configs/bert_mlm.py:tiny',
        '--workdir',
        str(workdir),
        *SMALL_RUN,
        f'--config.data.vocab_file={vocab}',
        '--config.total_steps=2',
        '--config.eval_every=2',
        env={'HOME': str(tmp_path / 'home'), 'XDG_CACHE_HOME': '', **env},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'Traceback' not in r.stderr, r.stderr[-3000:]
    line = next(x for x in r.stderr.splitlines() if 'first step done' in x)
    with open(workdir / 'summary.json') as f:
        summary = json.load(f)
    check_profile(line, summary['startup_sec'])
    final = {k: v for k, v in summary.items() if k.startswith('final_')}
    return (line, final, r.stderr) if stderr else (line, final)


def check_profile(line: str, profile: dict) -> None:
    """Every phase of a fresh start, summing to the total the line shows."""
    phases = ['start', 'data', 'setup', 'init', 'eval0', 'step1']
    assert sorted(profile) == sorted([*phases, 'total']), profile
    assert all(profile[p] >= 0 for p in phases)
    assert abs(sum(profile[p] for p in phases) - profile['total']) < 0.01
    assert profile['step1'] > 0 and profile['data'] > 0 and profile['start'] > 0.5  # imports
    m = re.search(r'first step done after ([\d.]+)s \(start ', line)
    assert m and abs(float(m.group(1)) - profile['total']) <= 0.051, line
    assert 'data and model' in line and 'step-0 eval' in line, line


def cache_counts(line: str) -> tuple[int, int]:
    m = re.search(r'(\d+) of (\d+) compilations read from the cache', line)
    assert m, line
    return int(m.group(1)), int(m.group(2))


def test_the_second_start_reads_the_first_ones_compilations(tmp_path, pydoc_vocab, monkeypatch):
    monkeypatch.delenv('PRETRAX_CACHE_DIR')  # conftest's 'off': the default here
    first, final = run(tmp_path, 'first', pydoc_vocab)
    second, final_again = run(tmp_path, 'second', pydoc_vocab)
    cache = tmp_path / 'home' / '.cache' / 'pretrax' / 'jax'
    assert str(cache) in first and os.listdir(cache)
    hits, requests = cache_counts(first)
    assert hits == 0 and requests > 0
    hits, requests = cache_counts(second)
    assert hits == requests > 0, second
    assert final_again == final  # the cached steps compute the same numbers


def test_off_compiles_afresh_and_writes_no_cache(tmp_path, pydoc_vocab, monkeypatch):
    monkeypatch.delenv('PRETRAX_CACHE_DIR')  # the default would cache: off says not to
    line, _ = run(tmp_path, 'off', pydoc_vocab, PRETRAX_COMPILATION_CACHE='off')
    assert 'compilation cache off' in line
    assert not (tmp_path / 'home' / '.cache' / 'pretrax' / 'jax').exists()


@pytest.mark.parametrize('variable', ['PRETRAX_CACHE_DIR', 'PRETRAX_COMPILATION_CACHE'])
def test_a_cache_directory_that_cannot_be_made_is_no_cache_not_a_failed_run(
    tmp_path, pydoc_vocab, variable
):
    (tmp_path / 'a_file').write_text('')
    unusable = tmp_path / 'a_file' / 'cache'
    line, _ = run(tmp_path, 'run', pydoc_vocab, **{variable: str(unusable)})
    where = f'{unusable}/jax' if variable == 'PRETRAX_CACHE_DIR' else str(unusable)
    assert f'compilation cache off: {where} cannot be used' in line, line
    assert f'set {variable} to a writable directory' in line, line  # the one that chose it


def test_a_damaged_entry_is_recompiled_not_a_failed_run(tmp_path, pydoc_vocab):
    cache = tmp_path / 'cache'
    _, final = run(tmp_path, 'first', pydoc_vocab, PRETRAX_COMPILATION_CACHE=str(cache))
    entries = [p for p in cache.iterdir() if p.is_file() and p.stat().st_size > 100]
    assert entries
    for p in entries:  # cut short, as by a crash while writing
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    line, final_again, stderr = run(
        tmp_path, 'again', pydoc_vocab, PRETRAX_COMPILATION_CACHE=str(cache), stderr=True
    )
    hits, requests = cache_counts(line)
    assert hits < requests
    assert final_again == final
    # One line with the fix, not JAX's warning per entry.
    assert 'UserWarning' not in stderr, stderr[-3000:]
    said = [x for x in stderr.splitlines() if 'could not be read' in x]
    assert len(said) == 1, said
    damaged = int(re.search(r'warning: (\d+) entr(y|ies) ', said[0]).group(1))
    assert 0 < damaged <= len(entries)  # those read before the first step
    assert (' was compiled again' if damaged == 1 else ' were compiled again') in said[0]
    assert said[0].startswith('warning:') and 'delete that directory' in said[0]


def test_the_embedded_corpus_is_kept_in_the_cache_and_read_back_the_same(tmp_path, monkeypatch):
    from data import text

    monkeypatch.setenv('PRETRAX_CACHE_DIR', str(tmp_path))
    built = text.embedded_corpus('pydoc_stdlib')
    [kept] = (tmp_path / 'corpus').iterdir()
    parse = text.stdlib_docstrings

    def not_again(drop=None):
        raise AssertionError('the standard library was parsed again')

    monkeypatch.setattr(text, 'stdlib_docstrings', not_again)
    assert text.embedded_corpus('pydoc_stdlib') == built  # read back, not parsed
    kept.write_text('["cut sh')  # damaged: built again, the same documents
    monkeypatch.setattr(text, 'stdlib_docstrings', parse)
    assert text.embedded_corpus('pydoc_stdlib') == built
    stdlib = json.loads(kept.read_text())  # written again, whole
    assert stdlib and built[-len(stdlib) :] == stdlib
    monkeypatch.setenv('PRETRAX_CACHE_DIR', 'off')
    kept.unlink()
    assert text.embedded_corpus('pydoc_stdlib') == built
    assert not list((tmp_path / 'corpus').iterdir())  # off: nothing written


def test_a_slow_phase_says_it_is_still_running_at_growing_intervals(caplog):
    """core/startup.heartbeat: a line at `first` seconds, then at 3x, 7x, ... it (no
    silent compile or restore, no flood from a long one); nothing from a quick block."""
    import logging
    import time

    from core import startup

    with caplog.at_level(logging.INFO):
        with startup.heartbeat('quick', first=0.5):
            pass
        began = time.perf_counter()
        with startup.heartbeat('slow', first=0.2):
            time.sleep(1.0)
        took = time.perf_counter() - began
    said = [r.getMessage() for r in caplog.records if 'still at it' in r.getMessage()]
    assert not any(m.startswith('quick') for m in said) and took < 1.3  # ends with the block
    assert len(said) == 2 and all(m.startswith('slow: still at it after ') for m in said), said
    # (at 0.2 and 0.6 s; the next would come at 1.4 s)
