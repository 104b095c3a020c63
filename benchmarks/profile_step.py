"""Where a pretrax train step's time goes on this device: the measurements behind
BENCHMARKS.md's "Where the time goes", each section one table.

    PYTHONPATH=. python benchmarks/profile_step.py [--model vit-s] [--batch 8] [--steps 3]
        [--warmup 1] [--sections profile,matmul,flags,alternate]
        [--xla_flags=FLAGS ...] [--idle 1.0] [--precision float32|bfloat16]

The step is the one benchmarks/mlm_step.py and simclr_step.py time (`--model` mlm-tiny,
mlm-small, mlm-base, mlm-large: BERT MLM at seq 128; vit-ti, vit-s, vit-b: SimCLR on two
given 224x224 views of `--batch` images), jitted as a run jits it (`JitStepper`, donated
state, AdamW + clip).

  profile    An XLA profile of `--steps` steps after `--warmup` (`jax.profiler.trace`).
             Every executed HLO op's own time (nested ops' time subtracted) is summed by
             op kind (its name less the number; a fusion that holds a dot is its own kind,
             "+dot"). The matmul GFLOP of each kind are counted from the compiled HLO's dot
             instructions (2 x output elements x contracted size), hence GFLOP/s per kind.
             Ops on several threads overlap, so shares are of the summed op time.
  matmul     The step's largest matmul shapes alone (the MLP's first layer): forward
             x @ W, the weight gradient x^T @ dy (contracting the token axis: a transposed
             operand) and the input gradient dy @ W^T, each one jitted dot in JAX and one
             torch.matmul (when torch is installed), best of 5 after one; GFLOP/s.
  flags      The step's median time, `--steps` after `--warmup`, in a fresh process per
             XLA_FLAGS value: none, then each `--xla_flags` (repeatable).
  alternate  The step alone; alternating one for one with the PyTorch reference's step
             (benchmarks/mlm_step.py, simclr_step.py: needs torch and transformers); the
             same with `--idle` seconds of sleep after every reference step; alone again.
             Median ms of `--steps` each, after `--warmup`.

Timings on a shared machine move with its load: the header prints the load average, and
BENCHMARKS.md says when a figure was measured under load.
"""

import argparse
import collections
import datetime
import glob
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, mlm_step, simclr_step
from configs.common import VIT_SIZES

MODELS = [f'mlm-{s}' for s in mlm_step.SIZES] + [f'vit-{s}' for s in ('ti', 's', 'b')]
SECTIONS = ('profile', 'matmul', 'flags', 'alternate')
DEFAULT_FLAGS = ['--xla_cpu_experimental_ynn_fusion_type=', '--xla_cpu_use_xnnpack=false']


# --------------------------------------------------------------------------------------
# The step


def shapes(args) -> tuple[int, int, int]:
    """(tokens through the encoder, hidden, mlp) of one step."""
    family, size = args.model.split('-')
    if family == 'mlm':
        s = mlm_step.SIZES[size]
        return args.batch * mlm_step.LENGTH, s['hidden_size'], s['mlp_dim']
    hidden, _, _, mlp = VIT_SIZES[size]
    tokens = (simclr_step.IMAGE // simclr_step.PATCH) ** 2 + 1
    return 2 * args.batch * tokens, hidden, mlp


def build(args):
    """(pretrax step, a function that builds the PyTorch reference of the same step)."""
    family, size = args.model.split('-')
    if family == 'mlm':
        batch = mlm_step.make_batch(args.batch)
        step = mlm_step.pretrax_step(mlm_step.SIZES[size], batch, args)
        return step, lambda runtime: mlm_step.Reference(mlm_step.SIZES[size], batch, runtime)
    batch = simclr_step.make_batch(args.batch)
    step = simclr_step.pretrax_step(size, batch, args)
    return step, lambda runtime: simclr_step.Reference(size, batch, runtime)


def median_ms(fn, steps: int, warmup: int) -> float:
    return float(np.median(common.timed_rounds({'x': fn}, steps, warmup)['x']))


# --------------------------------------------------------------------------------------
# profile


def dot_flops_by_op(hlo: str) -> tuple[dict[str, float], set[str]]:
    """(matmul FLOPs of each op that runs on its own, not inside a fusion, and holds dots: a
    dot, or a fusion over them; the names of all ops that run on their own), from the
    compiled module's text."""
    shape_of, dots, calls = {}, {}, {}
    computation = None
    by_computation = collections.defaultdict(list)
    for line in hlo.splitlines():
        header = re.match(r'^(?:ENTRY )?%(\S+) \((.*)\) -> .*\{$', line)
        if header:
            computation = header.group(1)
            for name, dims in re.findall(r'([\w.\-]+): \w+\[([\d,]*)\]', header.group(2)):
                shape_of[name] = [int(d) for d in dims.split(',') if d]
            continue
        m = re.match(r'^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]\S* (\w[\w\-]*)\((.*)', line)
        if not m:
            continue
        name, _, dims, op, rest = m.groups()
        shape_of[name] = [int(d) for d in dims.split(',') if d]
        by_computation[computation].append(name)
        if op == 'dot':
            lhs = re.match(r'%([\w.\-]+)', rest).group(1)
            contracting = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', rest).group(1)
            size = np.prod([shape_of[lhs][int(d)] for d in contracting.split(',') if d])
            dots[name] = 2.0 * np.prod(shape_of[name]) * size
        elif op == 'fusion':
            calls[name] = re.search(r'calls=%([\w.\-]+)', rest).group(1)

    def computation_flops(c: str) -> float:
        return sum(dots.get(n, 0.0) + (computation_flops(calls[n]) if n in calls else 0.0)
                   for n in by_computation[c])  # fmt: skip

    fused = set(calls.values())  # ops inside a fusion run as part of it: no event of their own
    top = {n for c, ns in by_computation.items() if c not in fused for n in ns}
    flops = {
        n: dots.get(n, 0.0) + (computation_flops(calls[n]) if n in calls else 0.0) for n in top
    }
    return {n: f for n, f in flops.items() if f}, top


def op_self_times(trace_events: list[dict], ops: set[str]) -> dict[str, list[float]]:
    """Each HLO op's own microseconds per execution (time of ops nested in it removed),
    from a profile's complete events, per thread."""
    by_thread = collections.defaultdict(list)
    for e in trace_events:
        if e.get('ph') == 'X' and e.get('name') in ops:
            by_thread[(e.get('pid'), e.get('tid'))].append(e)
    times = collections.defaultdict(list)
    for events in by_thread.values():
        events.sort(key=lambda e: (e['ts'], -e['dur']))
        stack = []  # [end, event, own time]
        for e in events:
            while stack and stack[-1][0] <= e['ts']:
                _, done, own = stack.pop()
                times[done['name']].append(own)
            if stack:
                stack[-1][2] -= e['dur']
            stack.append([e['ts'] + e['dur'], e, e['dur']])
        for _, done, own in stack:
            times[done['name']].append(own)
    return times


def profile(step, args) -> None:
    compiled = step.stepper.lower_train(step.state, step.batch, step.rng).compile()
    flops, names = dot_flops_by_op(compiled.as_text())
    xla_flops, _ = common.xla_cost(compiled)
    for _ in range(args.warmup):
        step.step()
    with tempfile.TemporaryDirectory() as logdir:
        began = time.perf_counter()
        with jax.profiler.trace(logdir):
            for _ in range(args.steps):
                step.step()
        wall = (time.perf_counter() - began) / args.steps
        (path,) = glob.glob(os.path.join(logdir, '**', '*.trace.json.gz'), recursive=True)
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace['traceEvents'] if isinstance(trace, dict) else trace
    times = op_self_times(events, names)
    asynchronous = asynchronous_ops(events, names)
    kinds = collections.defaultdict(lambda: [0.0, 0.0, False])  # kind -> [us, flops, async]
    for name, us in times.items():
        kind = re.sub(r'\.\d+$', '', name) + (' +dot' if name in flops else '')
        kinds[kind][0] += sum(us)
        kinds[kind][1] += flops.get(name, 0.0) * len(us)
        kinds[kind][2] |= name in asynchronous
    total = sum(k[0] for k in kinds.values())
    counted = sum(k[1] for k in kinds.values()) / args.steps
    covered = covered_us(events, names) / args.steps
    print(f'## profile: {args.model}, batch {args.batch}, {args.steps} steps after {args.warmup}\n')
    print(
        f'- step {1e3 * wall:.1f} ms wall while profiled, {covered / 1e3:.1f} ms of it inside some '
        f'op event (the rest: asynchronous ops after their launch, the runtime); summed op '
        f'time {total / 1e3 / args.steps:.1f} ms/step over all threads'
    )
    print(
        f'- dot GFLOP/step counted in the HLO {counted / 1e9:.1f} (XLA cost analysis of the '
        f'whole step {xla_flops / 1e9:.1f}); GFLOP/s = dot GFLOP / event time, "async" where '
        'the event is only the launch\n'
    )
    rows = sorted(kinds.items(), key=lambda kv: -kv[1][0])
    shown = [r for i, r in enumerate(rows) if i < args.top or r[1][1]]  # and every dot kind
    rest = [r for r in rows if r not in shown]
    if rest:
        shown.append(('(other kinds)', [sum(r[1][0] for r in rest), 0.0, False]))
    table = []
    for kind, (us, f, is_async) in shown:
        rate = 'async' if is_async else f'{f / (us / 1e6) / 1e9:.0f}'
        table.append(
            [
                kind + (' (async)' if is_async else ''),
                f'{us / 1e3 / args.steps:.1f}',
                f'{100 * us / total:.1f}%',
                f'{f / 1e9 / args.steps:.1f}' if f else '-',
                rate if f else '-',
            ]
        )
    common.print_table(
        ['op kind', 'event ms/step', 'share of op time', 'dot GFLOP/step', 'GFLOP/s'], table
    )


def asynchronous_ops(trace_events: list[dict], ops: set[str]) -> set[str]:
    """The ops whose event is only their launch: XLA:CPU records each op's event and then an
    "end: NAME" event as it completes; for an op run asynchronously (a plain dot, on Eigen's
    threads) the completion comes well after the event closed."""
    launches, ends = collections.defaultdict(list), collections.defaultdict(list)
    for e in trace_events:
        name = e.get('name', '')
        if e.get('ph') != 'X':
            continue
        if name in ops:
            launches[name].append(e)
        elif name.startswith('end: ') and name[len('end: ') :] in ops:
            ends[name[len('end: ') :]].append(e)
    found = set()
    for name, starts in launches.items():
        starts.sort(key=lambda e: e['ts'])
        done = sorted(e['ts'] for e in ends.get(name, []))
        gaps = [d - (e['ts'] + e['dur']) for e, d in zip(starts, done)]
        if gaps and np.median(gaps) > max(100.0, np.median([e['dur'] for e in starts])):
            found.add(name)
    return found


def covered_us(trace_events: list[dict], ops: set[str]) -> float:
    """Microseconds during which at least one op's event is open, on any thread."""
    spans = sorted(
        (e['ts'], e['ts'] + e['dur'])
        for e in trace_events
        if e.get('ph') == 'X' and e.get('name') in ops
    )
    covered, end = 0.0, float('-inf')
    for start, stop in spans:
        if stop > end:
            covered += stop - max(start, end)
            end = stop
    return covered


# --------------------------------------------------------------------------------------
# matmul


def matmul(args) -> None:
    tokens, hidden, mlp = shapes(args)
    dtype = jnp.bfloat16 if args.precision == 'bfloat16' else jnp.float32
    rs = np.random.RandomState(0)
    x, w, dy = (
        rs.randn(*s).astype(np.float32) for s in ((tokens, hidden), (hidden, mlp), (tokens, mlp))
    )
    cases = [  # name, jax fn, torch fn, operands
        (f'forward x @ W: [{tokens},{hidden}] x [{hidden},{mlp}]', lambda a, b: a @ b,
         lambda a, b: a @ b, (x, w)),
        (f'weight grad x^T @ dy: [{hidden},{tokens}] x [{tokens},{mlp}]',
         lambda a, b: jax.lax.dot_general(a, b, (((0,), (0,)), ((), ()))),
         lambda a, b: a.T @ b, (x, dy)),
        (f'input grad dy @ W^T: [{tokens},{mlp}] x [{mlp},{hidden}]',
         lambda a, b: jax.lax.dot_general(a, b, (((1,), (1,)), ((), ()))),
         lambda a, b: a @ b.T, (dy, w)),
    ]  # fmt: skip
    try:
        import torch

        torch.set_num_threads(os.cpu_count())
    except ImportError:
        torch = None
    table = []
    for name, jax_fn, torch_fn, (a, b) in cases:
        flops = 2.0 * tokens * hidden * mlp
        fn, ja, jb = jax.jit(jax_fn), jnp.asarray(a, dtype), jnp.asarray(b, dtype)
        jax_s = best_seconds(lambda fn=fn, ja=ja, jb=jb: fn(ja, jb).block_until_ready())
        row = [name, f'{flops / jax_s / 1e9:.0f}']
        if torch is not None:
            ta, tb = (torch.from_numpy(v).to(getattr(torch, args.precision)) for v in (a, b))
            torch_s = best_seconds(lambda f=torch_fn, ta=ta, tb=tb: f(ta, tb))
            row.append(f'{flops / torch_s / 1e9:.0f}')
        else:
            row.append('n/a (no torch)')
        table.append(row)
    print(f'## matmul alone ({args.precision}), shapes of {args.model} at batch {args.batch}\n')
    common.print_table(['matmul', 'JAX GFLOP/s', 'torch GFLOP/s'], table)


def best_seconds(fn, repeats: int = 5) -> float:
    fn()
    best = float('inf')
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - began)
    return best


# --------------------------------------------------------------------------------------
# flags


def flags(args) -> None:
    table = []
    for value in ['', *args.xla_flags]:
        command = [sys.executable, __file__, '--step-time-only', '--model', args.model,
                   '--batch', str(args.batch), '--steps', str(args.steps),
                   '--warmup', str(args.warmup), '--precision', args.precision]  # fmt: skip
        env = dict(os.environ, XLA_FLAGS=value)
        r = subprocess.run(command, capture_output=True, text=True, env=env)
        found = re.search(r'^STEP_MS (\S+)$', r.stdout, re.MULTILINE)
        ms = f'{float(found.group(1)):.1f}' if found else f'failed: {r.stderr.strip()[-200:]}'
        table.append([f'`{value}`' if value else '(none)', ms])
    print(
        f'## XLA flags: {args.model}, batch {args.batch}, median of {args.steps} after '
        f'{args.warmup}, a fresh process each\n'
    )
    common.print_table(['XLA_FLAGS', 'ms/step'], table)


# --------------------------------------------------------------------------------------
# alternate


def alternate(step, make_reference, args) -> None:
    runtime = common.TorchRuntime(args.precision, os.cpu_count())
    reference = make_reference(runtime)

    def reference_then_idle():
        reference.step()
        time.sleep(args.idle)

    alone = median_ms(step.step, args.steps, args.warmup)
    both = common.timed_rounds(
        {'pretrax': step.step, 'reference': reference.step}, args.steps, args.warmup
    )
    idle = common.timed_rounds(
        {'pretrax': step.step, 'reference': reference_then_idle}, args.steps, args.warmup
    )
    again = median_ms(step.step, args.steps, args.warmup)
    print(
        f'## alone vs alternating with PyTorch: {args.model}, batch {args.batch}, median of '
        f'{args.steps} after {args.warmup}\n'
    )
    common.print_table(
        ['pretrax step', 'ms/step'],
        [
            ['alone', f'{alone:.1f}'],
            ['alternating with the reference', f'{np.median(both["pretrax"]):.1f}'],
            [f'alternating, {args.idle:g} s idle after each reference step',
             f'{np.median(idle["pretrax"]):.1f}'],
            ['alone again', f'{again:.1f}'],
        ],
    )  # fmt: skip


# --------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', default='vit-s', choices=MODELS)
    parser.add_argument('--batch', type=int, default=8, help='sequences (mlm) or images (vit)')
    parser.add_argument('--steps', type=int, default=3, help='timed (or profiled) steps')
    parser.add_argument('--warmup', type=int, default=1, help='untimed steps first')
    parser.add_argument('--precision', default='float32', choices=['float32', 'bfloat16'])
    common.add_attention_argument(parser)
    parser.add_argument(
        '--sections', default=','.join(SECTIONS), help=f'comma-separated: {SECTIONS}'
    )
    parser.add_argument(
        '--xla_flags',
        action='append',
        default=None,
        help=f'an XLA_FLAGS value for the flags section (repeatable; default {DEFAULT_FLAGS})',
    )
    parser.add_argument('--idle', type=float, default=1.0, help='seconds after each reference step')
    parser.add_argument(
        '--top', type=int, default=10, help='op kinds shown in the profile (and all with dots)'
    )
    parser.add_argument('--step-time-only', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.remat, args.scan_layers = 'none', False  # what the step benchmarks' builders read
    args.xla_flags = DEFAULT_FLAGS if args.xla_flags is None else args.xla_flags
    sections = [s for s in args.sections.split(',') if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f'unknown sections {unknown}; choose from {list(SECTIONS)}')

    step, make_reference = build(args)
    if args.step_time_only:  # a child of the flags section
        print(f'STEP_MS {median_ms(step.step, args.steps, args.warmup)}')
        return
    devices = ', '.join(sorted({d.device_kind for d in jax.devices()}))
    print('## Environment\n')
    print(f'- date {datetime.date.today().isoformat()}; jax {jax.__version__}; '
          f'{jax.default_backend()}: {len(jax.devices())} x {devices}')  # fmt: skip
    print(
        f'- os.cpu_count() {os.cpu_count()}; 1-minute load average at start '
        f'{os.getloadavg()[0]:.2f} (other work on the machine skews timings)'
    )
    print(f'- XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}\n')
    if 'profile' in sections:
        profile(step, args)
    if 'matmul' in sections:
        matmul(args)
    if 'flags' in sections:
        flags(args)
    if 'alternate' in sections:
        alternate(step, make_reference, args)
    print(f'1-minute load average at the end {os.getloadavg()[0]:.2f}')


if __name__ == '__main__':
    main()
