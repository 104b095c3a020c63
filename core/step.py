"""Train and eval steps as pure functions, wrapped either as jit over a mesh or as pmap.

A loss function has the signature

    loss_fn(params, batch, rng, train: bool, rows=None) -> (loss_sum, sums)

where `loss_sum` is the loss summed over examples/tokens and `sums` holds other summed
metrics plus `denominator` (the total weight). Returning sums makes the average exact
across micro-batches, devices and hosts: the step adds everything up first, then divides
(the gradient of sum/D is grad(sum)/D, so dividing the summed gradient is the same).

`rows` ([batch] int32) is each example's row in the step's global batch (None: the batch
is the whole step, rows 0 .. batch - 1). `rng` is the same on every device (seed and step),
and every random draw for an example (dropout masks, augmentations) comes from `rng` and
its row alone, so a run is the same on any layout (devices, processes, pmap or jit) and
with any number of micro-batches.
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from core import sharding as sharding_lib
from core.train_state import TrainState

LossFn = Callable[
    [Any, dict, jax.Array, bool, jax.Array | None], tuple[jax.Array, dict[str, jax.Array]]
]


def example_rows(batch: dict, axis_name: str | None = None) -> jax.Array:
    """[batch] int32: each example's row in the step's global batch. Under jit the batch is
    the global array; under pmap device i holds rows i * n ... (i + 1) * n - 1 of it."""
    n = jax.tree.leaves(batch)[0].shape[0]
    rows = jnp.arange(n, dtype=jnp.int32)
    if axis_name is not None:
        rows = rows + n * jax.lax.axis_index(axis_name)
    return rows


def _split_microbatches(batch, accum_steps: int):
    """[batch, ...] -> [accum_steps, batch / accum_steps, ...], interleaved so that every
    device contributes equally to every micro-batch."""

    def split(x):
        x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, batch)


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    accum_steps: int = 1,
    axis_name: str | None = None,
    skip_nonfinite: bool = False,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update. Under pmap `axis_name` names the device axis to sum over.

    `skip_nonfinite`: a step whose loss or gradients are NaN/Inf leaves the parameters and
    optimizer state as they were (the step counter still advances); metrics['skipped'] is 1
    for such a step.
    """
    rng = jax.random.fold_in(rng, state.step)  # the same key on every device and micro-batch
    rows = example_rows(batch, axis_name)
    grad_fn = jax.value_and_grad(lambda p, b, r: loss_fn(p, b, rng, True, r), has_aux=True)

    if accum_steps == 1:
        (loss_sum, sums), grads = grad_fn(state.params, batch, rows)
    else:

        def accumulate(carry, micro):
            (loss_i, sums_i), grads_i = grad_fn(state.params, *micro)
            return jax.tree.map(jnp.add, carry, (loss_i, sums_i, grads_i)), None

        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, state.params, batch, rows))
        zero_loss, zero_sums = zeros[0]
        carry = (zero_loss, zero_sums, jax.tree.map(jnp.zeros_like, state.params))
        micro = _split_microbatches((batch, rows), accum_steps)  # rows go with their examples
        (loss_sum, sums, grads), _ = jax.lax.scan(accumulate, carry, micro)

    if axis_name is not None:
        loss_sum, sums, grads = jax.lax.psum((loss_sum, sums, grads), axis_name)
    denominator = jnp.maximum(sums.pop('denominator'), 1e-8)
    grads = jax.tree.map(lambda g: g / denominator, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {k: v / denominator for k, v in sums.items()}
    metrics.update(
        loss=loss_sum / denominator,
        grad_norm=optax.global_norm(grads),
        learning_rate=schedule(state.step),
    )
    if skip_nonfinite:
        finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])

        def keep(new, old):
            return jnp.where(finite, new, old)

        params = jax.tree.map(keep, params, state.params)
        opt_state = jax.tree.map(keep, opt_state, state.opt_state)
        metrics['skipped'] = 1.0 - finite.astype(jnp.float32)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def eval_step(
    params, batch: dict[str, jax.Array], *, loss_fn: LossFn, axis_name: str | None = None
) -> dict[str, jax.Array]:
    """Summed eval metrics of one batch (`loss`, ..., `denominator`); divide after summing
    over all eval batches."""
    rng = jax.random.key(0)  # eval draws (augmentations, SimCSE's views): fixed, per row
    loss_sum, sums = loss_fn(params, batch, rng, False, example_rows(batch, axis_name))
    sums = dict(sums, loss=loss_sum)
    if axis_name is not None:
        sums = jax.lax.psum(sums, axis_name)
    return sums


def bound_train_step(loss_fn, tx, schedule, accum_steps, skip_nonfinite, axis_name=None):
    """train_step with all but (state, batch, rng) bound, for jit or pmap to compile."""
    return functools.partial(
        train_step,
        loss_fn=loss_fn,
        tx=tx,
        schedule=schedule,
        accum_steps=accum_steps,
        axis_name=axis_name,
        skip_nonfinite=skip_nonfinite,
    )


class JitStepper:
    """The steps as `jax.jit` over global arrays on a mesh, state donated."""

    def __init__(
        self,
        mesh: Mesh,
        state_shardings,
        loss_fn: LossFn,
        tx,
        schedule,
        accum_steps,
        skip_nonfinite: bool = False,
    ):
        self.mesh = mesh
        self._param_shardings = state_shardings.params
        batch_sh = sharding_lib.batch_sharding(mesh)
        repl = sharding_lib.replicated(mesh)
        self._train = jax.jit(
            bound_train_step(loss_fn, tx, schedule, accum_steps, skip_nonfinite),
            in_shardings=(state_shardings, batch_sh, repl),
            out_shardings=(state_shardings, repl),
            donate_argnums=0,
        )
        self._eval = jax.jit(
            functools.partial(eval_step, loss_fn=loss_fn),
            in_shardings=(state_shardings.params, batch_sh),
            out_shardings=repl,
        )

    def _context(self):
        return sharding_lib.mesh_context(self.mesh)

    def put_state(self, state: TrainState) -> TrainState:
        return state  # created or restored into its shardings already

    def get_state(self, state: TrainState) -> TrainState:
        return state

    def put_batch(self, local_batch: dict) -> dict:
        return sharding_lib.global_batch(local_batch, self.mesh)

    def train(self, state, batch, rng):
        with self._context():
            return self._train(state, batch, rng)

    def evaluate(self, params, batch):
        with self._context():
            return self._eval(params, batch)

    def map_batch(self, fn: Callable[[Any, dict], Any]) -> Callable[[Any, dict], Any]:
        """`fn(params, batch) -> tree of [batch, ...]` as a sharded step whose result comes
        back to every host whole, as NumPy (features for evaluation, say)."""
        batch_sh = sharding_lib.batch_sharding(self.mesh)
        jitted = jax.jit(fn, in_shardings=(self._param_shardings, batch_sh), out_shardings=batch_sh)

        def run(params, batch):
            with self._context():
                out = jitted(params, batch)
            return multihost_utils.process_allgather(out, tiled=True)

        return run

    def lower_train(self, state, batch, rng):
        """AOT lowering of the train step (for cost and memory analysis)."""
        with self._context():
            return self._train.lower(state, batch, rng)


class PmapStepper:
    """The same steps as `jax.pmap` over the local devices (pure data parallelism).

    The state is replicated on every device; each device takes an equal slice of the
    host's batch, and gradients are summed over the device axis.
    """

    axis = 'devices'

    def __init__(self, loss_fn: LossFn, tx, schedule, accum_steps, skip_nonfinite: bool = False):
        self.devices = jax.local_devices()
        device_mesh = Mesh(np.array(self.devices), (self.axis,))
        self._sharding = NamedSharding(device_mesh, PartitionSpec(self.axis))
        step = bound_train_step(loss_fn, tx, schedule, accum_steps, skip_nonfinite, self.axis)
        self._train = jax.pmap(step, axis_name=self.axis, in_axes=(0, 0, None), donate_argnums=0)
        self._eval = jax.pmap(
            functools.partial(eval_step, loss_fn=loss_fn, axis_name=self.axis),
            axis_name=self.axis,
        )

    def put_state(self, state: TrainState) -> TrainState:
        n = len(self.devices)
        return jax.tree.map(
            lambda x: jax.device_put(np.broadcast_to(x, (n, *x.shape)), self._sharding),
            jax.device_get(state),
        )

    def get_state(self, state: TrainState) -> TrainState:
        """The state of device 0 (all replicas are equal), as host-side arrays."""
        return jax.tree.map(lambda x: x[0], jax.device_get(state))

    def put_batch(self, local_batch: dict) -> dict:
        n = len(self.devices)

        def split(x):
            if x.shape[0] % n:
                raise ValueError(
                    f'per-host batch {x.shape[0]} is not divisible by {n} local devices; '
                    'make batch_size a multiple of the device count'
                )
            return x.reshape(n, x.shape[0] // n, *x.shape[1:])

        return jax.device_put(jax.tree.map(split, local_batch), self._sharding)

    def train(self, state, batch, rng):
        state, metrics = self._train(state, batch, rng)
        return state, jax.tree.map(lambda x: x[0], metrics)

    def map_batch(self, fn: Callable[[Any, dict], Any]) -> Callable[[Any, dict], Any]:
        """`fn(params, batch)` on every device's slice; the rows of all devices and hosts
        come back to every host in batch order, as NumPy."""
        mapped = jax.pmap(fn)

        def run(params, batch):
            out = jax.tree.map(
                lambda x: np.asarray(x).reshape(-1, *x.shape[2:]), mapped(params, batch)
            )
            if jax.process_count() > 1:
                out = multihost_utils.process_allgather(out, tiled=True)
            return out

        return run

    def evaluate(self, params, batch):
        return jax.tree.map(lambda x: x[0], self._eval(params, batch))
