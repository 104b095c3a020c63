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


def test_weight_decay_on_matrices_only():
    config = optim_config(warmup_steps=0, **{'optimizer.weight_decay': 0.1})
    zero = jax.tree.map(jnp.zeros_like, params())
    updates = update(config, zero)
    new = optax.apply_updates(params(), updates)
    # 1-D parameters (biases, LayerNorm) are unchanged by a zero gradient ...
    for leaf in (new['dense']['bias'], new['ln']['scale'], new['ln']['bias']):
        np.testing.assert_array_equal(leaf, 1.0)
    # ... while matrices (of any rank > 1) shrink by lr * weight_decay.
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
