"""Optimizer factory (core/optim.py): schedule, weight-decay mask, clipping, bad names."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from core.errors import ConfigError
from core.optim import decay_mask, make_optimizer


def optim_config(**overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(
        {
            'learning_rate': 1e-3,
            'warmup_steps': 10,
            'total_steps': 110,
            'optimizer': {
                'name': 'adamw',
                'b1': 0.9,
                'b2': 0.999,
                'eps': 1e-6,
                'weight_decay': 0.01,
                'grad_clip_norm': 1.0,
                'schedule': 'linear',
                'end_learning_rate': 0.0,
            },
        }
    )
    for key, value in overrides.items():
        target = c
        *parents, leaf = key.split('.')
        for p in parents:
            target = target[p]
        target[leaf] = value
    return c


def params():
    return {
        'dense': {'kernel': jnp.ones((4, 3)), 'bias': jnp.ones((3,))},
        'ln': {'scale': jnp.ones((4,)), 'bias': jnp.ones((4,))},
        'qkv': {'kernel': jnp.ones((4, 3, 2, 2))},
    }


@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
def test_schedule_warms_up_linearly_then_decays_to_the_end_value(schedule):
    config = optim_config(**{'optimizer.schedule': schedule, 'optimizer.end_learning_rate': 1e-5})
    _, lr = make_optimizer(config)
    assert float(lr(0)) == pytest.approx(0.0, abs=1e-12)
    for step in range(1, 11):
        assert float(lr(step)) == pytest.approx(1e-3 * step / 10, rel=1e-5)
    assert float(lr(110)) == pytest.approx(1e-5, rel=1e-4)
    assert float(lr(500)) == pytest.approx(1e-5, rel=1e-4)  # stays at the end value
    decay = [float(lr(s)) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))  # never rises after the peak
    middle = float(lr(60))  # halfway through the decay
    if schedule == 'linear':
        assert middle == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-4)
    else:
        assert middle == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5, rel=1e-4)
        # Cosine stays high longer than linear early in the decay.
        assert float(lr(35)) > 1e-5 + (1e-3 - 1e-5) * 0.75


def test_cosine_and_linear_differ_off_the_midpoint():
    _, linear = make_optimizer(optim_config())
    _, cosine = make_optimizer(optim_config(**{'optimizer.schedule': 'cosine'}))
    assert float(cosine(30)) > float(linear(30))
    assert float(cosine(90)) < float(linear(90))


def test_constant_schedule_and_no_warmup():
    _, lr = make_optimizer(optim_config(warmup_steps=0, **{'optimizer.schedule': 'constant'}))
    assert [float(lr(s)) for s in (0, 1, 50, 110)] == pytest.approx([1e-3] * 4)


def update(config, grads, state_steps: int = 0):
    tx, _ = make_optimizer(config)
    p = params()
    state = tx.init(p)
    for _ in range(state_steps):
        _, state = tx.update(jax.tree.map(jnp.zeros_like, p), state, p)
    updates, _ = tx.update(grads, state, p)
    return updates


def test_weight_decay_on_kernels_only():
    config = optim_config(warmup_steps=0, **{'optimizer.weight_decay': 0.1})
    zero = jax.tree.map(jnp.zeros_like, params())
    updates = update(config, zero)
    new = optax.apply_updates(params(), updates)
    # Biases and LayerNorm parameters are unchanged by a zero gradient ...
    for leaf in (new['dense']['bias'], new['ln']['scale'], new['ln']['bias']):
        np.testing.assert_array_equal(leaf, 1.0)
    # ... while kernels (of any rank) shrink by lr * weight_decay.
    for leaf in (new['dense']['kernel'], new['qkv']['kernel']):
        np.testing.assert_allclose(leaf, 1.0 - 1e-3 * 0.1, rtol=1e-6)


def test_decay_mask_counts_a_scanned_encoder_per_layer():
    """model.scan_layers stacks the layers: a [layers, hidden] bias is still a bias."""
    stacked = {'encoder': {'layers': {'bias': jnp.ones((2, 4)), 'kernel': jnp.ones((2, 4, 4))}}}
    mask = decay_mask({'backbone': stacked, 'head': {'kernel': jnp.ones((4, 3))}})
    assert mask == {
        'backbone': {'encoder': {'layers': {'bias': False, 'kernel': True}}},
        'head': {'kernel': True},
    }


def test_lamb_and_lars_refuse_scanned_layers():
    """Their trust ratio is per parameter array, and a scanned array holds every layer."""
    from configs import bert_mlm
    from core import config as config_lib

    for name in ('lamb', 'lars'):
        c = bert_mlm.get_config('tiny')
        c.optimizer.name = name
        c.model.scan_layers = True
        with pytest.raises(ConfigError, match='scan_layers=false'):
            config_lib.check_common(c)
        c.model.scan_layers = False
        config_lib.check_common(c)


def test_no_weight_decay_when_zero():
    config = optim_config(warmup_steps=0, **{'optimizer.weight_decay': 0.0})
    updates = update(config, jax.tree.map(jnp.zeros_like, params()))
    for leaf in jax.tree.leaves(updates):
        np.testing.assert_array_equal(leaf, 0.0)


def test_lamb_is_available_with_the_same_decay_mask():
    config = optim_config(warmup_steps=0, **{'optimizer.name': 'lamb'})
    updates = update(config, jax.tree.map(jnp.zeros_like, params()))
    assert float(jnp.abs(updates['dense']['kernel']).max()) > 0
    np.testing.assert_array_equal(updates['dense']['bias'], 0.0)
    np.testing.assert_array_equal(updates['ln']['scale'], 0.0)


def scaled_gradient(norm: float):
    """A gradient of the given global norm, the same direction every time."""
    g = jax.tree.map(lambda p: jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape) + 1, params())
    total = optax.tree.norm(g)
    return jax.tree.map(lambda x: x * norm / total, g)


def test_gradient_clipping_bounds_the_update():
    # A large eps keeps Adam's update roughly proportional to the gradient, so its size
    # shows whether the gradient was clipped.
    clipped = optim_config(warmup_steps=0, **{'optimizer.eps': 1e3, 'optimizer.weight_decay': 0.0})
    unit = optax.tree.norm(update(clipped, scaled_gradient(1.0)))
    huge = optax.tree.norm(update(clipped, scaled_gradient(1e4)))
    assert float(huge) <= float(unit) * (1 + 1e-5)
    assert float(unit) > 0
    # Without clipping the same huge gradient gives a much larger update.
    unclipped = optim_config(
        warmup_steps=0,
        **{'optimizer.eps': 1e3, 'optimizer.weight_decay': 0.0, 'optimizer.grad_clip_norm': 0.0},
    )
    assert float(optax.tree.norm(update(unclipped, scaled_gradient(1e4)))) > 100 * float(unit)


def test_gradients_below_the_clip_norm_are_untouched():
    config = optim_config(
        warmup_steps=0,
        **{'optimizer.eps': 1e3, 'optimizer.weight_decay': 0.0, 'optimizer.grad_clip_norm': 10.0},
    )
    small = optax.tree.norm(update(config, scaled_gradient(0.5)))
    unit = optax.tree.norm(update(config, scaled_gradient(1.0)))
    assert float(unit) == pytest.approx(2 * float(small), rel=1e-3)


def test_unknown_optimizer_name_raises():
    with pytest.raises(ValueError, match='sgd'):
        make_optimizer(optim_config(**{'optimizer.name': 'sgd'}))


def test_unknown_schedule_raises():
    with pytest.raises(ValueError, match='exponential'):
        make_optimizer(optim_config(**{'optimizer.schedule': 'exponential'}))


# Weight decay by role over the parameter trees of every model the project builds.


def _text_batch(seq_len: int) -> dict:
    ids = jnp.zeros((1, seq_len), jnp.int32)
    return {'input_ids': ids, 'input_mask': jnp.ones_like(ids)}


def _image(config):
    m = config.model
    return jnp.zeros((1, m.image_size, m.image_size, m.channels), jnp.float32)


def _project_model(name: str, scan: bool):
    """(model, example input) as the stage builders make them, at the tiny presets."""
    from configs import bert_mlm, clip, image_cls, simcse, text_cls, token_cls, vit_simclr
    from finetune import text_cls as text_cls_task
    from models.bert import BertConfig
    from models.classifier import ImageClassifier, TokenClassifier
    from models.contrastive import SimClrModel
    from models.vit import VitConfig
    from pretrain import clip as clip_task
    from pretrain import mlm
    from pretrain import simcse as simcse_task

    if name in ('bert_mlm', 'bert_mlm_pooler'):
        c = bert_mlm.get_config('tiny')
        c.model.pooler = name == 'bert_mlm_pooler'
        c.model.scan_layers = scan
        return mlm.make_model(c), mlm.dummy_batch(c)
    if name in ('text_cls', 'text_regression'):
        c = text_cls.get_config('tiny')
        c.model.scan_layers = scan
        classes = 1 if name == 'text_regression' else 3
        return text_cls_task.make_model(c, classes), _text_batch(c.data.seq_len)
    if name == 'token_cls':
        c = token_cls.get_config('tiny')
        c.model.scan_layers = scan
        model = TokenClassifier(BertConfig.from_config(c.model), 5, c.model.head_dropout)
        return model, _text_batch(c.data.seq_len)
    if name == 'simcse':
        c = simcse.get_config('tiny')
        c.model.scan_layers = scan
        return simcse_task.make_model(c), _text_batch(c.data.seq_len)
    if name in ('simclr', 'simclr_gap'):
        c = vit_simclr.get_config('tiny')
        c.model.scan_layers = scan
        if name == 'simclr_gap':
            c.model.pooling = 'gap'
        m = c.model
        model = SimClrModel(
            VitConfig.from_config(c.model), m.proj_hidden, m.proj_dim, m.proj_layers
        )
        return model, _image(c)
    if name in ('image_cls', 'image_cls_pooler'):
        c = image_cls.get_config('tiny')
        c.model.scan_layers = scan
        c.model.pooler = name == 'image_cls_pooler'
        return ImageClassifier(VitConfig.from_config(c.model), 10), _image(c)
    if name == 'clip':
        c = clip.get_config('tiny')
        c.model.scan_layers = c.model.text.scan_layers = scan
        batch = {'image': _image(c), **_text_batch(c.data.seq_len)}
        return clip_task.make_model(c), batch
    raise ValueError(name)


PROJECT_MODELS = (
    'bert_mlm',
    'bert_mlm_pooler',
    'text_cls',
    'text_regression',
    'token_cls',
    'simcse',
    'simclr',
    'simclr_gap',
    'image_cls',
    'image_cls_pooler',
    'clip',
)


def _params_and_owners(model, example):
    """The model's parameter shapes (unboxed) and, for each module path, its class name:
    a parameter's role is read from the module that created it, not from its name."""
    from flax import linen as nn

    owners = {}

    def record(next_fun, args, kwargs, context):
        owners['/'.join(context.module.path)] = type(context.module).__name__
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        variables = jax.eval_shape(lambda r: model.init(r, example), jax.random.key(0))
    return nn.meta.unbox(variables['params']), owners


def _expected_decay(path: str, owner: str) -> bool:
    """What BERT's recipe (and big_vision / timm for a ViT) decays, by the creating module."""
    leaf = path.rsplit('/', 1)[-1]
    if owner == 'LayerNorm' or leaf == 'bias' or leaf.endswith('_bias'):
        return False  # every bias (Dense, attention, patch embedding, MLM output, SigLIP)
    if (owner, leaf) in {('Dense', 'kernel'), ('Projection', 'kernel'), ('PatchEmbed', 'kernel')}:
        return True  # every linear map: attention qkv/out, MLP, pooler, heads, projections
    if (owner, leaf) in {('Embed', 'embedding'), ('TextEmbed', 'position')}:
        return True  # BERT decays its token, segment and position tables
    if (owner, leaf) in {('VisionEncoder', 'cls'), ('VisionEncoder', 'pos_embedding')}:
        return False  # ViT's cls token and position table: not decayed (timm, big_vision)
    if (owner, leaf) == ('TwoTower', 'logit_scale'):
        return False  # a temperature, not a weight
    raise AssertionError(f'{path} (created by {owner}): no decided weight-decay role')


@pytest.mark.parametrize('scan', [False, True], ids=['unscanned', 'scan_layers'])
@pytest.mark.parametrize('name', PROJECT_MODELS)
def test_weight_decay_follows_the_parameter_role_in_every_model(name, scan):
    """No bias or LayerNorm parameter is decayed (the fused QKV bias is [3, heads, kv] per
    layer), every kernel is, in both layer layouts."""
    params, owners = _params_and_owners(*_project_model(name, scan))
    flat = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    mask = dict(jax.tree_util.tree_flatten_with_path(decay_mask(params))[0])
    paths = {'/'.join(k.key for k in keys): keys for keys in flat}
    if scan:
        assert any('/encoder/layers/' in p for p in paths), 'the model did not scan its layers'
    wrong = []
    for path, keys in paths.items():
        owner = owners[path.rpartition('/')[0]]
        if bool(mask[keys]) != _expected_decay(path, owner):
            wrong.append(f'{path} {flat[keys].shape}: decayed={bool(mask[keys])}')
    assert not wrong, '\n'.join(wrong)


def test_decay_mask_reads_flax_boxed_parameters():
    """The optimizer is initialised on params still boxed with their logical axis names."""
    from flax import linen as nn

    model, example = _project_model('bert_mlm', scan=True)
    boxed = jax.eval_shape(lambda r: model.init(r, example), jax.random.key(0))['params']
    unboxed = decay_mask(nn.meta.unbox(boxed))
    assert nn.meta.unbox(decay_mask(boxed)) == unboxed


@pytest.mark.parametrize('name', ['adamw', 'lamb', 'lars'])
def test_no_decay_nor_trust_ratio_on_biases_of_a_real_model(name):
    """One update of BERT-tiny from a gradient of ones: biases and LayerNorm parameters move
    exactly as the optimizer moves an undecayed, unscaled parameter; kernels get the decay."""
    from flax import linen as nn

    model, example = _project_model('bert_mlm', scan=False)
    params = nn.meta.unbox(model.init(jax.random.key(0), example)['params'])
    # Parameters far from zero: the trust ratio ||p|| / ||u|| is far from 1.
    params = jax.tree.map(lambda p: jnp.full_like(p, 3.0), params)
    grads = jax.tree.map(jnp.ones_like, params)
    config = optim_config(
        warmup_steps=0,
        **{'optimizer.name': name, 'optimizer.weight_decay': 0.1, 'optimizer.grad_clip_norm': 0},
    )
    tx, _ = make_optimizer(config)
    updates, _ = tx.update(grads, tx.init(params), params)
    # The plain update: Adam's first step is +-1 per element; momentum SGD's is the gradient.
    plain = 1e-3 * (1.0 if name == 'lars' else 1.0 / (1.0 + 1e-6))
    layer = updates['backbone']['encoder']['layer_0']
    for leaf in (
        layer['attention']['qkv']['bias'],  # [3, heads, head_dim]
        layer['attention']['out']['bias'],
        layer['ln_attention']['scale'],
        layer['mlp']['wi']['bias'],
        updates['backbone']['embeddings']['ln']['bias'],
        updates['output_bias'],
    ):
        np.testing.assert_allclose(leaf, -plain, rtol=1e-5)
    kernel = layer['attention']['qkv']['kernel']
    assert not np.allclose(kernel, -plain, rtol=1e-3)  # decayed (and trust-ratio scaled)
