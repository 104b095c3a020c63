"""What the train-step benchmarks share: the interleaved timing loop, the optimizer both
sides run, MFU and peak-memory accounting, and the environment header.

Importing it turns off JAX's up-front reservation of 75% of GPU memory (read when the
backend starts, at the first device use), so that PyTorch can run beside it.
"""

import argparse
import contextlib
import dataclasses
import datetime
import os
import re
import sys
import time

os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from core import flops, optim, train_state  # noqa: E402
from core import step as step_lib  # noqa: E402
from models.encoder import ATTENTION_IMPLS  # noqa: E402

# The optimizer of both sides: AdamW (BERT's eps, weight decay on matrices only) after
# clipping to global norm 1.0, at a constant learning rate.
LEARNING_RATE, WEIGHT_DECAY, EPS, CLIP = 1e-4, 0.01, 1e-6, 1.0


def on_gpu() -> bool:
    return jax.default_backend() == 'gpu'


def timed_rounds(steps_by_name: dict, steps: int, warmup: int) -> dict[str, np.ndarray]:
    """Milliseconds of each timed step of every contender, their steps interleaved (one step
    of each per round) so that any background load on the machine hits all of them alike.
    Each step function must return only once its update is complete."""
    for _ in range(warmup):
        for step in steps_by_name.values():
            step()
    times = {name: [] for name in steps_by_name}
    for _ in range(steps):
        for name, step in steps_by_name.items():
            start = time.perf_counter()
            step()
            times[name].append(1e3 * (time.perf_counter() - start))
    return {name: np.array(ms) for name, ms in times.items()}


def step_arguments(
    doc: str, sizes: list[str], default_sizes: str, unit: str, batches: tuple[int, int], rounds
) -> argparse.ArgumentParser:
    """The options every train-step benchmark takes; `batches` the default (CPU, GPU) batch,
    `rounds` the default (timed, warm-up) rounds."""
    parser = argparse.ArgumentParser(description=doc.split('\n')[0])
    parser.add_argument('--sizes', default=default_sizes, help=f'comma-separated: {sizes}')
    parser.add_argument(
        '--batch', type=int, default=0, help=f'{unit} (0: {batches[0]} CPU, {batches[1]} GPU)'
    )
    parser.add_argument('--steps', type=int, default=rounds[0], help='timed steps per side')
    parser.add_argument('--warmup', type=int, default=rounds[1], help='untimed steps first')
    parser.add_argument('--precision', default='', help='float32 | bfloat16 (default: f32 CPU)')
    parser.add_argument('--remat', default='none', choices=['none', 'dots', 'full'])
    parser.add_argument('--scan_layers', action='store_true', help="pretrax's layers in nn.scan")
    add_attention_argument(parser)
    parser.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: all)')
    parser.add_argument('--peak_tflops', type=float, default=0.0, help='per device, for MFU')
    parser.add_argument(
        '--no-profile', dest='profile', action='store_false', help='skip the torch profile'
    )
    parser.set_defaults(known_sizes=sizes, batches=batches)
    return parser


def add_attention_argument(parser: argparse.ArgumentParser):
    """--attention_impl: pretrax's model.attention_impl (auto: cuDNN flash attention on a GPU
    in bf16)."""
    parser.add_argument(
        '--attention_impl',
        default='auto',
        choices=ATTENTION_IMPLS,
        help="pretrax's attention (model.attention_impl; auto: cuDNN flash on a GPU in bf16)",
    )


def parse_step_arguments(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parsed and completed: `sizes` a list, `batch`, `precision` and `threads` resolved for
    this device."""
    args = parser.parse_args()
    args.sizes = [s for s in args.sizes.split(',') if s]
    unknown = sorted(set(args.sizes) - set(args.known_sizes))
    if unknown:
        parser.error(f'unknown sizes {unknown}; choose from {args.known_sizes}')
    args.batch = args.batch or args.batches[on_gpu()]
    args.precision = args.precision or ('bfloat16' if on_gpu() else 'float32')
    if args.precision not in ('float32', 'bfloat16'):
        parser.error(f'--precision {args.precision}; expected float32 or bfloat16')
    args.threads = args.threads or os.cpu_count()
    return args


@dataclasses.dataclass
class Measured:
    """What one size's run gives: ms of every timed step of each contender, and the rest."""

    ms: dict[str, np.ndarray]
    xla_flops: float  # pretrax's step, XLA cost analysis
    pretrax_bytes: int
    fused_attention_calls: int  # cuDNN fused-attention custom calls in pretrax's step
    reference_bytes: int | None
    top_ops: list[tuple[str, float, int]]
    params: int
    reference_params: int

    def median(self, name: str) -> float:
        return float(np.median(self.ms[name]))


def measure(pretrax, reference, args, runtime: 'TorchRuntime', **others) -> Measured:
    """Times `pretrax`, `reference` and `others` (name -> step) interleaved, then profiles
    the reference; prints the parameter counts and the step times."""
    contenders = {'pretrax': pretrax.step, 'reference': reference.step, **others}
    xla_flops, pretrax_bytes, fused_attention = pretrax.xla_cost()
    runtime.reset_peak_memory()
    ms = timed_rounds(contenders, args.steps, args.warmup)
    m = Measured(
        ms,
        xla_flops,
        pretrax_bytes,
        fused_attention,
        runtime.peak_memory(),
        profile_top_ops(reference.step) if args.profile else [],
        pretrax.num_params(),
        reference.num_params(),
    )
    p_ms, r_ms = ms['pretrax'], ms['reference']
    print(f'- params: pretrax {m.params:,}, reference {m.reference_params:,}')
    print(
        f'- pretrax attention: {args.attention_impl}; cuDNN fused-attention calls in the '
        f'compiled step: {m.fused_attention_calls}'
    )
    print(
        f'- ms/step: pretrax median {m.median("pretrax"):.1f} (min {p_ms.min():.1f}, max '
        f'{p_ms.max():.1f}); reference median {m.median("reference"):.1f} (min '
        f'{r_ms.min():.1f}, max {r_ms.max():.1f})'
    )
    return m


class PretraxStep:
    """pretrax's train step as a run takes it: `JitStepper` over `mesh`, state donated, the
    shared optimizer recipe, `batch` placed on the devices once."""

    def __init__(self, init_params, loss_fn, batch: dict, args, mesh):
        tx, schedule = optim.make_optimizer(optimizer_config(args.steps + args.warmup))
        self.state, shardings = train_state.create_sharded_state(
            init_params, tx, mesh, jax.random.key(0)
        )
        self.stepper = step_lib.JitStepper(mesh, shardings, loss_fn, tx, schedule, accum_steps=1)
        self.batch = self.stepper.put_batch(batch)
        self.rng = jax.random.key(1)

    def num_params(self) -> int:
        return train_state.count_params(self.state.params)

    def xla_cost(self) -> tuple[float, int, int]:
        compiled = self.stepper.lower_train(self.state, self.batch, self.rng).compile()
        return (*xla_cost(compiled), fused_attention_calls(compiled.as_text()))

    def step(self):
        self.state, metrics = self.stepper.train(self.state, self.batch, self.rng)
        jax.block_until_ready((self.state, metrics))


def optimizer_config(steps: int) -> ml_collections.ConfigDict:
    """pretrax's optimizer settings (`core/optim.py`) for the shared recipe."""
    return ml_collections.ConfigDict(
        dict(
            learning_rate=LEARNING_RATE,
            warmup_steps=0,
            total_steps=steps,
            optimizer=dict(
                name='adamw',
                b1=0.9,
                b2=0.999,
                eps=EPS,
                weight_decay=WEIGHT_DECAY,
                grad_clip_norm=CLIP,
                schedule='constant',
                end_learning_rate=LEARNING_RATE,
            ),
        )
    )


def xla_cost(compiled) -> tuple[float, int]:
    """(FLOPs, peak bytes) of one compiled step from XLA's own analyses. The bytes are the
    step's live set: arguments + outputs + temporaries, less outputs written in place of
    donated arguments."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older jax: one dict per device program
        cost = cost[0]
    m = compiled.memory_analysis()
    peak = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
    return float(cost['flops']), int(peak)


def fused_attention_calls(hlo: str) -> int:
    """How many cuDNN fused-attention kernels (forward and backward) a compiled program's
    HLO calls: custom calls whose target names cuDNN's fMHA (`__cudnn$fmha...`). Zero on
    CPU, and on a GPU where the XLA attention path ran instead."""
    return len(re.findall(r'custom_call_target="[^"]*fmha', hlo, re.IGNORECASE))


def measured_matmul_flops(dtype: str, size: int | None = None, repeats: int = 5) -> float:
    """FLOP/s of one large square matmul in JAX on the default device: what this device
    actually sustains on the work MFU counts (best of `repeats`)."""
    size = size or (8192 if on_gpu() else 2048)
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def mfu_peak(peak_tflops: float, precision: str) -> tuple[float, str]:
    """(peak FLOP/s of one device, where that figure comes from) for MFU: --peak_tflops,
    else the vendor's dense peak of a known accelerator for `precision` (core/flops.py),
    else (CPU) a measured matmul."""
    if peak_tflops:
        return peak_tflops * 1e12, f'--peak_tflops {peak_tflops}'
    vendor = flops.peak_flops_per_device(precision=precision)
    if vendor is not None:
        kind = jax.devices()[0].device_kind
        return vendor, f'vendor dense {precision} peak of {kind} (core/flops.py)'
    measured = measured_matmul_flops(precision)
    return measured, f'measured {precision} 2048^3 matmul in JAX on this CPU (no vendor peak)'


# --------------------------------------------------------------------------------------
# PyTorch side


class TorchRuntime:
    """Device, autocast and synchronisation for a PyTorch reference."""

    def __init__(self, precision: str, threads: int):
        import torch

        self.torch = torch
        self.device = 'cuda' if torch.cuda.is_available() else 'cpu'
        if self.device == 'cpu':
            torch.set_num_threads(threads)
        self.precision = precision

    def autocast(self):
        if self.precision == 'float32':
            return contextlib.nullcontext()
        return self.torch.autocast(self.device, dtype=self.torch.bfloat16)

    def adamw(self, model):
        """AdamW with decay on matrices only; the fused CUDA kernel where there is one."""
        params = list(model.parameters())
        groups = [
            dict(params=[p for p in params if p.ndim > 1], weight_decay=WEIGHT_DECAY),
            dict(params=[p for p in params if p.ndim <= 1], weight_decay=0.0),
        ]
        fused = self.device == 'cuda'
        return self.torch.optim.AdamW(groups, lr=LEARNING_RATE, eps=EPS, fused=fused)

    def sync(self):
        if self.device == 'cuda':
            self.torch.cuda.synchronize()

    def reset_peak_memory(self):
        if self.device == 'cuda':
            self.torch.cuda.reset_peak_memory_stats()

    def peak_memory(self) -> int | None:
        """Peak bytes the CUDA caching allocator handed out; None on CPU (not tracked)."""
        if self.device == 'cuda':
            return int(self.torch.cuda.max_memory_allocated())
        return None


def profile_top_ops(step, count: int = 8) -> list[tuple[str, float, int]]:
    """(op, self ms, calls) of the `count` ops with the most self time in one step of a
    PyTorch reference (device time on CUDA, CPU time otherwise)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    cuda = torch.cuda.is_available()
    if cuda:
        activities.append(ProfilerActivity.CUDA)
    with _stderr_silenced(), profile(activities=activities) as prof:
        step()
    key = 'self_device_time_total' if cuda else 'self_cpu_time_total'
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    return [(e.key, getattr(e, key) / 1e3, e.count) for e in events[:count]]


@contextlib.contextmanager
def _stderr_silenced():
    """Hides what native code writes to stderr (the profiler's start/stop log lines)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, 'w') as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


# --------------------------------------------------------------------------------------
# Output


def print_environment(threads: int, shapes: str):
    import flax
    import torch
    import transformers

    print('## Environment\n')
    print(f'- date {datetime.date.today().isoformat()}')
    print(f'- jax {jax.__version__}, jaxlib {jax.lib.__version__}, flax {flax.__version__}')
    print(f'- torch {torch.__version__}, transformers {transformers.__version__}')
    devices = ', '.join(sorted({d.device_kind for d in jax.devices()}))
    print(f'- JAX backend {jax.default_backend()}: {len(jax.devices())} x {devices}')
    if torch.cuda.is_available():
        print(f'- torch device cuda: {torch.cuda.get_device_name()}')
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None
    print(
        f'- CPU: os.cpu_count() = {os.cpu_count()}, usable by this process = {affinity}, '
        f'1-minute load average at start {os.getloadavg()[0]:.2f} (other work skews timings)'
    )
    if not torch.cuda.is_available():
        print(
            f'- threads: torch intra-op {torch.get_num_threads()} (--threads {threads}); '
            'XLA CPU uses its own pool over all cores'
        )
    print(f'- {shapes}\n')


def print_top_ops(top_ops: list[tuple[str, float, int]]):
    if top_ops:
        print('- reference, top ops by self time in one profiled step:\n')
        print_table(
            ['op', 'self ms', 'calls'], [[op, f'{ms:.1f}', str(n)] for op, ms, n in top_ops]
        )


def print_results(args, rows: list[dict], first: str, rates: dict):
    """The summary table: one row per size (`rows` of name, Measured m, pretrax_flops,
    reference_flops, peak); `rates` maps a column header to examples per step (its value
    is that many per second of pretrax's median step)."""
    print(f'## Results (median of {args.steps} interleaved steps after {args.warmup} warmup)\n')
    headers = [first, 'params', 'pretrax ms/step', 'reference ms/step', 'speedup', *rates]
    headers += ['pretrax MFU', 'reference MFU', 'pretrax peak mem', 'reference peak mem']
    table = []
    for r in rows:
        m, p_med, r_med = r['m'], r['m'].median('pretrax'), r['m'].median('reference')
        table.append(
            [
                r['name'],
                f'{m.params / 1e6:.2f}M',
                f'{p_med:.1f}',
                f'{r_med:.1f}',
                f'{r_med / p_med:.2f}x',
                *(f'{1e3 * n / p_med:,.1f}' for n in rates.values()),
                f'{100 * r["pretrax_flops"] / (p_med / 1e3) / r["peak"]:.1f}%',
                f'{100 * r["reference_flops"] / (r_med / 1e3) / r["peak"]:.1f}%',
                mib(m.pretrax_bytes),
                mib(m.reference_bytes),
            ]
        )
    print_table(headers, table)


def mib(nbytes: int | None) -> str:
    return 'n/a' if nbytes is None else f'{nbytes / 2**20:,.0f} MiB'


def print_table(headers: list[str], rows: list[list[str]]):
    print('| ' + ' | '.join(headers) + ' |')
    print('|' + '|'.join(['---'] + ['---:'] * (len(headers) - 1)) + '|')
    for row in rows:
        print('| ' + ' | '.join(row) + ' |')
    print()
