"""The ViT (models/vit.py) and the contrastive model wrappers (models/contrastive.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from models.contrastive import SimClrModel
from models.encoder import stack_layers, unstack_layers
from models.vit import PatchEmbed, VisionEncoder, VitConfig, interpolate_pos_embedding, pool

CFG = VitConfig(
    image_size=16,
    patch_size=4,
    channels=3,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    mlp_dim=64,
)


def images(n=2, cfg=CFG, seed=0):
    shape = (n, cfg.image_size, cfg.image_size, cfg.channels)
    return jax.random.uniform(jax.random.key(seed), shape)


def test_patch_embed_is_a_stride_p_convolution():
    x = images()
    module = PatchEmbed(4, 32)
    params = nn.meta.unbox(module.init(jax.random.key(0), x))
    ours = module.apply(params, x)  # [2, 16, 32]
    conv = (
        jax.lax.conv_general_dilated(
            x,
            params['params']['kernel'],
            (4, 4),
            'VALID',
            dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        )
        + params['params']['bias']
    )
    np.testing.assert_allclose(ours, conv.reshape(2, 16, 32), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('pooling, tokens', [('cls', 17), ('gap', 16)])
def test_encoder_output_shape_and_pooling(pooling, tokens):
    cfg = VitConfig(**{**CFG.__dict__, 'pooling': pooling})
    model = VisionEncoder(cfg)
    variables = model.init(jax.random.key(0), images(cfg=cfg))
    out = model.apply(variables, images(cfg=cfg))
    assert out.shape == (2, tokens, 32) == (2, cfg.num_tokens, 32)
    assert pool(out, pooling).shape == (2, 32)


def test_every_vit_parameter_has_logical_axis_names():
    variables = SimClrModel(CFG, 64, 16).init(jax.random.key(0), images())
    leaves = jax.tree.leaves(variables['params'], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim


def test_wrong_image_shape_is_a_clear_error():
    model = VisionEncoder(CFG)
    with pytest.raises(ValueError, match='image_size 16 and 3 channels'):
        model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_simclr_features_are_the_backbone_without_the_projection():
    model = SimClrModel(CFG, 64, 16)
    variables = nn.meta.unbox(model.init(jax.random.key(0), images()))
    feats = model.apply(variables, images(), method='features')
    assert feats.shape == (2, 32)
    tokens = VisionEncoder(CFG).apply({'params': variables['params']['backbone']}, images())
    np.testing.assert_allclose(feats, tokens[:, 0], rtol=1e-6)
    assert model.apply(variables, images()).shape == (2, 16)


def test_scanned_vit_matches_unscanned_outputs_and_gradients():
    """Pre-LN (the ViT's layout, with the final LayerNorm): model.scan_layers computes the
    same function of the same (stacked) params."""
    x = images()
    model = VisionEncoder(CFG)
    scanned = VisionEncoder(dataclasses.replace(CFG, scan_layers=True))
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), x)['params'])
    stacked = stack_layers(params)

    w = jax.random.normal(jax.random.key(1), (2, CFG.num_tokens, CFG.hidden_size))

    def loss_and_grads(m, p):
        return jax.jit(jax.value_and_grad(lambda p: (m.apply({'params': p}, x) * w).sum()))(p)

    loss, g_plain = loss_and_grads(model, params)
    loss_scanned, g_scanned = loss_and_grads(scanned, stacked)
    np.testing.assert_allclose(loss_scanned, loss, rtol=1e-5)
    g_scanned = unstack_layers(g_scanned)
    assert jax.tree.structure(g_scanned) == jax.tree.structure(g_plain)
    for a, b in zip(jax.tree.leaves(g_scanned), jax.tree.leaves(g_plain)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_pos_embedding_interpolation_keeps_cls_and_a_smooth_grid():
    old = 4
    rng = np.random.default_rng(0)
    cls = rng.normal(size=(1, 8)).astype(np.float32)
    # A grid that is linear in (row, col): bicubic resizing must keep it close to linear.
    rows, cols = np.meshgrid(np.arange(old), np.arange(old), indexing='ij')
    grid = np.stack([rows, cols] * 4, axis=-1).reshape(old * old, 8).astype(np.float32)
    pos = np.concatenate([cls, grid])
    out = interpolate_pos_embedding(pos, old, 8, has_cls=True)
    assert out.shape == (1 + 64, 8)
    np.testing.assert_array_equal(out[0], cls[0])
    new = out[1:].reshape(8, 8, 8)
    assert np.all(np.diff(new[:, 0, 0]) > 0) and np.all(np.diff(new[0, :, 1]) > 0)
    np.testing.assert_allclose(new[0, 0, 0], 0.0, atol=0.3)
    np.testing.assert_allclose(new[-1, -1, 0], old - 1, atol=0.3)
    same = interpolate_pos_embedding(pos, old, old, has_cls=True)
    np.testing.assert_allclose(same, pos, atol=1e-5)
    with pytest.raises(ValueError, match='does not match a 5x5 grid'):
        interpolate_pos_embedding(pos, 5, 8, has_cls=True)
