"""Compile time of the encoder's layer stack unrolled (default) vs `model.scan_layers=true`.

    PYTHONPATH=. python benchmarks/compile_time.py [--models bert-base,vit-b16] [--steps 3]
        [--remat none]

Each model's gradient function is compiled twice, layers unrolled and under nn.scan, and
the wall time of `jax.jit(fn).lower(params, batch).compile()` is reported (tracing,
lowering and XLA compilation; nothing cached between the two). Then each compiled
function runs `--steps` timed times after one untimed call (`jax.block_until_ready`), to
show what the scan costs, or not, at run time. The two variants are given the same
parameters (stacked for the scan), so they compute the same numbers.

  bert-base  BERT-base MLM train-step gradient: H768 L12 A12, MLP 3072, vocab 30522,
             batch 8, seq 128, 20 masked positions per sequence, dropout 0.1 (training)
  bert-large the same at H1024 L24 A16, MLP 4096
  vit-b16    ViT-B/16 at 224x224: forward + backward of a linear read-out of the cls
             token, batch 2, no dropout

The device is whatever JAX picks (`JAX_PLATFORMS=cpu` for the CPU); the script prints it.
"""

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from models.bert import BertConfig, BertForMlm
from models.encoder import stack_layers
from models.vit import VisionEncoder, VitConfig, pool
from pretrain.losses import mlm_loss_fn

BERT_BATCH, LENGTH, PREDICTIONS = 8, 128, 20
VIT_BATCH = 2


def bert_case(size: str, remat: str):
    hidden, layers, heads, mlp = {
        'bert-base': (768, 12, 12, 3072),
        'bert-large': (1024, 24, 16, 4096),
    }[size]
    cfg = BertConfig(
        hidden_size=hidden, num_layers=layers, num_heads=heads, mlp_dim=mlp, remat=remat
    )
    rs = np.random.RandomState(0)
    batch = dict(
        input_ids=rs.randint(0, cfg.vocab_size, (BERT_BATCH, LENGTH)).astype(np.int32),
        input_mask=np.ones((BERT_BATCH, LENGTH), np.int32),
        segment_ids=np.zeros((BERT_BATCH, LENGTH), np.int32),
        masked_positions=np.stack(
            [np.sort(rs.choice(LENGTH, PREDICTIONS, replace=False)) for _ in range(BERT_BATCH)]
        ).astype(np.int32),
        masked_ids=rs.randint(0, cfg.vocab_size, (BERT_BATCH, PREDICTIONS)).astype(np.int32),
        masked_weights=np.ones((BERT_BATCH, PREDICTIONS), np.float32),
    )

    def make(scan: bool):
        model = BertForMlm(dataclasses.replace(cfg, scan_layers=scan))
        loss_fn = mlm_loss_fn(model)

        def grad_fn(params, batch):
            loss = lambda p: loss_fn(p, batch, jax.random.key(1), True)[0]
            return jax.value_and_grad(loss)(params)

        return grad_fn

    init = lambda r: BertForMlm(cfg).init(r, batch)['params']
    return layers, init, batch, make


def vit_case(remat: str):
    cfg = VitConfig(remat=remat)  # ViT-B/16 at 224
    images = np.random.RandomState(0).rand(VIT_BATCH, 224, 224, 3).astype(np.float32)
    readout = jnp.asarray(np.random.RandomState(1).randn(cfg.hidden_size), jnp.float32)

    def make(scan: bool):
        model = VisionEncoder(dataclasses.replace(cfg, scan_layers=scan))

        def grad_fn(params, images):
            loss = lambda p: jnp.mean(pool(model.apply({'params': p}, images), 'cls') @ readout)
            return jax.value_and_grad(loss)(params)

        return grad_fn

    init = lambda r: VisionEncoder(cfg).init(r, images)['params']
    return cfg.num_layers, init, images, make


def measure(grad_fn, params, batch, steps: int) -> tuple[float, float]:
    """(compile seconds, median seconds per call) of one variant."""
    start = time.perf_counter()
    compiled = jax.jit(grad_fn).lower(params, batch).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(params, batch))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, batch))
        times.append(time.perf_counter() - start)
    return compile_s, float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument(
        '--models',
        default='bert-base,vit-b16',
        help='comma-separated: bert-base, bert-large, vit-b16',
    )
    parser.add_argument('--steps', type=int, default=3, help='timed calls per variant')
    parser.add_argument('--remat', default='none', help='model.remat of both variants')
    args = parser.parse_args()

    print(f'jax {jax.__version__}, device {jax.devices()[0].device_kind} x {jax.device_count()}')
    print(f'remat {args.remat}, median of {args.steps} timed calls\n')
    print(
        '| model | layers | unscanned compile s | scanned compile s | unscanned step s '
        '| scanned step s |'
    )
    print('| --- | ---: | ---: | ---: | ---: | ---: |')
    for name in args.models.split(','):
        if name.startswith('bert'):
            layers, init, batch, make = bert_case(name, args.remat)
        elif name == 'vit-b16':
            layers, init, batch, make = vit_case(args.remat)
        else:
            raise SystemExit(f'--models: unknown {name!r}; expected bert-base, bert-large, vit-b16')
        params = nn.meta.unbox(jax.jit(init)(jax.random.key(0)))
        plain = measure(make(False), params, batch, args.steps)
        scanned = measure(make(True), stack_layers(params, jnp.stack), batch, args.steps)
        print(
            f'| {name} | {layers} | {plain[0]:.1f} | {scanned[0]:.1f} | {plain[1]:.2f} '
            f'| {scanned[1]:.2f} |',
            flush=True,
        )


if __name__ == '__main__':
    main()
