"""One MLM training step: pretrax (JAX/XLA, CPU) vs Hugging Face BertForMaskedLM (PyTorch, CPU).

    PYTHONPATH=. python benchmarks/mlm_step.py [--sizes tiny,small] [--steps 20] [--warmup 3]
        [--threads N]

Needs `pip install torch==2.13.0 transformers` (benchmark only; measured with jax 0.10.2,
flax 0.12.8, torch 2.13.0+cpu, transformers 5.23.0: the script prints the versions it ran).

Both sides run the same step on the same numpy-generated batch: BERT post-LN encoder, fp32,
training mode with hidden dropout 0.1 (attention-probability dropout is pretrax's default 0.0,
mirrored on the reference so both compute the same thing), AdamW (eps 1e-6, weight decay 0.01
on matrices only) after clipping to global norm 1.0. A timed step is forward, backward, clip
and optimizer update, finished (pretrax: `jax.block_until_ready` on the new state and metrics
every step; PyTorch on CPU is synchronous). The two sides' steps alternate (one of each per
round), so background load on the machine hits both alike.

The one designed difference is the MLM output layer: pretrax gathers the 20 masked positions
per sequence first and scores only those against the vocabulary; the reference, like Hugging
Face MLM training, scores every token and ignores the unmasked ones (labels -100) in the loss.
"""

import argparse
import contextlib
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from core import flops, optim, sharding, train_state
from core import step as step_lib
from models.bert import BertConfig, BertForMlm
from pretrain.losses import mlm_loss_fn

SIZES = {
    'tiny': dict(hidden_size=128, num_layers=2, num_heads=2, mlp_dim=512),
    'small': dict(hidden_size=512, num_layers=4, num_heads=8, mlp_dim=2048),
}
VOCAB, BATCH, LENGTH, PREDICTIONS, MAX_LEN, DROPOUT = 30522, 32, 128, 20, 512, 0.1
LEARNING_RATE, WEIGHT_DECAY, EPS, CLIP = 1e-4, 0.01, 1e-6, 1.0


def make_batch(seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens, two segments, no padding, `PREDICTIONS` distinct masked positions."""
    rs = np.random.RandomState(seed)
    positions = np.stack(
        [np.sort(rs.choice(LENGTH, PREDICTIONS, replace=False)) for _ in range(BATCH)]
    )
    segment_ids = np.zeros((BATCH, LENGTH), np.int32)
    segment_ids[:, LENGTH // 2 :] = 1
    return dict(
        input_ids=rs.randint(0, VOCAB, (BATCH, LENGTH)).astype(np.int32),
        input_mask=np.ones((BATCH, LENGTH), np.int32),
        segment_ids=segment_ids,
        masked_positions=positions.astype(np.int32),
        masked_ids=rs.randint(0, VOCAB, (BATCH, PREDICTIONS)).astype(np.int32),
        masked_weights=np.ones((BATCH, PREDICTIONS), np.float32),
    )


def analytic_flops(size: dict, predictions: int) -> float:
    """Matmul FLOPs of one training step with the MLM head at `predictions` positions per
    sequence (the reference's head runs at all LENGTH of them)."""
    return flops.mlm_train_flops(
        BATCH,
        LENGTH,
        predictions,
        size['hidden_size'],
        size['num_layers'],
        size['mlp_dim'],
        VOCAB,
    )


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


# --------------------------------------------------------------------------------------
# pretrax


def optimizer_config(steps: int) -> ml_collections.ConfigDict:
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


def encoder_only_loss_fn(model):
    """A stand-in loss on the backbone's output alone: the step minus the MLM head."""

    def loss_fn(params, batch, rng, train: bool):
        hidden = model.apply(
            {'params': params},
            batch,
            not train,
            rngs={'dropout': rng},
            method=lambda m, b, d: m.backbone(b['input_ids'], b['input_mask'], b['segment_ids'], d),
        )
        return jnp.sum(jnp.square(hidden)), {'denominator': jnp.float32(hidden.size)}

    return loss_fn


class Pretrax:
    """pretrax's MLM train step (`JitStepper` on a one-device mesh), ready to time."""

    def __init__(self, size: dict, batch: dict[str, np.ndarray], steps: int, encoder_only=False):
        self.model = BertForMlm(BertConfig(VOCAB, max_len=MAX_LEN, dropout_rate=DROPOUT, **size))
        tx, schedule = optim.make_optimizer(optimizer_config(steps))
        mesh = sharding.make_mesh()
        example = jax.tree.map(jnp.asarray, batch)
        init_params = lambda rng: self.model.init(rng, example)['params']
        self.state, shardings = train_state.create_sharded_state(
            init_params, tx, mesh, jax.random.key(0)
        )
        loss_fn = encoder_only_loss_fn if encoder_only else mlm_loss_fn
        self.stepper = step_lib.JitStepper(
            mesh, shardings, loss_fn(self.model), tx, schedule, accum_steps=1
        )
        self.batch = self.stepper.put_batch(batch)
        self.rng = jax.random.key(1)

    def num_params(self) -> int:
        return train_state.count_params(self.state.params)

    def cost_flops(self) -> float:
        compiled = self.stepper.lower_train(self.state, self.batch, self.rng).compile()
        cost = compiled.cost_analysis()
        if isinstance(cost, list | tuple):  # older jax returns one dict per device program
            cost = cost[0]
        return float(cost['flops'])

    def step(self):
        self.state, metrics = self.stepper.train(self.state, self.batch, self.rng)
        jax.block_until_ready((self.state, metrics))


# --------------------------------------------------------------------------------------
# reference: Hugging Face transformers on PyTorch


class Reference:
    """`BertForMaskedLM` + `torch.optim.AdamW`, SDPA attention, training mode."""

    def __init__(self, size: dict, batch: dict[str, np.ndarray]):
        import torch
        import transformers

        torch.manual_seed(0)
        config = transformers.BertConfig(
            vocab_size=VOCAB,
            hidden_size=size['hidden_size'],
            num_hidden_layers=size['num_layers'],
            num_attention_heads=size['num_heads'],
            intermediate_size=size['mlp_dim'],
            max_position_embeddings=MAX_LEN,
            hidden_act='gelu',
            hidden_dropout_prob=DROPOUT,
            attention_probs_dropout_prob=0.0,  # pretrax's attention_dropout_rate default
            attn_implementation='sdpa',
        )
        self.torch = torch
        self.model = transformers.BertForMaskedLM(config).train()
        params = list(self.model.parameters())
        groups = [
            dict(params=[p for p in params if p.ndim > 1], weight_decay=WEIGHT_DECAY),
            dict(params=[p for p in params if p.ndim <= 1], weight_decay=0.0),
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=LEARNING_RATE, eps=EPS)
        labels = np.full((BATCH, LENGTH), -100, np.int64)
        np.put_along_axis(labels, batch['masked_positions'], batch['masked_ids'], axis=1)
        self.inputs = dict(
            input_ids=torch.from_numpy(batch['input_ids'].astype(np.int64)),
            attention_mask=torch.from_numpy(batch['input_mask'].astype(np.int64)),
            token_type_ids=torch.from_numpy(batch['segment_ids'].astype(np.int64)),
            labels=torch.from_numpy(labels),
        )

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def step(self):
        loss = self.model(**self.inputs).loss
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def top_ops(self, count: int = 8) -> list[tuple[str, float, int]]:
        """(op, self CPU ms, calls) of the `count` ops with the most self time in one step."""
        from torch.profiler import ProfilerActivity, profile

        with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU]) as prof:
            self.step()
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        return [(e.key, e.self_cpu_time_total / 1e3, e.count) for e in events[:count]]


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


def print_versions(threads: int):
    import flax
    import torch
    import transformers

    print('## Environment\n')
    print(f'- jax {jax.__version__}, jaxlib {jax.lib.__version__}, flax {flax.__version__}')
    print(f'- torch {torch.__version__}, transformers {transformers.__version__}')
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None
    print(
        f'- CPU: os.cpu_count() = {os.cpu_count()}, usable by this process = {affinity}, '
        f'1-minute load average at start {os.getloadavg()[0]:.2f} (other work skews timings)'
    )
    print(
        f'- threads: torch intra-op {torch.get_num_threads()} (--threads {threads}), '
        f'inter-op {torch.get_num_interop_threads()}; JAX devices {jax.devices()} '
        '(XLA CPU uses its own pool over all cores)'
    )
    print(
        f'- shapes: vocab {VOCAB}, batch {BATCH}, seq {LENGTH}, {PREDICTIONS} predictions/seq, '
        f'max_len {MAX_LEN}, dropout {DROPOUT}, fp32, AdamW + clip {CLIP}\n'
    )


def run_size(name: str, args) -> dict:
    size = SIZES[name]
    batch = make_batch()
    print(
        f'## {name}: hidden {size["hidden_size"]}, {size["num_layers"]} layers, '
        f'{size["num_heads"]} heads, mlp {size["mlp_dim"]}\n'
    )

    total_steps = args.steps + args.warmup
    pretrax = Pretrax(size, batch, total_steps)
    reference = Reference(size, batch)
    contenders = {'pretrax': pretrax.step, 'reference': reference.step}
    if args.breakdown:
        contenders['pretrax_no_head'] = Pretrax(size, batch, total_steps, encoder_only=True).step
    xla_flops = pretrax.cost_flops()
    times = timed_rounds(contenders, args.steps, args.warmup)
    pretrax_ms, reference_ms = times['pretrax'], times['reference']
    params, ref_params = pretrax.num_params(), reference.num_params()
    top_ops = reference.top_ops()
    del pretrax, reference, contenders

    tokens, masked = BATCH * LENGTH, BATCH * PREDICTIONS
    h = size['hidden_size']
    pretrax_flops = analytic_flops(size, PREDICTIONS)
    ref_flops = analytic_flops(size, LENGTH)
    p_med, r_med = np.median(pretrax_ms), np.median(reference_ms)
    print(f'- params: pretrax {params:,}, reference {ref_params:,}')
    print(
        f'- pretrax ms/step: median {p_med:.1f}, min {pretrax_ms.min():.1f}, '
        f'max {pretrax_ms.max():.1f}; reference: median {r_med:.1f}, '
        f'min {reference_ms.min():.1f}, max {reference_ms.max():.1f}'
    )
    print(f'- pretrax step, XLA cost analysis: {xla_flops / 1e9:.1f} GFLOP')
    print(
        f'- analytic matmul GFLOP/step: pretrax {pretrax_flops / 1e9:.1f} '
        f'({pretrax_flops / p_med / 1e6:.0f} GFLOP/s), reference {ref_flops / 1e9:.1f} '
        f'({ref_flops / r_med / 1e6:.0f} GFLOP/s)'
    )
    print(
        f'- output layer GFLOP/step: reference, every token 2*3*B*L*H*V = '
        f'{6 * tokens * h * VOCAB / 1e9:.1f}; pretrax, masked only 2*3*B*P*H*V = '
        f'{6 * masked * h * VOCAB / 1e9:.1f}'
    )
    if args.breakdown:
        e_med = np.median(times['pretrax_no_head'])
        print(
            f'- pretrax breakdown: step without the MLM head (embeddings + encoder fwd/bwd '
            f'+ optimizer) {e_med:.1f} ms, so the MLM head costs ~{p_med - e_med:.1f} ms '
            f'({100 * (p_med - e_med) / p_med:.0f}%)'
        )
    print('- reference, top ops by self CPU time in one profiled step:\n')
    print('  | op | self CPU ms | calls |')
    print('  | --- | ---: | ---: |')
    for op, ms, calls in top_ops:
        print(f'  | {op} | {ms:.1f} | {calls} |')
    print()
    return dict(name=name, params=params, pretrax=p_med, reference=r_med)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--sizes', default='tiny,small', help='comma-separated: tiny, small')
    parser.add_argument('--steps', type=int, default=20, help='timed steps per side')
    parser.add_argument('--warmup', type=int, default=3, help='untimed steps first')
    parser.add_argument('--threads', type=int, default=os.cpu_count(), help='torch threads')
    parser.add_argument(
        '--no-breakdown',
        dest='breakdown',
        action='store_false',
        help='skip timing the pretrax step without the MLM head',
    )
    args = parser.parse_args()
    sizes = [s for s in args.sizes.split(',') if s]
    unknown = sorted(set(sizes) - set(SIZES))
    if unknown:
        parser.error(f'unknown sizes {unknown}; choose from {list(SIZES)}')

    import torch

    torch.set_num_threads(args.threads)
    print_versions(args.threads)
    rows = [run_size(name, args) for name in sizes]

    print(f'## Results (median of {args.steps} interleaved steps after {args.warmup} warmup)\n')
    print(
        '| size | params | pretrax ms/step | reference ms/step | speedup (ref/pretrax) '
        '| pretrax seq/s |'
    )
    print('| --- | ---: | ---: | ---: | ---: | ---: |')
    for row in rows:
        print(
            f'| {row["name"]} | {row["params"] / 1e6:.2f}M | {row["pretrax"]:.1f} '
            f'| {row["reference"]:.1f} | {row["reference"] / row["pretrax"]:.2f}x '
            f'| {1e3 * BATCH / row["pretrax"]:.0f} |'
        )


if __name__ == '__main__':
    main()
