"""Contrastive losses over the global batch: NT-Xent (SimCLR, SimCSE), CLIP softmax and
SigLIP sigmoid.

Each loss is written for one shard of the batch: `z1`, `z2` (or `img`, `txt`) are the
local rows, [n, dim], already l2-normalised. With `axis_name` (the batch axes of a
`shard_map`, or the device axis of `pmap`) the negatives come from every device and host:

  - NT-Xent and CLIP all-gather the other shards' embeddings, so each shard holds a
    [n, global_batch] block of logits (the standard recipe, memory grows with the devices);
  - the sigmoid loss never gathers: text embeddings travel round a ring of devices
    (`ppermute`), one [n, n] block at a time, and the backward pass replays the ring, so
    per-device memory stays the same whatever the device count (SigLIP, Zhai et al. 2023).

Every loss returns sums over its local rows plus the row count, like the other losses of
this project, so the global loss is the sum over shards divided by the summed count.
`on_mesh` wraps a local loss in `jax.shard_map` for the jit-over-a-mesh step; under pmap
the same local function is called directly with the pmap axis name.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from core import sharding as sharding_lib
from core.losses import weighted_cross_entropy
from core.task import Runtime

AxisName = str | tuple[str, ...] | None

# Large enough to remove a logit from a softmax, small enough to stay finite in float32.
_MASKED = -1e9


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def view_rows(rows: jax.Array) -> jax.Array:
    """The ids of the two views of each example, for a model run over [view 1; view 2]:
    2 * row and 2 * row + 1, so each view's dropout masks are its own and depend on the
    example's global row only (not on where the local batch ends)."""
    return jnp.concatenate([2 * rows, 2 * rows + 1])


def _shard_index_and_count(axis_name: AxisName) -> tuple[jax.Array, int]:
    if axis_name is None:
        return jnp.zeros((), jnp.int32), 1
    return jax.lax.axis_index(axis_name), jax.lax.axis_size(axis_name)


def _gather(x: jax.Array, axis_name: AxisName) -> jax.Array:
    """[n, dim] per shard -> [shards * n, dim], shard s's rows at s * n."""
    if axis_name is None:
        return x
    return jax.lax.all_gather(x, axis_name, tiled=True)


def nt_xent(
    z1: jax.Array, z2: jax.Array, temperature: float, axis_name: AxisName = None
) -> dict[str, jax.Array]:
    """NT-Xent (SimCLR): each of the 2N views must pick its partner among the other 2N - 1.

    z1, z2: [n, dim] l2-normalised, row i of both being two views of one example.
    Returns sums over the 2n local views: `loss`, `accuracy` (the partner scores highest),
    and `count` (2n).
    """
    n = z1.shape[0]
    shard, shards = _shard_index_and_count(axis_name)
    keys = jnp.concatenate([_gather(z1, axis_name), _gather(z2, axis_name)])  # [2N, dim]
    total = n * shards
    queries = jnp.concatenate([z1, z2])  # [2n, dim]
    logits = queries @ keys.T / temperature  # [2n, 2N]
    rows = shard * n + jnp.arange(n)  # global index of the local examples
    self_index = jnp.concatenate([rows, rows + total])
    partner = jnp.concatenate([rows + total, rows])
    logits = jnp.where(jnp.arange(2 * total)[None, :] == self_index[:, None], _MASKED, logits)
    loss, hits, _ = weighted_cross_entropy(logits, partner)
    return {'loss': loss, 'accuracy': hits, 'count': jnp.asarray(2.0 * n)}


def clip_softmax(
    img: jax.Array, txt: jax.Array, scale: jax.Array, axis_name: AxisName = None
) -> dict[str, jax.Array]:
    """CLIP's symmetric InfoNCE: each image picks its caption among all N, and each caption
    its image; the loss is the mean of both directions.

    img, txt: [n, dim] l2-normalised, row i a pair; scale: the (clamped) inverse
    temperature. Returns sums over the n local pairs: `loss`, `i2t_accuracy`,
    `t2i_accuracy`, `count` (n).
    """
    n = img.shape[0]
    shard, _ = _shard_index_and_count(axis_name)
    labels = shard * n + jnp.arange(n)
    i2t_loss, i2t_hits, _ = weighted_cross_entropy(scale * img @ _gather(txt, axis_name).T, labels)
    t2i_loss, t2i_hits, _ = weighted_cross_entropy(scale * txt @ _gather(img, axis_name).T, labels)
    return {
        'loss': 0.5 * (i2t_loss + t2i_loss),
        'i2t_accuracy': i2t_hits,
        't2i_accuracy': t2i_hits,
        'count': jnp.asarray(float(n)),
    }


def _sigmoid_block(img, txt, scale, bias, positive: bool):
    """-log sigmoid(label * logit) summed over an [n, n] block, and dL/dlogits."""
    logits = scale * (img @ txt.T) + bias
    labels = 2.0 * jnp.eye(img.shape[0], dtype=logits.dtype) - 1.0 if positive else -1.0
    loss = -jnp.sum(jax.nn.log_sigmoid(labels * logits))
    dlogits = -labels * jax.nn.sigmoid(-labels * logits)
    return loss, dlogits


def _ring_permutation(shards: int) -> list[tuple[int, int]]:
    return [(i, (i + 1) % shards) for i in range(shards)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _sigmoid_ring(img, txt, scale, bias, axis_name):
    loss, _ = _sigmoid_ring_fwd(img, txt, scale, bias, axis_name)
    return loss


def _sigmoid_ring_fwd(img, txt, scale, bias, axis_name):
    loss, _ = _sigmoid_block(img, txt, scale, bias, positive=True)
    shards = 1 if axis_name is None else jax.lax.axis_size(axis_name)
    if shards > 1:

        def hop(_, carry):  # the next shard's captions: all negatives
            chunk, loss = carry
            chunk = jax.lax.ppermute(chunk, axis_name, _ring_permutation(shards))
            block_loss, _ = _sigmoid_block(img, chunk, scale, bias, positive=False)
            return chunk, loss + block_loss

        # A loop, not an unrolled chain: one [n, n] block is live at a time.
        _, loss = jax.lax.fori_loop(1, shards, hop, (txt, loss))
    return loss, (img, txt, scale, bias)


def _sigmoid_ring_bwd(axis_name, residuals, g):
    """Replays the ring: each text chunk travels with the gradient accumulated for it and
    is back on its own shard after the last hop."""
    img, txt, scale, bias = residuals
    shards = 1 if axis_name is None else jax.lax.axis_size(axis_name)

    def block_grads(chunk, d_chunk, d_img, d_scale, d_bias, positive: bool):
        _, dlogits = _sigmoid_block(img, chunk, scale, bias, positive)
        dlogits = g * dlogits  # [n, n]
        return (
            d_chunk + scale * dlogits.T @ img,
            d_img + scale * dlogits @ chunk,
            d_scale + jnp.sum(dlogits * (img @ chunk.T)),
            d_bias + jnp.sum(dlogits),
        )

    d_chunk, d_img, d_scale, d_bias = block_grads(
        txt,
        jnp.zeros_like(txt),
        jnp.zeros_like(img),
        jnp.zeros_like(scale),
        jnp.zeros_like(bias),
        positive=True,
    )
    if shards > 1:

        def hop(_, carry):
            chunk, d_chunk, *acc = carry
            chunk, d_chunk = jax.lax.ppermute(
                (chunk, d_chunk), axis_name, _ring_permutation(shards)
            )
            return (chunk, *block_grads(chunk, d_chunk, *acc, positive=False))

        _, d_chunk, d_img, d_scale, d_bias = jax.lax.fori_loop(
            1, shards, hop, (txt, d_chunk, d_img, d_scale, d_bias)
        )
        # The last hop brings every chunk's gradient home.
        d_chunk = jax.lax.ppermute(d_chunk, axis_name, _ring_permutation(shards))
    return d_img, d_chunk, d_scale, d_bias


_sigmoid_ring.defvjp(_sigmoid_ring_fwd, _sigmoid_ring_bwd)


def sigmoid_loss(
    img: jax.Array, txt: jax.Array, scale: jax.Array, bias: jax.Array, axis_name: AxisName = None
) -> dict[str, jax.Array]:
    """SigLIP: an independent binary decision for every image-caption pair of the global
    batch (its own caption positive, the N - 1 others negative), computed one [n, n] block
    at a time round the device ring.

    Returns sums over the n local images: `loss` (each image's summed loss over all N
    captions, SigLIP's normalisation), `count` (n).
    """
    loss = _sigmoid_ring(img, txt, scale, bias, axis_name)
    return {'loss': loss, 'count': jnp.asarray(float(img.shape[0]))}


def on_mesh(local_loss: Callable[..., dict], mesh: Mesh, num_batched: int) -> Callable:
    """Runs `local_loss(*batched, *replicated, axis_name=...)` once per batch shard of
    `mesh` with `jax.shard_map`; returns the sums added over shards.

    The first `num_batched` arguments are split over the mesh's batch axes (data x fsdp);
    the others (temperature, bias: scalars) are handed to every shard as a per-shard copy,
    so their gradients add up over shards through an ordinary broadcast.
    """
    batch_axes = ('data', 'fsdp')
    shards = sharding_lib.batch_shards(mesh)

    def per_shard(*args):
        batched, replicated = args[:num_batched], [a[0] for a in args[num_batched:]]
        sums = local_loss(*batched, *replicated, axis_name=batch_axes)
        return jax.tree.map(lambda s: s[None], sums)  # [1] per shard

    def wrapped(*args):
        batched, replicated = args[:num_batched], args[num_batched:]
        copies = [jnp.broadcast_to(a, (shards,)) for a in replicated]
        spec = PartitionSpec(batch_axes)
        sums = jax.shard_map(
            per_shard,
            mesh=mesh,
            in_specs=(spec,) * len(args),
            out_specs=spec,
            axis_names=set(batch_axes),
        )(*batched, *copies)
        return jax.tree.map(jnp.sum, sums)

    return wrapped


def global_loss(local_loss, runtime: Runtime, num_batched: int):
    """A local contrastive loss made global: under jit, one shard_map over the batch axes
    of the mesh; under pmap, the pmap device axis."""
    if runtime.pmap_axis is not None:
        axis = runtime.pmap_axis
        return lambda *args: local_loss(*args, axis_name=axis)
    return on_mesh(local_loss, runtime.mesh, num_batched)
