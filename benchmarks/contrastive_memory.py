"""Per-device memory of the contrastive losses as the device count grows, at a fixed
per-device batch: compiled memory analysis (XLA's buffer assignment, temp bytes) of loss +
gradient on 1, 2, 4 and 8 fake CPU devices.

  python benchmarks/contrastive_memory.py [--per_device 1024] [--dim 512]

Compared side by side:
  sigmoid (ring)        pretrain.contrastive.sigmoid_loss: [n, n] blocks round a ring
  sigmoid (all-gather)  the same loss written the direct way: gather every caption, [n, N]
  softmax (all-gather)  pretrain.contrastive.clip_softmax (CLIP needs the whole row)
"""

import argparse
import os

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from core import sharding as sharding_lib  # noqa: E402
from pretrain import contrastive  # noqa: E402


def gathered_sigmoid(img, txt, scale, bias, axis_name):
    """The sigmoid loss with every caption gathered: the reference the ring improves on."""
    n = img.shape[0]
    everything = jax.lax.all_gather(txt, axis_name, tiled=True)  # [N, dim]
    logits = scale * img @ everything.T + bias  # [n, N]
    own = jax.lax.axis_index(axis_name) * n + jnp.arange(n)
    labels = jnp.where(jnp.arange(everything.shape[0])[None] == own[:, None], 1.0, -1.0)
    return {'loss': -jnp.sum(jax.nn.log_sigmoid(labels * logits)), 'count': jnp.asarray(n * 1.0)}


def softmax(img, txt, scale, bias, axis_name):
    del bias
    return contrastive.clip_softmax(img, txt, scale, axis_name)


LOSSES = {
    'sigmoid (ring)': contrastive.sigmoid_loss,
    'sigmoid (all-gather)': gathered_sigmoid,
    'softmax (all-gather)': softmax,
}


def temp_bytes(local_loss, devices: int, per_device: int, dim: int) -> int:
    mesh = sharding_lib.make_mesh(devices, 1, 1, devices=jax.devices()[:devices])
    sharded = contrastive.on_mesh(local_loss, mesh, 2)

    def total(a, b, s, t):
        return sharded(a, b, s, t)['loss']

    emb = jax.ShapeDtypeStruct(
        (per_device * devices, dim), jnp.float32, sharding=sharding_lib.batch_sharding(mesh)
    )
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    with sharding_lib.mesh_context(mesh):
        compiled = (
            jax.jit(jax.grad(total, argnums=(0, 1, 2, 3))).lower(emb, emb, scalar, scalar).compile()
        )
    return compiled.memory_analysis().temp_size_in_bytes


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--per_device', type=int, default=1024)
    parser.add_argument('--dim', type=int, default=512)
    args = parser.parse_args()
    counts = (1, 2, 4, 8)
    print(f'per-device batch {args.per_device}, embedding dim {args.dim}; temp MiB per device')
    print('| loss | ' + ' | '.join(f'{d} dev (N={d * args.per_device})' for d in counts) + ' |')
    print('|---|' + '---:|' * len(counts))
    for name, loss in LOSSES.items():
        sizes = [temp_bytes(loss, d, args.per_device, args.dim) / 2**20 for d in counts]
        print(f'| {name} | ' + ' | '.join(f'{s:.1f}' for s in sizes) + ' |')


if __name__ == '__main__':
    main()
