"""How `launch.py pretrain` scales with the size of a local .txt corpus: the run's peak memory,
time to its first step, wall time and throughput, at each corpus size.

    python benchmarks/corpus_scale.py [--sizes 100M,500M,2G] [--steps 20] [--label run]
        [--repo PATH] [--python PYTHON] [--dir /tmp/pretrax_corpus_scale]
        [--max_rss_gb 20] [--timeout 1800] [--out DIR/corpus_scale.jsonl]

Corpus: DIR/corpus_<size>.txt (K/M/G are decimal: 1M = 10**6 bytes), generated once and
reused while it is there at a size in [size, 1.01 x size]: documents of 3-12 sentences, one
sentence a line, a blank line after each document, drawn (numpy, seed 0) from the sentences of
CPython's own documentation (`pydoc_data.topics`; the text depends on the Python running
this script). A corpus is a prefix of every larger one; it ends at a document boundary.

Run: REPO's `launch.py pretrain --config configs/bert_mlm.py:tiny` on that corpus for
`--steps` steps, run by `--python` in REPO (PYTHONPATH=REPO, JAX_PLATFORMS=cpu, no
compilation cache: PRETRAX_COMPILATION_CACHE=off), so that the code of another checkout
(`--repo`, e.g. before a change) is measured the same way. Its workdir
DIR/run_<size>_<label> is deleted first; its output goes to DIR/run_<size>_<label>.log.

  peak RSS            ru_maxrss of the run (os.wait4), GB = 10**9 bytes
  time to first step  seconds from the start until the log says 'first step done': start-up,
                      reading the corpus, the WordPiece vocabulary, the step-0 eval, compiling
  wall                seconds from the start until the process exits
  examples/s          training throughput: the train rows of WORKDIR/metrics.jsonl
                      (examples_per_sec, step_time_ms: the compiled first step, evals and
                      saves left out), averaged over their steps

A run whose process tree (psutil, every 0.2 s) goes above --max_rss_gb, or that is still
running after --timeout seconds, is killed and reported as killed. The table is printed at
the end; its rows are appended as JSON lines to --out, with the date, REPO's commit and the
command.
"""

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import psutil

UNITS = {'': 1, 'K': 10**3, 'M': 10**6, 'G': 10**9}
DOCS_PER_CHUNK = 50_000  # the corpus is written in chunks of this many documents (~30 MB)


def parse_size(text: str) -> int:
    """Bytes of '2M', '500K', '1.5G' or '1000' (decimal units)."""
    m = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*', text.upper())
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f'size {text!r}: expected a positive number with K, M or G, e.g. 500M')
    return int(round(float(m.group(1)) * UNITS[m.group(2)]))


def size_name(size: int) -> str:
    """The shortest name parse_size reads back as `size`: 2000000 -> '2M'."""
    for unit in 'GMK':
        if size % UNITS[unit] == 0:
            return f'{size // UNITS[unit]}{unit}'
    return str(size)


def sentence_pool() -> list[str]:
    """The sentences of CPython's documentation topics: prose, 20-400 characters each."""
    from pydoc_data.topics import topics

    pool = []
    for key in sorted(topics):
        for paragraph in re.split(r'\n\s*\n', topics[key]):
            text = ' '.join(paragraph.split())
            pool += re.split(r'(?<=[.!?])\s+(?=[A-Z])', text)
    return [s for s in pool if 20 <= len(s) <= 400 and sum(c.isalpha() for c in s) > 0.6 * len(s)]


def write_corpus(path: str, size: int) -> int:
    """Writes documents to `path` until it holds at least `size` bytes, stopping at the end of
    a document; returns its bytes. Chunks are joined in memory and written whole."""
    pool = sentence_pool()
    # Entry i: sentence i and a newline; entry i + len(pool): the same ending its document.
    table = [s.encode() + b'\n' for s in pool] + [s.encode() + b'\n\n' for s in pool]
    lengths = np.array([len(b) for b in table], np.int64)
    rng = np.random.default_rng(0)
    written = 0
    with open(path + '.partial', 'wb') as f:
        while written < size:
            counts = rng.integers(3, 13, DOCS_PER_CHUNK)
            ids = rng.integers(0, len(pool), counts.sum())
            ends = np.cumsum(counts)
            ids[ends - 1] += len(pool)
            doc_bytes = np.cumsum(np.add.reduceat(lengths[ids], ends - counts))
            last = np.searchsorted(doc_bytes, size - written)  # the document that reaches it
            keep = ends[min(last, DOCS_PER_CHUNK - 1)]
            f.write(b''.join([table[i] for i in ids[:keep].tolist()]))
            written += int(doc_bytes[min(last, DOCS_PER_CHUNK - 1)])
    os.replace(path + '.partial', path)
    return written


def corpus(directory: str, size: int) -> tuple[str, int, str]:
    """(path, bytes, how it came) of the corpus of `size` bytes, written if not there."""
    path = os.path.join(directory, f'corpus_{size_name(size)}.txt')
    if os.path.isfile(path) and size <= os.path.getsize(path) <= 1.01 * size:
        return path, os.path.getsize(path), 'reused'
    began = time.perf_counter()
    written = write_corpus(path, size)
    return path, written, f'written in {time.perf_counter() - began:.1f} s'


def tree_rss(proc: psutil.Process) -> int:
    """Resident bytes of `proc` and its children (0 for those that are gone)."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_pretrain(args, corpus_path: str, workdir: str) -> dict:
    """Runs one pretrain, watching its log and memory; the figures of the row."""
    shutil.rmtree(workdir, ignore_errors=True)
    command = [
        args.python, 'launch.py', 'pretrain', '--config', 'configs/bert_mlm.py:tiny',
        '--workdir', workdir, f'--config.data.files={corpus_path}',
        f'--config.total_steps={args.steps}',
    ]  # fmt: skip
    # Compiled afresh every run (no persistent compilation cache), so the sizes compare.
    env = dict(
        os.environ, PYTHONPATH=args.repo, JAX_PLATFORMS='cpu', PRETRAX_COMPILATION_CACHE='off'
    )
    log_path = workdir + '.log'
    row = {'command': shlex.join(command), 'log': log_path, 'first_step_s': None}
    with open(log_path, 'wb') as log, open(log_path, 'rb') as reader:
        began = time.perf_counter()
        child = subprocess.Popen(
            command, cwd=args.repo, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a kill reaches its children
        )  # fmt: skip
        proc, seen, polls, peak_sampled = psutil.Process(child.pid), b'', 0, 0
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            elapsed = time.perf_counter() - began
            if row['first_step_s'] is None:
                seen = seen[-64:] + reader.read()
                if b'first step done' in seen:
                    row['first_step_s'] = elapsed
            if pid:
                break
            polls += 1
            if polls % 2 == 0:
                rss = tree_rss(proc)
                peak_sampled = max(peak_sampled, rss)
                if rss > args.max_rss_gb * 1e9:
                    row['killed'] = f'killed: RSS > {args.max_rss_gb:g} GB after {elapsed:.0f} s'
                elif elapsed > args.timeout:
                    row['killed'] = f'killed: timeout {args.timeout:g} s'
                if 'killed' in row:
                    os.killpg(child.pid, signal.SIGKILL)
                    _, status, usage = os.wait4(child.pid, 0)
                    break
            time.sleep(0.1)
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    row['wall_s'] = time.perf_counter() - began
    row['peak_rss_gb'] = usage.ru_maxrss * 1024 / 1e9  # KiB on Linux
    row['sampled_peak_rss_gb'] = peak_sampled / 1e9
    row['exit_code'] = child.returncode
    if 'killed' not in row and child.returncode != 0:
        row['failed'] = f'failed: exit {child.returncode}, see {log_path}'
    row['examples_per_s'] = throughput(workdir)
    return row


def throughput(workdir: str) -> float | None:
    """Examples/s over the timed steps of the train rows: each row's examples_per_sec holds
    for its steps since the row before (the first row starts at the compiled step 1)."""
    path = os.path.join(workdir, 'metrics.jsonl')
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    examples = seconds = 0.0
    previous = 1
    for r in sorted((r for r in rows if r.get('split') == 'train'), key=lambda r: r['step']):
        if 'examples_per_sec' in r and 'step_time_ms' in r:
            steps, step_s = r['step'] - previous, r['step_time_ms'] / 1e3
            examples += steps * r['examples_per_sec'] * step_s
            seconds += steps * step_s
        previous = r['step']
    return examples / seconds if seconds else None


def table_cells(row: dict) -> list[str]:
    first = '-' if row['first_step_s'] is None else f'{row["first_step_s"]:.1f}'
    head = [f'{row["corpus_bytes"]:,}', row['side']]
    if 'killed' in row or 'failed' in row:
        return [*head, row.get('killed') or row['failed'], first, '-', '-']
    rate = '-' if row['examples_per_s'] is None else f'{row["examples_per_s"]:,.1f}'
    return [*head, f'{row["peak_rss_gb"]:.2f}', first, f'{row["wall_s"]:.1f}', rate]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument('--sizes', default='100M,500M,2G', help='comma-separated, K/M/G')
    parser.add_argument('--steps', type=int, default=20, help='config.total_steps of each run')
    parser.add_argument('--label', default='run', help='the side measured, e.g. before/after')
    parser.add_argument('--repo', default=here, help='the checkout whose launch.py runs')
    parser.add_argument('--python', default=sys.executable, help='the python that runs it')
    parser.add_argument('--dir', default='/tmp/pretrax_corpus_scale', help='corpora and runs')
    parser.add_argument('--max_rss_gb', type=float, default=20.0, help='kill a run above this')
    parser.add_argument('--timeout', type=float, default=1800.0, help='kill a run after this')
    parser.add_argument('--out', default='', help='JSON lines (default DIR/corpus_scale.jsonl)')
    args = parser.parse_args()
    try:
        sizes = [parse_size(s) for s in args.sizes.split(',') if s.strip()]
    except ValueError as e:
        parser.error(str(e))
    args.repo, args.dir = os.path.abspath(args.repo), os.path.abspath(args.dir)
    if not os.path.isfile(os.path.join(args.repo, 'launch.py')):
        parser.error(f'--repo {args.repo} holds no launch.py; expected a pretrax checkout')
    out = args.out or os.path.join(args.dir, 'corpus_scale.jsonl')
    os.makedirs(args.dir, exist_ok=True)
    commit = subprocess.run(
        ['git', 'rev-parse', '--short', 'HEAD'], cwd=args.repo, capture_output=True, text=True
    ).stdout.strip()
    print(f'# Corpus scale: {args.repo} at {commit or "?"}, label {args.label}\n')
    rows = []
    for size in sizes:
        path, nbytes, how = corpus(args.dir, size)
        print(f'- {path}: {nbytes:,} bytes ({how})', flush=True)
        workdir = os.path.join(args.dir, f'run_{size_name(size)}_{args.label}')
        row = run_pretrain(args, path, workdir)
        row.update(corpus_bytes=nbytes, side=args.label, repo=args.repo, commit=commit)
        row['date'] = datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')
        row['benchmark_command'] = shlex.join([sys.executable, *sys.argv])
        print(f'  {" | ".join(table_cells(row)[2:])} (log {row["log"]})', flush=True)
        with open(out, 'a') as f:
            f.write(json.dumps(row) + '\n')
        rows.append(row)
    headers = ['corpus (bytes)', 'side', 'peak RSS (GB)', 'time to first step (s)']
    headers += ['wall (s)', 'examples/s']
    print('\n| ' + ' | '.join(headers) + ' |')
    print('|' + '|'.join(['---:', '---'] + ['---:'] * 4) + '|')
    for row in rows:
        print('| ' + ' | '.join(table_cells(row)) + ' |')
    print(f'\nRows appended to {out}.')


if __name__ == '__main__':
    main()
