"""One device mesh (`data`, `fsdp`, `tensor`) and one table from logical axis names to it.

Changing a parallelism layout is a config change: `mesh.data`, `mesh.fsdp`, `mesh.tensor`
pick the mesh shape (-1 = the rest of the devices), `LOGICAL_RULES` says where each
logically named dimension goes.
"""

import contextlib
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor')

# Logical name -> mesh axes. Parameters: `embed` is sharded over fsdp (ZeRO-3 style),
# the wide dimensions (`mlp`, `heads`, `vocab`) over tensor (Megatron style).
# Activations: the batch goes over data and fsdp, wide activation dims over tensor.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ('batch', ('data', 'fsdp')),
    ('length', None),
    ('act_embed', None),
    ('act_mlp', 'tensor'),
    ('act_heads', 'tensor'),
    ('act_kv', None),
    ('act_vocab', None),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv', None),
    ('qkv', None),
    ('vocab', 'tensor'),
    ('norm', None),
)


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """Resolves -1 (at most one) to the devices left over; checks the product."""
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1')
    known = int(np.prod([s for s in sizes if s != -1]))
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))}: sizes must be positive or -1')
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f'mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices; '
                'set --config.mesh.* so that their product divides the device count'
            )
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(
            f'mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices but '
            f'{num_devices} are available; make data*fsdp*tensor equal the device count '
            '(or use -1 for one axis)'
        )
    return tuple(sizes)


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence | None = None
) -> Mesh:
    """A mesh with Auto axes, as Linen logical partitioning expects."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(data, fsdp, tensor, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def mesh_from_config(config) -> Mesh:
    return make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)


def logical_to_shardings(logical_specs, mesh: Mesh, shapes=None):
    """A tree of logical PartitionSpecs -> a tree of NamedShardings on `mesh`.

    With `shapes` (a matching tree of arrays or ShapeDtypeStructs), a dimension that the
    mesh axes do not divide (BERT's vocab of 30522 over tensor=4, say) is replicated
    instead of failing; everything else keeps its sharding.
    """
    shardings = nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_RULES)
    if shapes is None:
        return shardings
    return jax.tree.map(
        lambda sh, x: NamedSharding(mesh, fit_spec(sh.spec, x.shape, mesh)), shardings, shapes
    )


def fit_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Drops the mesh axes of each dimension they do not divide evenly."""
    fitted = []
    for i, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        fitted.append(axes if shape[i] % size == 0 else None)
    return PartitionSpec(*fitted)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of every input array: leading (batch) dimension over data x fsdp."""
    return NamedSharding(mesh, PartitionSpec(('data', 'fsdp')))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_shards(mesh: Mesh) -> int:
    """How many ways the global batch is split."""
    return mesh.shape['data'] * mesh.shape['fsdp']


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each host's slice of the batch into global arrays sharded over the mesh."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


@contextlib.contextmanager
def mesh_context(mesh: Mesh) -> Iterator[None]:
    """Makes `mesh` and the logical rules current, for tracing sharded functions."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        yield
