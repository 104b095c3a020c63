"""One MLM training step: pretrax (JAX/XLA) vs Hugging Face BertForMaskedLM (PyTorch).

    PYTHONPATH=. python benchmarks/mlm_step.py [--sizes tiny,small] [--batch 32] [--steps 20]
        [--warmup 3] [--precision float32|bfloat16] [--remat none|dots|full] [--scan_layers]
        [--threads N] [--peak_tflops T] [--no-breakdown] [--no-profile]

Needs `pip install -r benchmarks/requirements.txt` (torch 2.13.0, transformers 5.23.0:
benchmark only; the script prints the versions it ran). On a GPU host both sides run on the
GPU: pretrax through jax[cuda], the reference through torch's CUDA build.

Both sides run the same step on the same numpy-generated batch: BERT post-LN encoder,
training mode with hidden dropout 0.1 (attention-probability dropout is pretrax's default
0.0, mirrored on the reference so both compute the same thing), AdamW (eps 1e-6, weight
decay 0.01 on matrices only) after clipping to global norm 1.0. Precision is float32 by
default on CPU and bfloat16 on GPU: pretrax computes in bf16 with f32 params, optimizer
state, softmax, LayerNorm statistics and loss; the reference runs under
`torch.autocast(bfloat16)` with SDPA attention (flash / memory-efficient kernels on CUDA)
and the fused CUDA AdamW. A timed step is forward, backward, clip and optimizer update,
finished (pretrax: `jax.block_until_ready` on the new state and metrics; the reference:
`torch.cuda.synchronize` on GPU, synchronous on CPU). The two sides' steps alternate (one
of each per round), so background load hits both alike.

The one designed difference is the MLM output layer: pretrax gathers the 20 masked positions
per sequence first and scores only those against the vocabulary; the reference, like Hugging
Face MLM training, scores every token and ignores the unmasked ones (labels -100) in the loss.
Each side's MFU counts its own matmul FLOPs (`core/flops.py`), so the reference's MFU
includes its full-vocabulary output layer; throughput (seq/s) is the like-for-like figure.

Peak memory: pretrax's is XLA's buffer assignment of the compiled step (arguments +
outputs + temporaries, less donated buffers reused); the reference's is the CUDA caching
allocator's peak over its timed steps (PyTorch does not track it on CPU: n/a).
"""

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from configs.common import BERT_SIZES
from core import flops, sharding
from models.bert import BertConfig, BertForMlm
from pretrain.losses import mlm_loss_fn

# configs/common.py's BERT sizes as model.* keys.
SIZES = {
    name: dict(zip(('hidden_size', 'num_layers', 'num_heads', 'mlp_dim'), row))
    for name, row in BERT_SIZES.items()
}
VOCAB, LENGTH, PREDICTIONS, MAX_LEN, DROPOUT = 30522, 128, 20, 512, 0.1


def make_batch(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens, two segments, no padding, `PREDICTIONS` distinct masked positions."""
    rs = np.random.RandomState(seed)
    positions = np.stack(
        [np.sort(rs.choice(LENGTH, PREDICTIONS, replace=False)) for _ in range(batch)]
    )
    segment_ids = np.zeros((batch, LENGTH), np.int32)
    segment_ids[:, LENGTH // 2 :] = 1
    return dict(
        input_ids=rs.randint(0, VOCAB, (batch, LENGTH)).astype(np.int32),
        input_mask=np.ones((batch, LENGTH), np.int32),
        segment_ids=segment_ids,
        masked_positions=positions.astype(np.int32),
        masked_ids=rs.randint(0, VOCAB, (batch, PREDICTIONS)).astype(np.int32),
        masked_weights=np.ones((batch, PREDICTIONS), np.float32),
    )


def analytic_flops(size: dict, batch: int, predictions: int) -> float:
    """Matmul FLOPs of one training step with the MLM head at `predictions` positions per
    sequence (the reference's head runs at all LENGTH of them)."""
    return flops.mlm_train_flops(
        batch,
        LENGTH,
        predictions,
        size['hidden_size'],
        size['num_layers'],
        size['mlp_dim'],
        VOCAB,
    )


# --------------------------------------------------------------------------------------
# pretrax


def encoder_only_loss_fn(model):
    """A stand-in loss on the backbone's output alone: the step minus the MLM head."""

    def loss_fn(params, batch, rng, train: bool, rows=None):
        hidden = model.apply(
            {'params': params},
            batch,
            not train,
            rows,
            rngs={'dropout': rng},
            method=lambda m, b, d, r: m.backbone(
                b['input_ids'], b['input_mask'], b['segment_ids'], d, r
            ),
        )
        hidden = hidden.astype(jnp.float32)
        return jnp.sum(jnp.square(hidden)), {'denominator': jnp.float32(hidden.size)}

    return loss_fn


def pretrax_step(size: dict, batch: dict, args, encoder_only=False) -> common.PretraxStep:
    """pretrax's MLM train step (or, `encoder_only`, the same without the MLM head)."""
    config = BertConfig(
        VOCAB,
        max_len=MAX_LEN,
        dropout_rate=DROPOUT,
        remat=args.remat,
        scan_layers=args.scan_layers,
        dtype=args.precision,
        attention_impl=args.attention_impl,
        **size,
    )
    model = BertForMlm(config)
    example = jax.tree.map(jnp.asarray, batch)
    loss_fn = (encoder_only_loss_fn if encoder_only else mlm_loss_fn)(model)
    init_params = lambda rng: model.init(rng, example)['params']
    return common.PretraxStep(init_params, loss_fn, batch, args, sharding.make_mesh())


# --------------------------------------------------------------------------------------
# reference: Hugging Face transformers on PyTorch


class Reference:
    """`BertForMaskedLM` + `torch.optim.AdamW`, SDPA attention, training mode."""

    def __init__(self, size: dict, batch: dict[str, np.ndarray], runtime: common.TorchRuntime):
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
        self.runtime = runtime
        self.model = transformers.BertForMaskedLM(config).to(runtime.device).train()
        self.optimizer = runtime.adamw(self.model)
        labels = np.full(batch['input_ids'].shape, -100, np.int64)
        np.put_along_axis(labels, batch['masked_positions'], batch['masked_ids'], axis=1)
        tensor = lambda x: torch.from_numpy(x.astype(np.int64)).to(runtime.device)
        self.inputs = dict(
            input_ids=tensor(batch['input_ids']),
            attention_mask=tensor(batch['input_mask']),
            token_type_ids=tensor(batch['segment_ids']),
            labels=tensor(labels),
        )

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def step(self):
        with self.runtime.autocast():
            loss = self.model(**self.inputs).loss
        loss.backward()
        self.runtime.torch.nn.utils.clip_grad_norm_(self.model.parameters(), common.CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.runtime.sync()


# --------------------------------------------------------------------------------------


def run_size(name: str, args, runtime: common.TorchRuntime, peak: float) -> dict:
    size = SIZES[name]
    batch = make_batch(args.batch)
    print(
        f'## {name}: hidden {size["hidden_size"]}, {size["num_layers"]} layers, '
        f'{size["num_heads"]} heads, mlp {size["mlp_dim"]}, batch {args.batch}\n'
    )
    others = {}
    if args.breakdown:
        others['pretrax_no_head'] = pretrax_step(size, batch, args, encoder_only=True).step
    m = common.measure(
        pretrax_step(size, batch, args), Reference(size, batch, runtime), args, runtime, **others
    )

    p_med, r_med = m.median('pretrax'), m.median('reference')
    p_flops = analytic_flops(size, args.batch, PREDICTIONS)
    r_flops = analytic_flops(size, args.batch, LENGTH)
    h, tokens, masked = size['hidden_size'], args.batch * LENGTH, args.batch * PREDICTIONS
    print(
        f'- pretrax step, XLA cost analysis: {m.xla_flops / 1e9:.1f} GFLOP; analytic matmul '
        f'GFLOP/step: pretrax {p_flops / 1e9:.1f} ({p_flops / p_med / 1e9:.2f} TFLOP/s), '
        f'reference {r_flops / 1e9:.1f} ({r_flops / r_med / 1e9:.2f} TFLOP/s)'
    )
    print(
        f'- output layer GFLOP/step: reference, every token 2*3*B*L*H*V = '
        f'{6 * tokens * h * VOCAB / 1e9:.1f}; pretrax, masked only 2*3*B*P*H*V = '
        f'{6 * masked * h * VOCAB / 1e9:.1f}'
    )
    if args.breakdown:
        e_med = m.median('pretrax_no_head')
        print(
            f'- pretrax breakdown: step without the MLM head (embeddings + encoder fwd/bwd '
            f'+ optimizer) {e_med:.1f} ms, so the MLM head costs ~{p_med - e_med:.1f} ms '
            f'({100 * (p_med - e_med) / p_med:.0f}%)'
        )
    common.print_top_ops(m.top_ops)
    print()
    return dict(name=name, m=m, pretrax_flops=p_flops, reference_flops=r_flops, peak=peak)


def main():
    parser = common.step_arguments(
        __doc__, list(SIZES), 'tiny,small', 'sequences', (32, 256), (20, 3)
    )
    parser.add_argument(
        '--no-breakdown',
        dest='breakdown',
        action='store_false',
        help='skip timing the pretrax step without the MLM head',
    )
    args = common.parse_step_arguments(parser)
    runtime = common.TorchRuntime(args.precision, args.threads)
    peak, peak_source = common.mfu_peak(args.peak_tflops, args.precision)
    common.print_environment(
        args.threads,
        f'shapes: vocab {VOCAB}, batch {args.batch}, seq {LENGTH}, {PREDICTIONS} '
        f'predictions/seq, max_len {MAX_LEN}, dropout {DROPOUT}, {args.precision}, '
        f'remat {args.remat}, scan_layers {args.scan_layers}, AdamW + clip {common.CLIP}',
    )
    print(f'MFU peak: {peak / 1e12:.3f} TFLOP/s per device ({peak_source})\n')
    rows = [run_size(name, args, runtime, peak) for name in args.sizes]
    rates = {'pretrax seq/s': args.batch, 'pretrax tokens/s': args.batch * LENGTH}
    common.print_results(args, rows, 'size', rates)


if __name__ == '__main__':
    main()
