"""The trainer's steady-state step against the bare jitted step of the same model and batch.

    PYTHONPATH=. python benchmarks/overhead.py [--cases mlm-tiny,mlm-small,simclr-tiny]
        [--rounds 3] [--dir /tmp/pretrax_overhead] [--before CHECKOUT]

For each case, `--rounds` times, one after the other:

  bare     the task's train step as the trainer compiles it (`core.trainer.set_up`:
           same config, mesh, optimizer, dropout and donation), on one batch of the task's
           own stream placed on the device once, called back to back in this process;
           seconds per step = wall time of the timed steps / their count (one block at
           the end, so dispatch overlaps the steps as in any training loop)
  fed      the same step in the same loop, each step's batch drawn from the task's own
           stream (its prefetch thread) and put on the device: the input pipeline's share
           of the overhead, without the rest of the trainer. The stream is first read
           as far as the trainer's window starts (past a text corpus's first epoch, for
           mlm-tiny), so both time the same part of the run
  trainer  `launch.py pretrain` of the same config in a fresh workdir: input pipeline
           (tokenizing, packing, masking or image reading), host-to-device transfer, metric
           rows, the log line, the watchdog, asynchronous checkpoints every
           `checkpoint_every` steps; seconds per step = the wall time between two of its
           log lines (each written once the steps before it are done) / the steps between
           them, every step, save and host-side cost in between counted. The case's
           windows lie between the step-0 eval and the final one
  before   (with --before CHECKOUT) the trainer of another checkout of pretrax (an earlier
           commit: `git worktree add DIR COMMIT`), timed the same way in the same round, so
           a change is measured side by side with the code it replaces

overhead = trainer / bare - 1, in the case's last (steady-state) window; each round's line
also gives its other windows. The trainer's own step_time_ms (the mean of its train rows
in that window; checkpoint saves are left out of that clock by design) is printed beside
it. The machine should be otherwise idle: on a shared or virtual machine single runs of
the same code differ by several percent, hence the rounds.

Each round deletes and rewrites CASE, CASE_before and CASE_build under `--dir` (the runs'
workdirs): point it at a directory of its own.
"""

import argparse
import dataclasses
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import jax
import numpy as np

from core import train_state, trainer
from core.reference import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    config: str  # FILE:PRESET
    overrides: dict  # config keys set for every side
    steps: int  # timed steps of bare and fed
    windows: tuple  # ((label, first log step, last log step), ...): the last is the figure


# The presets' own data, model and optimizer; the schedule of a short run: one eval at the
# start and one at the end (outside the windows), a log line and a checkpoint every
# `log_every` / `checkpoint_every` steps inside them. mlm-tiny's corpus (the embedded one's
# training split, 385K tokens at its 4096-token vocabulary) is one epoch in 95 steps of
# 32 x 126 tokens, and the default run reads it 25 times: its first window is the first
# epoch, its steady state the later ones. MLM small at batch 32 (its preset's 256 is a 30 s step
# on this CPU).
CASES = {
    'mlm-tiny': Case(
        'mlm-tiny',
        'configs/bert_mlm.py:tiny',
        {'total_steps': 350, 'log_every': 25, 'eval_every': 350, 'checkpoint_every': 100},
        100,
        (('first epoch', 25, 75), ('later epochs', 150, 350)),
    ),
    'mlm-small': Case(
        'mlm-small',
        'configs/bert_mlm.py:small',
        {
            'batch_size': 32,
            'total_steps': 30,
            'log_every': 5,
            'eval_every': 30,
            'checkpoint_every': 10,
            'eval_steps': 2,
        },
        20,
        (('steps', 5, 30),),
    ),
    'simclr-tiny': Case(
        'simclr-tiny',
        'configs/vit_simclr.py:tiny',
        {'total_steps': 150, 'log_every': 25, 'eval_every': 150, 'checkpoint_every': 50},
        50,
        (('steps', 25, 150),),
    ),
}
STEP_LINE = re.compile(r'\bstep (\d+)/(\d+) \|')


def load_config(case: Case):
    path, _, preset = case.config.partition(':')
    config = load_file(os.path.join(ROOT, path)).get_config(preset)
    config.update_from_flattened_dict(case.overrides)
    return config


def in_process(case: Case, build_dir: str) -> dict:
    """Seconds per step of the trainer's compiled train step, back to back: on one batch
    (`bare`), then fed by the task's own stream (`fed`)."""
    config = load_config(case)
    run = trainer.set_up(config, build_dir, 'pretrain', write_config=False, build_dir=build_dir)
    stream = run.task.train_iter
    try:
        state, _ = train_state.create_sharded_state(
            run.task.init_params, run.tx, run.mesh, run.init_rng, run.shardings
        )
        state = run.stepper.put_state(state)
        batch = run.stepper.put_batch(next(stream))
        for _ in range(2):  # compile, then one untimed step
            state, metrics = run.stepper.train(state, batch, run.dropout_rng)
        jax.block_until_ready((state, metrics))
        began = time.perf_counter()
        for _ in range(case.steps):
            state, metrics = run.stepper.train(state, batch, run.dropout_rng)
        jax.block_until_ready((state, metrics))
        bare_s = (time.perf_counter() - began) / case.steps
        for _ in range(case.windows[-1][1]):  # where the trainer's figure starts
            next(stream)
        began = time.perf_counter()
        for _ in range(case.steps):
            state, metrics = run.stepper.train(
                state, run.stepper.put_batch(next(stream)), run.dropout_rng
            )
        jax.block_until_ready((state, metrics))
        fed_s = (time.perf_counter() - began) / case.steps
    finally:
        if hasattr(stream, 'close'):
            stream.close()
        run.task.close()
    return {'bare': bare_s, 'fed': fed_s}


def full(case: Case, workdir: str, checkout: str = ROOT) -> dict:
    """Seconds per step of `checkout`'s `launch.py pretrain` in each of the case's windows
    (by label), and the trainer's own step_time_ms in the last."""
    shutil.rmtree(workdir, ignore_errors=True)
    command = [sys.executable, 'launch.py', 'pretrain', '--config', case.config]
    command += ['--workdir', workdir, *(f'--config.{k}={v}' for k, v in case.overrides.items())]
    env = dict(os.environ, PYTHONPATH=checkout, PRETRAX_CACHE_DIR='off')
    proc = subprocess.Popen(
        command, cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    stamps, lines = {}, []

    def read():
        for line in proc.stderr:
            lines.append(line)
            found = STEP_LINE.search(line)
            if found:
                stamps[int(found.group(1))] = time.perf_counter()

    reader = threading.Thread(target=read)
    reader.start()
    code = proc.wait()
    reader.join()
    needed = {s for _, first, last in case.windows for s in (first, last)}
    if code != 0 or not needed <= set(stamps):
        sys.exit(f'{case.name}: exit {code}, log steps {sorted(stamps)}\n' + ''.join(lines[-20:]))
    result = {label: (stamps[b] - stamps[a]) / (b - a) for label, a, b in case.windows}
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        rows = [json.loads(x) for x in f]
    _, first, last = case.windows[-1]
    own = [
        r['step_time_ms']
        for r in rows
        if r['split'] == 'train' and first < r['step'] <= last and 'step_time_ms' in r
    ]
    result['own_ms'] = float(np.mean(own))
    return result


def print_header(where: str) -> None:
    import flax

    now = datetime.datetime.now(datetime.UTC)
    print(f'# Trainer against bare step, {now:%Y-%m-%d %H:%M} UTC\n')
    print(
        f'- jax {jax.__version__}, flax {flax.__version__}, {jax.device_count()} x '
        f'{jax.devices()[0].device_kind}; cores usable {len(os.sched_getaffinity(0))}, '
        f'1-minute load average at start {os.getloadavg()[0]:.2f}; runs under {where}\n'
    )


def percent(x: float, base: float) -> str:
    return f'{100 * (x / base - 1):+.1f}%'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--cases', default=','.join(CASES), help=f'of {", ".join(CASES)}')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--dir', default='/tmp/pretrax_overhead')
    parser.add_argument('--before', default='', help='another checkout, timed beside this one')
    args = parser.parse_args()
    if args.before and not os.path.isfile(os.path.join(args.before, 'launch.py')):
        parser.error(f'--before {args.before}: no launch.py there; give a pretrax checkout')
    names = [c for c in args.cases.split(',') if c]
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        parser.error(f'unknown cases {unknown}; known: {", ".join(CASES)}')
    print_header(args.dir)
    os.makedirs(args.dir, exist_ok=True)
    table = []
    for name in names:
        case = CASES[name]
        steady = case.windows[-1][0]
        rounds = []
        for r in range(args.rounds):
            t = in_process(case, os.path.join(args.dir, f'{name}_build'))
            t['trainer'] = full(case, os.path.join(args.dir, name))
            if args.before:
                t['before'] = full(case, os.path.join(args.dir, f'{name}_before'), args.before)
            parts = [f'bare {1e3 * t["bare"]:.1f} ms', f'fed {percent(t["fed"], t["bare"])}']
            for side in ('trainer', 'before')[: 1 + bool(args.before)]:
                by_window = ', '.join(
                    f'{label} {percent(t[side][label], t["bare"])}' for label, _, _ in case.windows
                )
                parts.append(f'{side} {1e3 * t[side][steady]:.1f} ms ({by_window})')
            print(f'{name} round {r + 1}: ' + '; '.join(parts), flush=True)
            rounds.append(t)
        table.append((case, rounds))

    print()
    heads = ['case, timed steps', 'batch', 'bare step ms', 'fed by its stream', 'trainer ms/step']
    heads += ['trainer overhead', 'its own step_time_ms']
    heads += ['before ms/step', 'before overhead'] if args.before else []
    print('| ' + ' | '.join(heads) + ' |')
    print('|---|' + '---:|' * (len(heads) - 1))
    for case, rounds in table:
        label, first, last = case.windows[-1]
        mean = {k: float(np.mean([t[k] for t in rounds])) for k in ('bare', 'fed')}
        trainer_s = float(np.mean([t['trainer'][label] for t in rounds]))
        cells = [
            f'{case.name}, steps {first}-{last}' + (f' ({label})' if len(case.windows) > 1 else ''),
            str(load_config(case).batch_size),
            f'{1e3 * mean["bare"]:.1f}',
            percent(mean['fed'], mean['bare']),
            f'{1e3 * trainer_s:.1f}',
            percent(trainer_s, mean['bare']),
            f'{np.mean([t["trainer"]["own_ms"] for t in rounds]):.1f}',
        ]
        if args.before:
            before_s = float(np.mean([t['before'][label] for t in rounds]))
            cells += [f'{1e3 * before_s:.1f}', percent(before_s, mean['bare'])]
        print('| ' + ' | '.join(cells) + ' |')
    print(f'\n(means of {args.rounds} rounds)')


if __name__ == '__main__':
    main()
