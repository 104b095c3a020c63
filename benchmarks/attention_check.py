"""cuDNN flash attention against XLA attention in pretrax's own attention layer, on a GPU.

    PYTHONPATH=. python benchmarks/attention_check.py [--batch 32] [--length 128] [--steps 20]

`models/encoder.py` SelfAttention at BERT-base's shape (hidden 768, 12 heads of 64), bf16
compute with f32 params, run twice with the same params and inputs: `attention_impl='cudnn'`
(what `auto` picks on a GPU in bf16) and `'xla'`. Half of the sequences are padded (the
padding reaches cuDNN as key lengths). Prints the largest differences of the outputs at
real tokens and of the parameter gradients, the cuDNN custom calls found in each compiled
program, and the forward+backward time of each (median of --steps after 3 warm-ups).
Needs an NVIDIA GPU: elsewhere it says so and exits 1.
"""

import argparse
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from models.encoder import SelfAttention

HIDDEN, HEADS = 768, 12


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--length', type=int, default=128)
    parser.add_argument('--steps', type=int, default=20)
    args = parser.parse_args()
    if jax.default_backend() != 'gpu':
        print(f'needs an NVIDIA GPU; this backend is {jax.default_backend()!r}')
        sys.exit(1)
    print(f'- jax {jax.__version__}, {jax.devices()[0].device_kind}')

    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.normal(size=(args.batch, args.length, HIDDEN)), jnp.float32)
    lengths = np.full(args.batch, args.length)
    lengths[::2] = rs.randint(args.length // 4, args.length, args.batch // 2 + args.batch % 2)
    real = np.arange(args.length)[None, :] < lengths[:, None]  # [batch, length]
    mask = jnp.asarray(real)[:, None, None, :]

    layers = {
        impl: SelfAttention(HEADS, dtype=jnp.bfloat16, attention_impl=impl)
        for impl in ('cudnn', 'xla')
    }
    params = nn.meta.unbox(layers['xla'].init(jax.random.key(0), x, mask, True)['params'])
    weight = jnp.asarray(real, jnp.float32)[:, :, None]

    def loss(p, impl):
        out = layers[impl].apply({'params': p}, x, mask, True).astype(jnp.float32)
        return jnp.sum(jnp.square(out) * weight), out

    results, times = {}, {}
    for impl in layers:
        step = jax.jit(jax.value_and_grad(lambda p, impl=impl: loss(p, impl), has_aux=True))
        hlo = step.lower(params).compile().as_text()
        targets = sorted(set(re.findall(r'custom_call_target="(__cudnn[^"]*)"', hlo)))
        print(f'- {impl}: cuDNN custom calls in the compiled fwd+bwd: {targets or "none"}')
        for _ in range(3):
            jax.block_until_ready(step(params))
        ms = []
        for _ in range(args.steps):
            start = time.perf_counter()
            results[impl] = jax.block_until_ready(step(params))
            ms.append(1e3 * (time.perf_counter() - start))
        times[impl] = float(np.median(ms))

    (_, out_c), grads_c = results['cudnn']
    (_, out_x), grads_x = results['xla']
    out_diff = float(jnp.max(jnp.abs(out_c - out_x) * weight))
    out_scale = float(jnp.max(jnp.abs(out_x) * weight))
    print(f'- output at real tokens: max |cudnn - xla| {out_diff:.4g} (max |xla| {out_scale:.4g})')
    pairs = jax.tree.map(lambda c, x: (c, x), grads_c, grads_x)
    for path, (gc, gx) in jax.tree_util.tree_leaves_with_path(pairs, is_leaf=_is_pair):
        diff, scale = float(jnp.max(jnp.abs(gc - gx))), float(jnp.max(jnp.abs(gx)))
        name = '/'.join(str(getattr(k, 'key', k)) for k in path)
        print(f'- grad {name}: max |cudnn - xla| {diff:.4g} (max |xla| {scale:.4g})')
    print(
        f'- fwd+bwd ms (batch {args.batch}, length {args.length}, bf16): cudnn '
        f'{times["cudnn"]:.3f}, xla {times["xla"]:.3f}'
    )


def _is_pair(node) -> bool:
    return isinstance(node, tuple) and len(node) == 2 and isinstance(node[0], jax.Array)


if __name__ == '__main__':
    main()
