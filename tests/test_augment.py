"""On-device image augmentations (data/augment.py): shapes, randomness, each op's effect."""

import colorsys
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from data.augment import AugmentConfig, _hsv_to_rgb, _rgb_to_hsv, augment, two_views

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One batch shape throughout, small, so each config compiles once and quickly.
B, H, W = 16, 16, 16

OFF = AugmentConfig(
    crop=False,
    flip=False,
    color_jitter_prob=0.0,
    brightness=0.0,
    contrast=0.0,
    saturation=0.0,
    hue=0.0,
    grayscale_prob=0.0,
    blur_prob=0.0,
)


def only(**kwargs) -> AugmentConfig:
    """Every op off except the ones named."""
    return AugmentConfig(**{**OFF.__dict__, **kwargs})


def images(channels: int, seed: int = 0) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed), (B, H, W, channels))


def tiled(channels: int, seed: int = 0) -> jax.Array:
    """The same image B times, so that differences between outputs come from the draws."""
    return jnp.broadcast_to(images(channels, seed)[:1], (B, H, W, channels))


@pytest.mark.parametrize('channels', [1, 3])
def test_shape_dtype_range_and_two_views(channels):
    x = images(channels)
    v1, v2 = two_views(jax.random.key(1), x, AugmentConfig())
    for v in (v1, v2):
        assert v.shape == x.shape and v.dtype == jnp.float32
        assert float(v.min()) >= 0.0 and float(v.max()) <= 1.0
        assert np.isfinite(np.asarray(v)).all()
    assert not np.allclose(v1, v2)


def test_an_example_draws_the_same_whichever_slice_of_the_batch_holds_it():
    """Example b's draws come from the key and its row in the global batch: a device holding
    rows 8..15 augments them as one device holding the whole batch does."""
    x, cfg, key = images(3), AugmentConfig(), jax.random.key(5)
    whole = augment(key, x, cfg)
    half = augment(key, x[B // 2 :], cfg, jnp.arange(B // 2, B))
    np.testing.assert_allclose(half, whole[B // 2 :], atol=1e-6)
    assert not np.allclose(augment(key, x[B // 2 :], cfg), half)  # rows 0..7 draw otherwise


def test_same_key_same_output_different_key_different():
    x, cfg = images(3), AugmentConfig()
    a = augment(jax.random.key(7), x, cfg)
    np.testing.assert_array_equal(a, augment(jax.random.key(7), x, cfg))
    assert not np.allclose(a, augment(jax.random.key(8), x, cfg))


def test_examples_in_a_batch_get_different_crops():
    y = np.asarray(augment(jax.random.key(0), tiled(3), only(crop=True)))
    flat = y.reshape(B, -1)
    distinct = {tuple(np.round(r, 5)) for r in flat}
    assert len(distinct) == B


@pytest.mark.parametrize('channels', [1, 3])
def test_all_off_is_the_exact_identity(channels):
    x = images(channels)
    np.testing.assert_array_equal(augment(jax.random.key(0), x, OFF), x)


def test_full_crop_is_close_to_identity():
    x = images(3)
    cfg = only(crop=True, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    np.testing.assert_allclose(augment(jax.random.key(0), x, cfg), x, atol=1e-5)


def test_crops_zoom_in():
    """A small crop of a smooth image has a smaller value range than the image."""
    ramp = jnp.broadcast_to(jnp.linspace(0, 1, W)[None, :, None], (B, H, W, 1))
    y = augment(jax.random.key(0), ramp, only(crop=True, crop_scale=(0.1, 0.2)))
    spread = np.asarray(y.max(axis=(1, 2, 3)) - y.min(axis=(1, 2, 3)))
    assert (spread < 0.75).all()


def test_flip_gives_the_image_or_its_mirror_and_both_occur():
    x = tiled(3)
    y = np.asarray(augment(jax.random.key(3), x, only(flip=True)))
    x0 = np.asarray(x[0])
    same = [np.array_equal(r, x0) for r in y]
    mirrored = [np.array_equal(r, x0[:, ::-1]) for r in y]
    assert all(s or m for s, m in zip(same, mirrored))
    assert any(same) and any(mirrored)


def test_grayscale_gives_equal_channels_of_luma():
    x = images(3)
    y = np.asarray(augment(jax.random.key(0), x, only(grayscale_prob=1.0)))
    np.testing.assert_array_equal(y[..., 0], y[..., 1])
    np.testing.assert_array_equal(y[..., 0], y[..., 2])
    luma = np.asarray(x) @ np.array([0.299, 0.587, 0.114], np.float32)
    np.testing.assert_allclose(y[..., 0], luma, atol=1e-6)


def test_grayscale_leaves_one_channel_images_alone():
    x = images(1)
    np.testing.assert_array_equal(augment(jax.random.key(0), x, only(grayscale_prob=1.0)), x)


def test_blur_keeps_constant_and_smooths_noise():
    cfg = only(blur_prob=1.0, blur_sigma=(14.0, 28.0))  # 1-2 px at 16 px: a 3-tap kernel
    const = jnp.full((B, H, W, 3), 0.3)
    np.testing.assert_allclose(augment(jax.random.key(0), const, cfg), const, atol=1e-6)
    noise = images(1)
    y = np.asarray(augment(jax.random.key(0), noise, cfg))
    var_in, var_out = np.asarray(noise).var(axis=(1, 2, 3)), y.var(axis=(1, 2, 3))
    assert (var_out < 0.8 * var_in).all()
    np.testing.assert_allclose(y.mean(axis=(1, 2, 3)), noise.mean(axis=(1, 2, 3)), atol=0.02)


def test_brightness_contrast_on_grayscale_change_values_within_range():
    x = 0.25 + 0.5 * images(1)  # in [0.25, 0.75]: room to move both ways
    cfg = only(color_jitter_prob=1.0, brightness=0.4, contrast=0.4)
    y = np.asarray(augment(jax.random.key(0), x, cfg))
    assert y.shape == x.shape and 0.0 <= y.min() and y.max() <= 1.0
    changed = np.abs(y - np.asarray(x)).max(axis=(1, 2, 3)) > 1e-3
    assert changed.all()
    # Every example gets its own factors: the per-example means are all different.
    assert len(set(np.round(y.mean(axis=(1, 2, 3)), 6))) == B


def test_saturation_and_hue_change_colours_but_not_grays():
    cfg = only(color_jitter_prob=1.0, saturation=0.4, hue=0.1)
    colour = images(3)
    y = np.asarray(augment(jax.random.key(0), colour, cfg))
    assert (np.abs(y - np.asarray(colour)).max(axis=(1, 2, 3)) > 1e-3).all()
    gray = jnp.broadcast_to(images(1), (B, H, W, 3))
    np.testing.assert_allclose(augment(jax.random.key(0), gray, cfg), gray, atol=1e-5)


def test_hsv_helpers_match_colorsys():
    rgb = np.asarray(jax.random.uniform(jax.random.key(0), (500, 3)))
    h, s, v = _rgb_to_hsv(jnp.asarray(rgb))
    ref = np.array([colorsys.rgb_to_hsv(*p) for p in rgb])
    # Hue is circular: compare on the circle.
    dh = np.abs((np.asarray(h) - ref[:, 0] + 0.5) % 1.0 - 0.5)
    assert dh.max() < 1e-5
    np.testing.assert_allclose(np.stack([s, v], -1), ref[:, 1:], atol=1e-6)
    shifted = np.asarray(_hsv_to_rgb((h + 0.3) % 1.0, s, v))
    ref_shifted = np.array([colorsys.hsv_to_rgb((a + 0.3) % 1.0, b, c) for a, b, c in ref])
    np.testing.assert_allclose(shifted, ref_shifted, atol=1e-5)


def test_from_config():
    c = ml_collections.ConfigDict(
        {'crop_scale': [0.2, 1.0], 'blur_sigma': (0.1, 1.0), 'flip': False, 'hue': 0.0}
    )
    cfg = AugmentConfig.from_config(c)
    assert cfg.crop_scale == (0.2, 1.0) and cfg.blur_sigma == (0.1, 1.0)
    assert not cfg.flip and cfg.hue == 0.0 and cfg.brightness == 0.4
    assert hash(cfg) == hash(AugmentConfig.from_config(c))
    assert AugmentConfig.from_config({}) == AugmentConfig()
    bad = ml_collections.ConfigDict({'flip': True, 'solarize': 0.2, 'crop_size': 3})
    with pytest.raises(ValueError, match='crop_size.*solarize'):
        AugmentConfig.from_config(bad)
    with pytest.raises(ValueError, match='crop_scale'):
        AugmentConfig(crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match='blur_prob'):
        AugmentConfig(blur_prob=1.5)


def test_rejects_bad_images():
    with pytest.raises(ValueError, match='C in'):
        augment(jax.random.key(0), jnp.zeros((2, 8, 8, 2)), AugmentConfig())
    with pytest.raises(ValueError, match='dtype'):
        augment(jax.random.key(0), jnp.zeros((2, 8, 8, 3), jnp.uint8), AugmentConfig())


_MESH_SCRIPT = textwrap.dedent(
    """
    import sys
    import jax, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from core.sharding import make_mesh
    from data.augment import AugmentConfig, two_views

    assert jax.device_count() == 2
    ref = np.load(sys.argv[1])
    meshes = {
        'auto': (make_mesh(data=2), P(('data', 'fsdp'))),  # the project's mesh
        'explicit': (jax.make_mesh((2,), ('data',), (AxisType.Explicit,)), P('data')),
    }
    for name, (mesh, spec) in meshes.items():
        batch = NamedSharding(mesh, spec)
        with jax.set_mesh(mesh):
            step = jax.jit(
                lambda rng, x: two_views(rng, x, AugmentConfig()), out_shardings=(batch, batch)
            )
            v1, v2 = step(jax.random.key(1), jax.device_put(ref['x'], batch))
        assert v1.sharding.is_equivalent_to(batch, 4), (name, v1.sharding)
        np.testing.assert_allclose(v1, ref['v1'], atol=1e-6, err_msg=name)
        np.testing.assert_allclose(v2, ref['v2'], atol=1e-6, err_msg=name)
    print('ok')
    """
)


def test_batch_sharded_on_a_mesh_matches_unsharded(tmp_path):
    """Inside an outer jit (traced rng, as in a train step) with the batch sharded over 2
    devices, on the project's Auto mesh and on an Explicit one: same values as unsharded."""
    x = images(3)
    v1, v2 = two_views(jax.random.key(1), x, AugmentConfig())  # compiled by the first test
    np.savez(tmp_path / 'ref.npz', x=x, v1=v1, v2=v2)
    env = dict(
        os.environ,
        JAX_PLATFORMS='cpu',
        PYTHONPATH=ROOT,
        XLA_FLAGS='--xla_force_host_platform_device_count=2',
    )
    r = subprocess.run(
        [sys.executable, '-c', _MESH_SCRIPT, str(tmp_path / 'ref.npz')],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0 and 'ok' in r.stdout, r.stderr[-3000:]


def test_colour_ops_run_in_a_random_order_per_example(monkeypatch):
    """With three stand-in ops (+1, *2, -3) on x = 1, the six orders give 1, -2, 0, 0, -2, -3:
    all four values appear, in about the 1:2:2:1 proportions of uniform permutations."""
    from data import augment as augment_lib

    ops = [lambda x: x + 1, lambda x: x * 2, lambda x: x - 3]
    monkeypatch.setattr(augment_lib, '_jitter_ops', lambda key, channels, cfg: ops)
    keys = jax.random.split(jax.random.key(0), 600)
    one = jnp.ones((1, 1, 1))
    out = jax.vmap(lambda k: augment_lib._color_jitter(k, one, AugmentConfig()))(keys)
    values, counts = np.unique(np.asarray(out).ravel(), return_counts=True)
    np.testing.assert_array_equal(values, [-3.0, -2.0, 0.0, 1.0])
    np.testing.assert_allclose(counts / 600, [1 / 6, 2 / 6, 2 / 6, 1 / 6], atol=0.07)
