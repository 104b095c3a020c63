"""Run in a subprocess with 8 fake CPU devices (XLA_FLAGS must be set before JAX starts).

`python tests/contrastive_run.py equivalence`: the contrastive losses and their gradients
on one device (the whole global batch) and sharded over meshes of 8 devices (shard_map)
and under pmap; prints the largest differences as JSON.

`python tests/contrastive_run.py memory`: compiled per-device temp memory of loss + grad
at a fixed per-device batch on 1, 2, 4 and 8 devices, for the sigmoid loss (ring) and the
CLIP softmax loss (all-gather); prints JSON.
"""

import json
import os
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from core import sharding as sharding_lib  # noqa: E402
from pretrain import contrastive  # noqa: E402

TEMPERATURE = 0.2


def local_losses():
    """name -> local loss taking (a, b, scale, bias, axis_name)."""
    return {
        'nt_xent': lambda a, b, s, t, axis_name=None: contrastive.nt_xent(
            a, b, TEMPERATURE, axis_name
        ),
        'clip_softmax': lambda a, b, s, t, axis_name=None: contrastive.clip_softmax(
            a, b, s, axis_name
        ),
        'sigmoid': contrastive.sigmoid_loss,
    }


def mean_loss(sums):
    return sums['loss'] / sums['count']


def equivalence() -> dict:
    rng = np.random.default_rng(0)
    n, dim = 32, 16
    a = jnp.asarray(rng.normal(size=(n, dim)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(n, dim)), jnp.float32)
    scale, bias = jnp.float32(5.0), jnp.float32(-3.0)
    out = {}
    for name, local in local_losses().items():

        def single(a, b, s, t, local=local):
            a, b = contrastive.l2_normalize(a), contrastive.l2_normalize(b)
            return mean_loss(local(a, b, s, t))

        ref_loss, ref_grads = jax.jit(jax.value_and_grad(single, argnums=(0, 1, 2, 3)))(
            a, b, scale, bias
        )
        for shape in [(8, 1, 1), (2, 2, 2), (1, 4, 2)]:
            mesh = sharding_lib.make_mesh(*shape)
            sharded = contrastive.on_mesh(local, mesh, 2)

            def meshed(a, b, s, t, sharded=sharded):
                a, b = contrastive.l2_normalize(a), contrastive.l2_normalize(b)
                return mean_loss(sharded(a, b, s, t))

            with sharding_lib.mesh_context(mesh):
                loss, grads = jax.jit(jax.value_and_grad(meshed, argnums=(0, 1, 2, 3)))(
                    a, b, scale, bias
                )
            out[f'{name} mesh {shape}'] = {
                'loss': abs(float(loss - ref_loss)),
                'grad': max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(grads, ref_grads)),
                'ref_loss': float(ref_loss),
            }

        # pmap: each device's summed loss; gradients summed over devices, then / count.
        def per_device(a, b, s, t, local=local):
            a, b = contrastive.l2_normalize(a), contrastive.l2_normalize(b)
            sums = local(a, b, s, t, axis_name='i')
            return sums['loss'], sums['count']

        def grad_fn(a, b, s, t, per_device=per_device):
            return jax.grad(lambda *args: per_device(*args)[0], argnums=(0, 1, 2, 3))(a, b, s, t)

        shards = (a.reshape(8, n // 8, dim), b.reshape(8, n // 8, dim))
        sums, counts = jax.pmap(per_device, axis_name='i', in_axes=(0, 0, None, None))(
            *shards, scale, bias
        )
        grads = jax.pmap(grad_fn, axis_name='i', in_axes=(0, 0, None, None))(*shards, scale, bias)
        count = counts.sum()
        grads = (
            grads[0].reshape(n, dim) / count,
            grads[1].reshape(n, dim) / count,
            grads[2].sum() / count,
            grads[3].sum() / count,
        )
        out[f'{name} pmap'] = {
            'loss': abs(float(sums.sum() / count - ref_loss)),
            'grad': max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(grads, ref_grads)),
            'ref_loss': float(ref_loss),
        }
    return out


def memory() -> dict:
    per_device, dim = 256, 128
    out = {}
    for name in ('sigmoid', 'clip_softmax'):
        local = local_losses()[name]
        out[name] = {}
        for devices in (1, 2, 4, 8):
            mesh = sharding_lib.make_mesh(devices, 1, 1, devices=jax.devices()[:devices])
            sharded = contrastive.on_mesh(local, mesh, 2)

            def total(a, b, s, t, sharded=sharded):
                return sharded(a, b, s, t)['loss']

            grad = jax.jit(jax.grad(total, argnums=(0, 1, 2, 3)))
            emb = jax.ShapeDtypeStruct(
                (per_device * devices, dim),
                jnp.float32,
                sharding=sharding_lib.batch_sharding(mesh),
            )
            scalar = jax.ShapeDtypeStruct((), jnp.float32)
            with sharding_lib.mesh_context(mesh):
                compiled = grad.lower(emb, emb, scalar, scalar).compile()
            out[name][devices] = compiled.memory_analysis().temp_size_in_bytes
    return out


if __name__ == '__main__':
    print(json.dumps(equivalence() if sys.argv[1] == 'equivalence' else memory()))
