"""Contrastive losses (pretrain/contrastive.py): against direct NumPy references, over the
global batch on 8 fake devices (equal to one device), and the sigmoid loss's per-device
memory at 1-8 devices; the CLIP/SigLIP temperature and bias clamps."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.bert import BertConfig
from models.contrastive import TwoTower
from models.vit import VitConfig
from pretrain import contrastive
from tests.conftest import ROOT


def unit_rows(rng, n, dim):
    x = rng.normal(size=(n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def nt_xent_reference(z1, z2, temperature):
    """SimCLR's loss written out: 2N views, each against the 2N - 1 others."""
    z = np.concatenate([z1, z2])
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        logits = [z[i] @ z[j] / temperature for j in range(2 * n) if j != i]
        others = [j for j in range(2 * n) if j != i]
        total += -(logits[others.index(partner)] - math.log(sum(math.exp(v) for v in logits)))
    return total / (2 * n)


def clip_reference(img, txt, scale):
    logits = scale * img @ txt.T
    labels = np.arange(len(img))
    i2t = -log_softmax(logits)[labels, labels].mean()
    t2i = -log_softmax(logits.T)[labels, labels].mean()
    return 0.5 * (i2t + t2i)


def sigmoid_reference(img, txt, scale, bias):
    logits = scale * img @ txt.T + bias
    labels = 2 * np.eye(len(img)) - 1
    return np.sum(np.log1p(np.exp(-labels * logits))) / len(img)


def test_nt_xent_matches_numpy_reference():
    rng = np.random.default_rng(0)
    z1, z2 = unit_rows(rng, 6, 5), unit_rows(rng, 6, 5)
    sums = contrastive.nt_xent(jnp.asarray(z1), jnp.asarray(z2), 0.3)
    assert float(sums['count']) == 12
    np.testing.assert_allclose(
        float(sums['loss'] / sums['count']), nt_xent_reference(z1, z2, 0.3), rtol=1e-5
    )


def test_nt_xent_accuracy_counts_views_that_find_their_partner():
    z = np.eye(4, dtype=np.float32)
    sums = contrastive.nt_xent(jnp.asarray(z), jnp.asarray(z), 0.1)  # identical views
    assert float(sums['accuracy']) == 8.0
    sums = contrastive.nt_xent(jnp.asarray(z), jnp.asarray(z[::-1].copy()), 0.1)
    assert float(sums['accuracy']) == 0.0  # partners are orthogonal, others closer


def test_clip_softmax_matches_numpy_reference():
    rng = np.random.default_rng(1)
    img, txt = unit_rows(rng, 7, 4), unit_rows(rng, 7, 4)
    sums = contrastive.clip_softmax(jnp.asarray(img), jnp.asarray(txt), jnp.float32(14.3))
    np.testing.assert_allclose(
        float(sums['loss'] / sums['count']), clip_reference(img, txt, 14.3), rtol=1e-5
    )


def test_sigmoid_loss_and_its_custom_gradient_match_numpy_and_autodiff():
    rng = np.random.default_rng(2)
    img, txt = unit_rows(rng, 5, 3).astype(np.float32), unit_rows(rng, 5, 3).astype(np.float32)
    sums = contrastive.sigmoid_loss(jnp.asarray(img), jnp.asarray(txt), 10.0, -10.0)
    np.testing.assert_allclose(
        float(sums['loss'] / sums['count']), sigmoid_reference(img, txt, 10.0, -10.0), rtol=1e-5
    )

    # The hand-written backward pass against autodiff of the plain formula.
    def plain(a, b, s, t):
        logits = s * a @ b.T + t
        labels = 2 * jnp.eye(a.shape[0]) - 1
        return -jnp.sum(jax.nn.log_sigmoid(labels * logits))

    args = (jnp.asarray(img), jnp.asarray(txt), jnp.float32(3.0), jnp.float32(-2.0))
    ours = jax.grad(lambda *x: contrastive.sigmoid_loss(*x)['loss'], argnums=(0, 1, 2, 3))(*args)
    ref = jax.grad(plain, argnums=(0, 1, 2, 3))(*args)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def run_8_devices(mode: str) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'tests', 'contrastive_run.py'), mode],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_global_batch_loss_on_8_devices_equals_one_device():
    """Negatives come from every device: on meshes of 8 (shard_map) and under pmap, the
    loss and its gradients equal the single-device loss on the same global batch."""
    results = run_8_devices('equivalence')
    assert len(results) == 3 * 4
    for name, r in results.items():
        assert r['loss'] < 1e-5 * max(1.0, r['ref_loss']), (name, r)
        assert r['grad'] < 1e-5, (name, r)


def test_sigmoid_loss_memory_does_not_grow_with_devices():
    """At a fixed per-device batch the ring keeps one [n, n] block per device, however
    many devices; the all-gathered softmax grows with the global batch."""
    memory = run_8_devices('memory')
    ring = {int(k): v for k, v in memory['sigmoid'].items()}
    gathered = {int(k): v for k, v in memory['clip_softmax'].items()}
    assert ring[8] <= ring[4] <= 2 * ring[1], ring
    assert gathered[8] >= 6 * gathered[1], gathered
    assert ring[8] * 4 < gathered[8], (ring, gathered)


@pytest.fixture(scope='module')
def two_tower():
    vit = VitConfig(
        image_size=8,
        patch_size=4,
        channels=1,
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        mlp_dim=32,
    )
    text = BertConfig(
        vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32, max_len=8
    )
    model = TwoTower(vit, text, embed_dim=8, max_logit_scale=100.0, max_abs_logit_bias=30.0)
    batch = {
        'image': jnp.zeros((2, 8, 8, 1)),
        'input_ids': jnp.ones((2, 8), jnp.int32),
        'input_mask': jnp.ones((2, 8), jnp.int32),
    }
    params = jax.tree.map(
        lambda x: x.value if hasattr(x, 'value') else x,
        model.init(jax.random.key(0), batch)['params'],
        is_leaf=lambda x: hasattr(x, 'value'),
    )
    return model, params


def test_temperature_starts_at_clip_init(two_tower):
    model, params = two_tower
    scale, bias = model.apply({'params': params}, method='temperature')
    np.testing.assert_allclose(float(scale), 1 / 0.07, rtol=1e-5)
    assert float(bias) == 0.0


@pytest.mark.parametrize(
    'logit_scale, logit_bias, scale, bias, scale_grad, bias_grad',
    [
        (math.log(50.0), -5.0, 50.0, -5.0, True, True),  # inside: both learn
        (math.log(1e4), -80.0, 100.0, -30.0, False, False),  # past: clamped, no gradient
        (math.log(2.0), 45.0, 2.0, 30.0, True, False),
    ],
)
def test_temperature_and_bias_clamps(
    two_tower, logit_scale, logit_bias, scale, bias, scale_grad, bias_grad
):
    model, params = two_tower
    params = dict(params, logit_scale=jnp.float32(logit_scale), logit_bias=jnp.float32(logit_bias))
    got_scale, got_bias = model.apply({'params': params}, method='temperature')
    np.testing.assert_allclose([float(got_scale), float(got_bias)], [scale, bias], rtol=1e-5)
    grads = jax.grad(lambda p: sum(model.apply({'params': p}, method='temperature')))(params)
    assert (float(grads['logit_scale']) != 0.0) == scale_grad
    assert (float(grads['logit_bias']) != 0.0) == bias_grad
