import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# The runs the tests start compile afresh and write nothing to the user's cache directory
# (core/files.py user_cache_dir); tests/test_startup.py points the caches at its tmp.
os.environ['PRETRAX_CACHE_DIR'] = 'off'

# A small but real MLM run: BERT with H32 L1 on CPython's docs, seconds per run.
SMALL_RUN = [
    '--config.data.name=pydoc',
    '--config.model.hidden_size=32',
    '--config.model.num_layers=1',
    '--config.model.num_heads=2',
    '--config.model.mlp_dim=64',
    '--config.model.vocab_size=1024',
    '--config.data.seq_len=32',
    '--config.data.max_predictions=5',
    '--config.batch_size=16',
    '--config.eval_steps=2',
    '--config.warmup_steps=5',
    '--config.model.dropout_rate=0.1',  # dropout on: the runs' determinism covers it
]


def launch(*args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs `python launch.py ARGS` from the repository root."""
    full_env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT, **(env or {}))
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, 'launch.py'), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=full_env,
        timeout=timeout,
    )


@pytest.fixture(scope='session')
def pydoc_vocab(tmp_path_factory) -> str:
    """A 1024-token WordPiece vocabulary trained once on the pydoc corpus."""
    from data import text, tokenizer

    path = str(tmp_path_factory.mktemp('vocab') / 'vocab.txt')
    tokenizer.train_wordpiece(iter(text.embedded_corpus('pydoc')), 1024, path)
    return path


def tree_digest(root) -> dict[str, str]:
    """{relative path: sha256} of every file under `root` (symlinks as their target text):
    a byte-for-byte snapshot, to check that a refused or failed command changed nothing."""
    import hashlib

    digest = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                digest[rel] = 'link:' + os.readlink(path)
            elif os.path.isfile(path):
                with open(path, 'rb') as f:
                    digest[rel] = hashlib.sha256(f.read()).hexdigest()
            else:
                digest[rel] = 'dir'
    return digest


def check_evals_timed(workdir: str, stderr: str, steps: list[int]) -> None:
    """Every eval row of `workdir` carries its own time, and the eval lines of one start of
    the run (`stderr`: its evals at `steps`) show that only its first eval compiled
    anything: the eval functions are compiled once and reused."""
    import json

    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        evals = [r for r in map(json.loads, f) if r['split'] == 'eval']
    assert [r['step'] for r in evals if r['step'] in steps] == steps
    assert all(r['eval_time_sec'] > 0 for r in evals), evals
    lines = [x for x in stderr.splitlines() if x.startswith('eval step ')]
    assert [int(x.split()[2]) for x in lines] == steps, lines
    assert all(x.split(' | ')[-1].endswith(('s', 'compiling)')) for x in lines), lines
    assert 'compiling)' in lines[0], lines  # the first eval compiled its functions
    assert not any('compiling' in x for x in lines[1:]), lines
