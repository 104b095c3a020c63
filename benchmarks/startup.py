"""Time to the first step of a run, cold and warm, and where it goes.

    PYTHONPATH=. python benchmarks/startup.py [--config configs/bert_mlm.py:tiny]
        [--dir /tmp/pretrax_startup] [--override --config.x=y ...]

Three starts of `launch.py pretrain --config CONFIG --config.total_steps=2` in fresh
workdirs, one after the other:

  no cache  PRETRAX_CACHE_DIR=off: every step compiled, the embedded corpus parsed (as
            before the caches)
  cold      an empty cache directory (PRETRAX_CACHE_DIR=DIR/cache): compiled and
            parsed, and written to the caches
  warm      the same cache directory again: read from them

For each: the time to the first step (seconds from spawning the process until its log
says 'first step done'), the longest silence before it (the longest gap between two lines
on stderr, the process's spawn counting as a line), the phases of the run's own start-up
profile (summary.json `startup_sec`, core/startup.py) and the compilations read from the
cache. The machine should be otherwise idle.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ('start', 'data', 'setup', 'init', 'eval0', 'step1')
HEADS = ('start', 'data and model', 'optimizer and step', 'init', 'step-0 eval', 'first step')


def start(label: str, args, cache: str) -> dict:
    workdir = os.path.join(args.dir, label)
    shutil.rmtree(workdir, ignore_errors=True)
    command = [sys.executable, 'launch.py', 'pretrain', '--config', args.config]
    command += ['--workdir', workdir, '--config.total_steps=2', *args.override]
    env = dict(os.environ, PYTHONPATH=ROOT, PRETRAX_CACHE_DIR=cache)
    env.pop('PRETRAX_COMPILATION_CACHE', None)
    began = time.monotonic()
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    stamps, first = [0.0], None
    lines = []

    def read():
        nonlocal first
        for line in proc.stderr:
            now = time.monotonic() - began
            lines.append(line)
            if first is None:
                stamps.append(now)
                if 'first step done' in line:
                    first = now

    reader = threading.Thread(target=read)
    reader.start()
    code = proc.wait()
    reader.join()
    if code != 0 or first is None:
        sys.exit(f'{label}: exit {code}\n' + ''.join(lines[-20:]))
    with open(os.path.join(workdir, 'summary.json')) as f:
        profile = json.load(f)['startup_sec']
    line = next(x for x in lines if 'first step done' in x)
    hits = re.search(r'(\d+ of \d+) compilations read', line)
    return {
        'label': label,
        'first_step_s': first,
        'silence_s': max(b - a for a, b in zip(stamps, stamps[1:], strict=False)),
        'profile': profile,
        'cache': hits.group(1) if hits else 'off',
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--config', default='configs/bert_mlm.py:tiny')
    parser.add_argument('--dir', default='/tmp/pretrax_startup')
    parser.add_argument('--override', nargs='*', default=[], help='--config.x=y arguments')
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    cache = os.path.join(args.dir, 'cache')
    shutil.rmtree(cache, ignore_errors=True)
    rows = [start('no cache', args, 'off'), start('cold', args, cache), start('warm', args, cache)]
    print(f'# Start-up of {args.config} {" ".join(args.override)}'.rstrip())
    print(f'{os.cpu_count()} CPUs, {time.strftime("%Y-%m-%d")}\n')
    print('| start | first step (s) | longest silence (s) | ' + ' | '.join(HEADS) + ' | cache |')
    print('|---|' + '---:|' * (2 + len(HEADS)) + '---|')
    for r in rows:
        phases = ' | '.join(f'{r["profile"].get(p, 0.0):.1f}' for p in PHASES)
        print(
            f'| {r["label"]} | {r["first_step_s"]:.1f} | {r["silence_s"]:.1f} | {phases} | '
            f'{r["cache"]} |'
        )


if __name__ == '__main__':
    main()
