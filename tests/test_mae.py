"""Masked image modelling (pretrain/mae.py, models/mae.py): the masking, the visible-only
encoder, the loss against NumPy, and runs through `launch.py` whose backbones fine-tune."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from core import checkpoint
from models import mae as mae_lib
from models.encoder import Encoder
from models.vit import PatchEmbed, VisionEncoder, VitConfig
from tests.conftest import check_evals_timed, launch
from tests.contract import check_workdir
from tests.test_determinism import assert_same_run
from tests.test_topology import STEPS

VIT = VitConfig(
    image_size=16, patch_size=4, channels=1, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64
)
TINY = [
    '--config.model.hidden_size=32',
    '--config.model.num_layers=1',
    '--config.model.num_heads=2',
    '--config.model.mlp_dim=64',
    '--config.decoder.hidden_size=16',
    '--config.decoder.num_layers=1',
    '--config.decoder.num_heads=2',
    '--config.decoder.mlp_dim=32',
    '--config.batch_size=32',
    '--config.eval_steps=1',
    '--config.eval.probe_train_examples=200',
]
MAE = ['pretrain', '--config', 'configs/vit_mae.py:tiny', *TINY]


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def metric_rows(workdir: str, split: str) -> list[dict]:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        return [r for r in map(json.loads, f) if r['split'] == split]


# --- masking ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    'patches, ratio, kept',
    [(16, 0.75, 4), (16, 0.5, 8), (196, 0.75, 49), (4, 0.99, 1), (4, 0.01, 3)],
)
def test_each_image_keeps_the_unmasked_fraction_of_its_patches(patches, ratio, kept):
    assert mae_lib.num_kept(patches, ratio) == kept
    keep, restore = mae_lib.random_masking(jax.random.key(0), jnp.arange(8), patches, ratio)
    assert keep.shape == (8, kept) and restore.shape == (8, patches)
    for k, r in zip(np.asarray(keep), np.asarray(restore)):
        assert len(set(k.tolist())) == kept  # distinct patches
        # restore puts [kept; masked] back in patch order: the kept ones are places < kept.
        assert sorted(np.flatnonzero(r < kept).tolist()) == sorted(k.tolist())
        assert sorted(r.tolist()) == list(range(patches))


@pytest.mark.parametrize('ratio', [0.0, 1.0, -0.1, 1.5])
def test_a_mask_ratio_outside_zero_one_is_refused(ratio):
    with pytest.raises(ValueError, match='mask_ratio'):
        mae_lib.num_kept(16, ratio)


def test_masks_are_drawn_per_example_from_its_row():
    """Each image its own mask, depending only on the key and its row in the global batch:
    a device holding rows 5 and 9 draws what the whole batch draws for them."""
    key = jax.random.key(3)
    keep, _ = mae_lib.random_masking(key, jnp.arange(16), 16, 0.75)
    sets = {tuple(sorted(k)) for k in np.asarray(keep).tolist()}
    assert len(sets) > 12  # 1820 subsets of 4: equal ones are rare
    part, _ = mae_lib.random_masking(key, jnp.array([5, 9]), 16, 0.75)
    np.testing.assert_array_equal(np.asarray(part), np.asarray(keep)[[5, 9]])
    other, _ = mae_lib.random_masking(jax.random.key(4), jnp.arange(16), 16, 0.75)
    assert not np.array_equal(np.asarray(other), np.asarray(keep))
    # Over many images every patch is hidden about mask_ratio of the time.
    many, _ = mae_lib.random_masking(key, jnp.arange(4000), 16, 0.75)
    shown = np.bincount(np.asarray(many).ravel(), minlength=16) / 4000
    np.testing.assert_allclose(shown, 0.25, atol=0.03)


# --- the visible-only encoder -------------------------------------------------------------


def _encoder_and_images(pooling: str = 'cls'):
    vit = VitConfig(**{**VIT.__dict__, 'pooling': pooling})
    encoder = VisionEncoder(vit)
    images = jax.random.uniform(jax.random.key(1), (3, 16, 16, 1))
    return encoder, nn.unbox(encoder.init(jax.random.key(2), images)['params']), images


@pytest.mark.parametrize('pooling', ['cls', 'gap'])
def test_the_visible_only_encoder_is_a_full_pass_over_the_kept_patches(pooling):
    """keep=...: the encoder's output equals the Transformer run by hand on the sequence of
    the kept patches only (each with its own position, the cls token first)."""
    encoder, params, images = _encoder_and_images(pooling)
    keep, _ = mae_lib.random_masking(jax.random.key(0), jnp.arange(3), 16, 0.75)
    got = encoder.apply({'params': params}, images, keep=keep)
    has_cls = pooling == 'cls'
    assert got.shape == (3, int(has_cls) + 4, 32)

    patches = PatchEmbed(4, 32).apply({'params': params['patch_embed']}, images * 2.0 - 1.0)
    pos = params['pos_embedding']
    kept = jnp.stack([patches[b, keep[b]] + pos[int(has_cls) + keep[b]] for b in range(3)])
    if has_cls:
        cls = jnp.broadcast_to(params['cls'] + pos[0], (3, 1, 32))
        kept = jnp.concatenate([cls, kept], axis=1)
    by_hand = Encoder.of(VIT, layer_norm='pre').apply({'params': params['encoder']}, kept)
    np.testing.assert_allclose(np.asarray(got), np.asarray(by_hand), rtol=1e-5, atol=1e-5)


def test_keeping_every_patch_in_order_is_the_ordinary_pass():
    encoder, params, images = _encoder_and_images()
    full = encoder.apply({'params': params}, images)
    every = encoder.apply({'params': params}, images, keep=jnp.tile(jnp.arange(16), (3, 1)))
    np.testing.assert_allclose(np.asarray(every), np.asarray(full), rtol=1e-6, atol=1e-6)


# --- the loss -----------------------------------------------------------------------------


def numpy_loss(pred, images, restore, kept, p, norm):
    b, h, w, c = images.shape
    target = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    target = target.reshape(b, -1, p * p * c).astype(np.float64)
    if norm:
        mean = target.mean(-1, keepdims=True)
        target = (target - mean) / np.sqrt(target.var(-1, keepdims=True) + 1e-6)
    masked = restore >= kept
    errors = ((pred - target) ** 2).mean(-1)
    return errors[masked].sum(), masked.sum()


@pytest.mark.parametrize('norm', [True, False])
def test_the_loss_is_the_masked_patches_pixel_error_as_numpy_computes_it(norm):
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(4, 16, 16, 1)).astype(np.float32)
    pred = rng.normal(size=(4, 16, 16)).astype(np.float32)
    _, restore = mae_lib.random_masking(jax.random.key(0), jnp.arange(4), 16, 0.75)
    loss, count = mae_lib.reconstruction_loss(pred, images, restore, 4, 4, norm)
    want, want_count = numpy_loss(pred, images, np.asarray(restore), 4, 4, norm)
    assert float(count) == want_count == 4 * 12
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_visible_patches_carry_no_gradient():
    images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 1))
    pred = jax.random.normal(jax.random.key(1), (2, 16, 16))
    _, restore = mae_lib.random_masking(jax.random.key(2), jnp.arange(2), 16, 0.75)
    grad = jax.grad(lambda p: mae_lib.reconstruction_loss(p, images, restore, 4, 4, True)[0])(pred)
    per_patch = np.abs(np.asarray(grad)).sum(-1)
    visible = np.asarray(restore) < 4
    assert np.all(per_patch[visible] == 0) and np.all(per_patch[~visible] > 0)


def test_the_decoder_predicts_every_patch_and_the_encoder_sees_only_the_kept_ones():
    model = mae_lib.MaeModel(VIT, mae_lib.DecoderConfig(16, 1, 2, 32))
    images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 1))
    keep, restore = mae_lib.random_masking(jax.random.key(1), jnp.arange(2), 16, 0.75)
    params = model.init(jax.random.key(2), images, keep, restore)['params']
    assert set(params) == {'backbone', 'decoder'}
    pred = model.apply({'params': params}, images, keep, restore)
    assert pred.shape == (2, 16, 16)
    # A hidden patch's pixels cannot reach the prediction: changing one changes nothing.
    masked = int(np.flatnonzero(np.asarray(restore[0]) >= 4)[0])
    y, x = divmod(masked, 4)
    changed = images.at[0, 4 * y : 4 * y + 4, 4 * x : 4 * x + 4].set(0.5)
    again = model.apply({'params': params}, changed, keep, restore)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(pred))


# --- runs ---------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def mae_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp('mae') / 'run')
    r = launch(
        *MAE,
        '--workdir',
        workdir,
        '--config.total_steps=4',
        '--config.eval_every=2',
        '--config.checkpoint_every=2',
        '--config.log_every=1',
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return workdir, r


def test_mae_run_meets_the_contract_and_evaluates_with_probes(mae_run):
    workdir, r = mae_run
    check_workdir(workdir, 'linear_probe_accuracy')
    evals = metric_rows(workdir, 'eval')
    assert [e['step'] for e in evals] == [0, 2, 4]
    for row in evals:
        for key in ('reconstruction_loss', 'knn_accuracy', 'linear_probe_accuracy'):
            assert key in row, (row['step'], key)
        # Normalised pixels have variance 1 per patch: an untrained decoder's error is ~1.
        assert 0.2 < row['reconstruction_loss'] < 5.0, row
    assert evals[0]['linear_probe_accuracy'] > 0.2  # 10 classes
    summary = read_json(os.path.join(workdir, 'summary.json'))
    assert summary['task'] == 'mae' and summary['completed'] and summary['steps'] == 4
    check_evals_timed(workdir, r.stderr, [0, 2, 4])


def test_mae_backbone_fine_tunes_as_image_cls(mae_run, tmp_path):
    """The encoder is restored into image_cls as a SimCLR one is; the decoder is not."""
    workdir, _ = mae_run
    encoder = VisionEncoder(VitConfig(**{**VIT.__dict__, 'num_layers': 1}))
    target = jax.eval_shape(
        lambda: nn.unbox(encoder.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))['params'])
    )
    backbone, step = checkpoint.restore_params(workdir, target, subtree=('backbone',))
    assert step == 4
    finetune = str(tmp_path / 'finetune')
    r = launch(
        'finetune',
        '--config',
        'configs/image_cls.py:tiny',
        '--workdir',
        finetune,
        f'--config.init_from={workdir}',
        '--config.total_steps=2',
        '--config.eval_every=2',
        '--config.checkpoint_every=2',
        '--config.batch_size=32',
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f'initialised backbone from {workdir} (params/backbone, step 4)' in r.stderr
    assert 'model.num_layers: 4 -> 1' in r.stderr  # the MAE run's encoder, adopted
    summary = read_json(os.path.join(finetune, 'summary.json'))
    assert summary['completed'] and 'test_accuracy' in summary


@pytest.mark.slow  # three MAE runs
def test_mae_with_dropout_is_the_same_on_pmap_jit_and_one_device(tmp_path):
    """Masks, augmentations and dropout are drawn per example from its global row."""

    def run(name: str, devices: int, *extra: str) -> str:
        workdir = str(tmp_path / name)
        r = launch(
            *MAE,
            '--workdir',
            workdir,
            '--config.model.dropout_rate=0.1',
            f'--config.total_steps={STEPS}',
            f'--config.checkpoint_every={STEPS}',
            f'--config.eval_every={STEPS}',
            '--config.log_every=1',
            *extra,
            env={'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'},
        )
        assert r.returncode == 0, r.stderr[-3000:]
        return workdir

    one = run('one', 1)
    for workdir in (
        run('pmap', 8, '--config.parallelism=pmap'),
        run('fsdp', 8, '--config.mesh.data=2', '--config.mesh.fsdp=4'),
    ):
        assert_same_run(workdir, one)


@pytest.mark.parametrize(
    'flag, message',
    [
        ('--config.mae.mask_ratio=1.0', 'mae.mask_ratio=1.0; expected a fraction in (0, 1)'),
        ('--config.decoder.num_heads=3', 'decoder.hidden_size 16 is not a multiple of'),
        ('--config.model.patch_size=16', 'a 1-patch image has nothing to mask'),
    ],
)
def test_bad_mae_settings_are_clear_errors(tmp_path, flag, message):
    r = launch(*MAE, '--workdir', str(tmp_path / 'bad'), flag)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr[-2000:]
    assert 'Traceback' not in r.stderr
