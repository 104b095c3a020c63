"""Mesh shapes and multi-slice (ICI x DCN) meshes: mesh.data/fsdp/tensor size one slice,
mesh.dcn_data/dcn_fsdp multiply them across slices (TPU) or hosts (GPU/CPU), and the
devices of one slice form a contiguous block along every axis (the DCN index is outer)."""

import dataclasses
import glob
import importlib
import os

import numpy as np
import pytest
from jax.sharding import AxisType

from core import cli, sharding
from core import config as config_lib
from core.errors import ConfigError
from tests.conftest import ROOT, SMALL_RUN, launch


@dataclasses.dataclass(frozen=True)
class FakeTpu:
    """What mesh_utils reads of a TPU device."""

    id: int
    process_index: int
    slice_index: int
    coords: tuple[int, int, int]
    core_on_chip: int = 0
    platform: str = 'tpu'
    device_kind: str = 'TPU v4'


@dataclasses.dataclass(frozen=True)
class FakeHostDevice:
    """A GPU/CPU-like device without `slice_index`: hosts (processes) act as slices."""

    id: int
    process_index: int
    platform: str = 'cpu'
    device_kind: str = 'cpu'


def tpu_slices(num_slices: int, dims: tuple[int, int, int]) -> list[FakeTpu]:
    """`num_slices` TPU v4 slices of dims[0] x dims[1] x dims[2] chips, 4 chips a host."""
    devices = []
    for s in range(num_slices):
        chips = [(x, y, z) for z in range(dims[2]) for y in range(dims[1]) for x in range(dims[0])]
        for coords in chips:
            n = len(devices)
            devices.append(FakeTpu(n, n // 4, s, coords))
    return devices


def host_devices(num_hosts: int, per_host: int) -> list[FakeHostDevice]:
    return [FakeHostDevice(h * per_host + i, h) for h in range(num_hosts) for i in range(per_host)]


def granule(device) -> int:
    return getattr(device, 'slice_index', device.process_index)


def assert_slices_outer(array: np.ndarray, ici, dcn) -> None:
    """Device at (i, j, k) lies in slice ravel((i // ici0, j // ici1, k // ici2), dcn)."""
    assert array.shape == tuple(i * d for i, d in zip(ici, dcn))
    for index in np.ndindex(array.shape):
        block = tuple(i // n for i, n in zip(index, ici))
        assert granule(array[index]) == np.ravel_multi_index(block, dcn), (index, array[index])


@pytest.mark.parametrize(
    'sizes, devices, expected',
    [
        ((-1, 1, 1), 8, (8, 1, 1)),
        ((1, -1, 1), 8, (1, 8, 1)),
        ((2, -1, 2), 8, (2, 2, 2)),
        ((2, 4, 1), 8, (2, 4, 1)),
    ],
)
def test_mesh_shape(sizes, devices, expected):
    assert sharding.mesh_shape(*sizes, devices) == expected


@pytest.mark.parametrize(
    'sizes, devices, match',
    [
        ((-1, -1, 1), 8, 'at most one axis may be -1'),
        ((0, 1, 1), 8, 'sizes must be positive or -1'),
        ((3, -1, 1), 8, 'does not divide the 8 devices'),
        ((2, 2, 1), 8, 'needs 4 devices but there are 8 devices'),
    ],
)
def test_mesh_shape_errors(sizes, devices, match):
    with pytest.raises(ValueError, match=match):
        sharding.mesh_shape(*sizes, devices)


@pytest.mark.parametrize(
    'ici, dcn, devices, expected_ici',
    [
        ((-1, 1, 1), (2, 1, 1), 16, (8, 1, 1)),  # 2 slices of 8: pure data parallel
        ((1, -1, 1), (2, 1, 1), 16, (1, 8, 1)),  # data across slices, fsdp inside
        ((1, -1, 2), (2, 1, 1), 16, (1, 4, 2)),  # + tensor inside a slice
        ((1, -1, 1), (1, 2, 1), 8, (1, 4, 1)),  # fsdp across slices too
        ((2, 2, 1), (2, 2, 1), 16, (2, 2, 1)),  # 4 slices of 4
    ],
)
def test_hybrid_mesh_shape(ici, dcn, devices, expected_ici):
    assert sharding.hybrid_mesh_shape(ici, dcn, devices) == (expected_ici, dcn)


@pytest.mark.parametrize(
    'ici, dcn, devices, match',
    [
        ((1, 1, -1), (1, 1, 2), 8, 'tensor parallelism across slices is not supported'),
        ((-1, 1, 1), (0, 1, 1), 8, 'slice counts must be positive integers'),
        ((-1, 1, 1), (3, 1, 1), 8, '3 slices cannot split 8 devices evenly'),
        ((1, 1, 8), (2, 1, 1), 8, 'tensor parallelism cannot cross slices'),
        ((2, 2, 2), (2, 1, 1), 8, 'needs 8 devices but there are 4 devices of one slice'),
        ((3, -1, 1), (2, 1, 1), 8, 'does not divide the 4 devices of one slice'),
    ],
)
def test_hybrid_mesh_shape_errors(ici, dcn, devices, match):
    with pytest.raises(ValueError, match=match):
        sharding.hybrid_mesh_shape(ici, dcn, devices)


@pytest.mark.parametrize(
    'ici, dcn',
    [((-1, 1, 1), (2, 1, 1)), ((1, -1, 1), (2, 1, 1)), ((1, -1, 2), (2, 1, 1)),
     ((1, -1, 1), (1, 2, 1))],
)  # fmt: skip
def test_tpu_slices_are_contiguous_blocks(ici, dcn):
    devices = tpu_slices(2, (2, 2, 2))  # 2 slices of 8 chips (v4-16 each), 2 hosts a slice
    ici, dcn = sharding.hybrid_mesh_shape(ici, dcn, len(devices))
    assert_slices_outer(sharding.hybrid_device_array(ici, dcn, devices), ici, dcn)


def test_four_tpu_slices_over_data_and_fsdp():
    devices = tpu_slices(4, (2, 2, 1))
    ici, dcn = sharding.hybrid_mesh_shape((1, 2, 2), (2, 2, 1), len(devices))
    assert_slices_outer(sharding.hybrid_device_array(ici, dcn, devices), ici, dcn)


def test_hosts_act_as_slices_without_slice_index():
    """GPU/CPU devices without slice_index: the processes are the DCN units."""
    devices = host_devices(2, 4)
    ici, dcn = sharding.hybrid_mesh_shape((1, -1, 1), (2, 1, 1), len(devices))
    array = sharding.hybrid_device_array(ici, dcn, devices)
    assert_slices_outer(array, ici, dcn)
    assert [d.process_index for d in array[0].flat] == [0] * 4


def test_make_mesh_hybrid_has_auto_axes_of_ici_times_dcn():
    mesh = sharding.make_mesh(1, -1, 1, devices=host_devices(2, 4), dcn_data=2)
    assert dict(mesh.shape) == {'data': 2, 'fsdp': 4, 'tensor': 1}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert sharding.batch_shards(mesh) == 8


def test_multi_slice_devices_need_dcn():
    with pytest.raises(ValueError, match=r'span 2 slices; set --config.mesh.dcn_data=2'):
        sharding.make_mesh(devices=tpu_slices(2, (2, 2, 1)))


@pytest.mark.parametrize(
    'devices, dcn_data, match',
    [
        (tpu_slices(2, (2, 2, 1)), 4, r'form 2 slices; set mesh.dcn_data\*mesh.dcn_fsdp to 2'),
        (host_devices(1, 8), 2, 'form 1 processes .*leave mesh.dcn_data and mesh.dcn_fsdp at 1'),
        (host_devices(4, 2), 2, r'form 4 processes .*set mesh.dcn_data\*mesh.dcn_fsdp to 4'),
    ],
)
def test_dcn_must_match_the_slices(devices, dcn_data, match):
    with pytest.raises(ValueError, match=match):
        sharding.make_mesh(devices=devices, dcn_data=dcn_data)


def test_unequal_hosts_are_refused():
    devices = host_devices(1, 3) + [FakeHostDevice(3 + i, 1) for i in range(5)]
    with pytest.raises(ValueError, match='hold different device counts'):
        sharding.make_mesh(devices=devices, dcn_data=2)


def test_mesh_from_config_without_dcn_keys():
    """A config.json of an older run (no dcn keys) still builds its mesh."""
    import ml_collections

    config = ml_collections.ConfigDict({'mesh': {'data': -1, 'fsdp': 1, 'tensor': 1}})
    mesh = sharding.mesh_from_config(config)
    assert mesh.shape['tensor'] == 1


# Every experiment config file (configs/common.py holds the blocks they compose).
CONFIG_FILES = sorted(
    p for p in glob.glob(os.path.join(ROOT, 'configs', '*.py')) if not p.endswith('common.py')
)


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_every_config_accepts_dcn_keys(path):
    module = importlib.import_module(f'configs.{os.path.basename(path)[:-3]}')
    config = module.get_config()
    paths = ['mesh'] if 'mesh' in config else ['pretrain.mesh', 'finetune.mesh']  # study
    for p in paths:
        mesh = config_lib.get(config, p)
        assert (mesh.dcn_data, mesh.dcn_fsdp) == (1, 1)
    overrides = [f'--config.{p}.{k}=2' for p in paths for k in ('dcn_data', 'dcn_fsdp')]
    cli.check_config_overrides(['--config', os.path.relpath(path, ROOT), *overrides])


def test_pmap_refuses_dcn_fsdp():
    from configs import bert_mlm

    config = bert_mlm.get_config('tiny')
    config.parallelism = 'pmap'
    config.mesh.dcn_fsdp = 2
    with pytest.raises(ConfigError, match='mesh.dcn_fsdp=2: parallelism=pmap'):
        config_lib.check_common(config)


@pytest.mark.slow
def test_two_hosts_as_slices_train(tmp_path, pydoc_vocab):
    """2 processes x 4 CPU devices, data across the 'hosts', fsdp inside each: a real run."""
    r = launch(
        'pretrain',
        '--config',
        'configs/bert_mlm.py:tiny',
        '--workdir',
        str(tmp_path / 'run'),
        *SMALL_RUN,
        f'--config.data.vocab_file={pydoc_vocab}',
        '--config.total_steps=2',
        '--config.mesh.dcn_data=2',
        '--config.mesh.data=1',
        '--config.mesh.fsdp=-1',
        '--local_processes',
        '2',
        env={'XLA_FLAGS': '--xla_force_host_platform_device_count=4'},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mesh {'data': 2, 'fsdp': 4, 'tensor': 1}" in r.stderr
