"""One device mesh (`data`, `fsdp`, `tensor`) and one table from logical axis names to it.

Changing a parallelism layout is a config change: `mesh.data`, `mesh.fsdp`, `mesh.tensor`
pick the mesh shape (-1 = the rest of the devices), `LOGICAL_RULES` says where each
logically named dimension goes. Across TPU slices or GPU/CPU hosts (the data-centre network,
DCN), `mesh.dcn_data` / `mesh.dcn_fsdp` multiply the data / fsdp axes and the other sizes
describe one slice (MaxText's ici x dcn meshes; docs/launching.md).
"""

import collections
import contextlib
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from absl import logging
from flax import linen as nn
from jax.experimental import mesh_utils
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
    ('layers', None),  # the stacked layer axis of a scanned encoder (model.scan_layers)
)


def mesh_shape(
    data: int, fsdp: int, tensor: int, num_devices: int, slices: int = 1
) -> tuple[int, int, int]:
    """Resolves -1 (at most one) to the devices left over; checks the product.

    With `slices` > 1 the sizes describe one slice and `num_devices` is the device count of
    one slice (the messages say so).
    """
    sizes = [data, fsdp, tensor]
    where = f'{num_devices} devices' if slices == 1 else f'{num_devices} devices of one slice'
    if sizes.count(-1) > 1:
        raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1')
    known = int(np.prod([s for s in sizes if s != -1]))
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))}: sizes must be positive or -1')
    if slices > 1 and tensor > num_devices:
        raise ValueError(
            f'mesh.tensor={tensor} is more than the {where}: tensor parallelism cannot cross '
            'slices (it needs the fast in-slice interconnect); keep mesh.tensor within a slice '
            'and split data or fsdp across slices with mesh.dcn_data / mesh.dcn_fsdp'
        )
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f'mesh {dict(zip(MESH_AXES, sizes))} does not divide the {where}; '
                'set --config.mesh.* so that their product divides that count'
            )
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(
            f'mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices but there '
            f'are {where}; make data*fsdp*tensor equal that count (or use -1 for one axis)'
        )
    return tuple(sizes)


def hybrid_mesh_shape(
    ici: Sequence[int], dcn: Sequence[int], num_devices: int
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(ici, dcn) sizes of (data, fsdp, tensor): `ici` describes one slice (-1 = the rest of
    the slice), `dcn` how many slices each axis spans. The mesh axis sizes are ici * dcn."""
    dcn = tuple(dcn)
    names = dict(zip(MESH_AXES, dcn))
    if any(not isinstance(s, int) or s < 1 for s in dcn):
        raise ValueError(
            f'mesh.dcn_* {names}: slice counts must be positive integers (1 = not split '
            'across slices)'
        )
    if dcn[2] != 1:
        raise ValueError(
            f'dcn tensor={dcn[2]}: tensor parallelism across slices is not supported (every '
            'matmul would wait on the data-centre network); keep tensor inside a slice '
            '(mesh.tensor) and put the slices on data or fsdp (mesh.dcn_data, mesh.dcn_fsdp)'
        )
    slices = int(np.prod(dcn))
    if num_devices % slices:
        raise ValueError(
            f'mesh.dcn_data*mesh.dcn_fsdp = {slices} slices cannot split {num_devices} devices '
            'evenly; set their product to the number of slices (TPU) or hosts (GPU/CPU), 1 on '
            'a single one'
        )
    return mesh_shape(*ici, num_devices // slices, slices=slices), dcn


def _granules(devices: Sequence) -> tuple[str, dict]:
    """The units the data-centre network connects: TPU slices where the devices span
    several (`slice_index`), else processes (GPU/CPU hosts). Returns (attribute, {key:
    device count})."""
    if all(hasattr(d, 'slice_index') for d in devices):
        counts = collections.Counter(d.slice_index for d in devices)
        if len(counts) > 1:
            return 'slice_index', counts
    return 'process_index', collections.Counter(d.process_index for d in devices)


def hybrid_device_array(ici: Sequence[int], dcn: Sequence[int], devices: Sequence) -> np.ndarray:
    """The devices as an array of shape ici * dcn, each slice (or host) a contiguous block:
    along every axis the dcn index is the outer one, so collectives over an axis's ici part
    stay inside a slice."""
    attr, counts = _granules(devices)
    unit = 'slices' if attr == 'slice_index' else 'processes (hosts act as slices on GPU/CPU)'
    slices = int(np.prod(dcn))
    if len(counts) != slices:
        fix = (
            f'set mesh.dcn_data*mesh.dcn_fsdp to {len(counts)}'
            if len(counts) > 1
            else 'leave mesh.dcn_data and mesh.dcn_fsdp at 1 (one slice or host has no DCN axis)'
        )
        raise ValueError(
            f'mesh.dcn_data*mesh.dcn_fsdp = {slices}, but the {len(devices)} devices form '
            f'{len(counts)} {unit}; {fix}'
        )
    if len(set(counts.values())) != 1:
        raise ValueError(
            f'the {len(counts)} {unit} hold different device counts {dict(counts)}; a hybrid '
            'mesh needs the same number of devices in each (on SLURM: one task per node and the '
            'same GPUs per node)'
        )
    kind = devices[0].device_kind
    return mesh_utils.create_hybrid_device_mesh(
        ici,
        dcn,
        devices,
        process_is_granule=attr == 'process_index',
        allow_split_physical_axes=kind in ('TPU v5 lite', 'TPU v5e'),  # as jax.make_mesh
    )


def make_mesh(
    data: int = -1,
    fsdp: int = 1,
    tensor: int = 1,
    devices: Sequence | None = None,
    *,
    dcn_data: int = 1,
    dcn_fsdp: int = 1,
    dcn_tensor: int = 1,
) -> Mesh:
    """A mesh with Auto axes, as Linen logical partitioning expects.

    With dcn_data * dcn_fsdp > 1 (multi-slice, or several GPU hosts), data/fsdp/tensor
    size one slice and the dcn sizes multiply them: the mesh axis `data` has data *
    dcn_data devices, and so on, the slices outermost (MaxText's ici/dcn parallelism).
    """
    devices = list(devices) if devices is not None else jax.devices()
    dcn = (dcn_data, dcn_fsdp, dcn_tensor)
    axis_types = (AxisType.Auto,) * 3
    if dcn == (1, 1, 1):
        attr, counts = _granules(devices)
        if attr == 'slice_index':  # jax.make_mesh refuses these
            raise ValueError(
                f'the {len(devices)} devices span {len(counts)} slices; set '
                f'--config.mesh.dcn_data={len(counts)} (data parallel across slices) or '
                'mesh.dcn_fsdp, with mesh.data/fsdp/tensor describing one slice'
            )
        shape = mesh_shape(data, fsdp, tensor, len(devices))
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    ici, dcn = hybrid_mesh_shape((data, fsdp, tensor), dcn, len(devices))
    array = hybrid_device_array(ici, dcn, devices)
    logging.info(
        'hybrid mesh: %s per slice x %s slices = %s',
        dict(zip(MESH_AXES, ici)),
        dict(zip(MESH_AXES, dcn)),
        dict(zip(MESH_AXES, array.shape)),
    )
    return Mesh(array, MESH_AXES, axis_types=axis_types)


def mesh_from_config(config) -> Mesh:
    m = config.mesh
    return make_mesh(
        m.data, m.fsdp, m.tensor, dcn_data=m.get('dcn_data', 1), dcn_fsdp=m.get('dcn_fsdp', 1)
    )


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
