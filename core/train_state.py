"""Train state created already sharded over the mesh.

The state holds arrays only (step, params, opt_state); the model and optimizer are
closed over by the step functions, so the state checkpoints and restores as a plain tree.
"""

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh

from core import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def _boxed_state(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation):
    """Builds a state whose params (and the optimizer's copies of them) keep their logical
    axis metadata, so one `get_partition_spec` call gives the sharding of everything."""

    def init(rng):
        params = init_params(rng)
        opt_state = jax.tree.map(_unbox_masked, tx.init(params), is_leaf=_is_box)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)

    return init


def _is_box(x) -> bool:
    return isinstance(x, nn.Partitioned)


def _unbox_masked(x):
    """A box around optax's MaskedNode (a frozen parameter's place in the optimizer state,
    core/optim.py) holds no array: the node alone, so it gets no sharding either."""
    return x.value if _is_box(x) and isinstance(x.value, optax.MaskedNode) else x


def state_shardings(init_params, tx, mesh: Mesh, rng: jax.Array):
    """The NamedSharding of every leaf of the train state on `mesh`."""
    abstract = jax.eval_shape(_boxed_state(init_params, tx), rng)
    return sharding_lib.logical_to_shardings(
        nn.get_partition_spec(abstract), mesh, nn.meta.unbox(abstract)
    )


def create_sharded_state(init_params, tx, mesh: Mesh, rng: jax.Array, shardings=None):
    """Initialises the state directly into its shardings: no device ever holds it whole.

    Returns (state, shardings).
    """
    if shardings is None:
        shardings = state_shardings(init_params, tx, mesh, rng)
    init = _boxed_state(init_params, tx)
    # No logical-rules context here: `out_shardings` places the result, and the rules would
    # constrain DenseGeneral's flat initial kernels against their final (reshaped) names.
    state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng)
    return state, shardings


def abstract_state(init_params, tx, mesh: Mesh, rng: jax.Array, shardings=None):
    """ShapeDtypeStructs carrying the current mesh's shardings: the restore target."""
    if shardings is None:
        shardings = state_shardings(init_params, tx, mesh, rng)
    shapes = jax.eval_shape(lambda r: nn.meta.unbox(_boxed_state(init_params, tx)(r)), rng)
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
