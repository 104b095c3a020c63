"""A NaN/Inf loss or gradient norm: by default the run stops with the step and the last
good checkpoint intact; with skip_nonfinite_steps=N the update is skipped (params and
optimizer state unchanged) and the run stops only after more than N such steps in a row."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from core import checkpoint as ckpt_lib
from core import loop
from core.step import train_step
from core.train_state import TrainState
from tests.conftest import SMALL_RUN, launch


def loss_fn(params, batch, rng, train, rows=None):
    del rng, train, rows
    error = batch['x'] @ params['w'] - batch['y']
    return jnp.sum(error**2), {'denominator': jnp.float32(batch['x'].shape[0])}


def test_a_nonfinite_step_leaves_params_and_optimizer_state_unchanged():
    tx = optax.adam(0.1)
    params = {'w': jnp.ones((3,))}
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params))
    step = jax.jit(
        lambda s, b: train_step(
            s,
            b,
            jax.random.key(0),
            loss_fn=loss_fn,
            tx=tx,
            schedule=lambda _: 0.1,
            skip_nonfinite=True,
        )
    )
    good = {'x': np.eye(3, dtype=np.float32), 'y': np.zeros(3, np.float32)}
    bad = {'x': np.full((3, 3), np.inf, np.float32), 'y': np.zeros(3, np.float32)}

    after_good, metrics = step(state, good)
    assert float(metrics['skipped']) == 0.0
    assert not np.allclose(after_good.params['w'], 1.0)

    after_bad, metrics = step(after_good, bad)
    assert float(metrics['skipped']) == 1.0
    assert not np.isfinite(float(metrics['loss']))
    assert int(after_bad.step) == 2  # the step still counts (data and schedule move on)
    for a, b in zip(
        jax.tree.leaves((after_bad.params, after_bad.opt_state)),
        jax.tree.leaves((after_good.params, after_good.opt_state)),
    ):
        np.testing.assert_array_equal(a, b)

    # Without skipping, the same batch poisons the parameters.
    poisoned, _ = jax.jit(
        lambda s, b: train_step(
            s, b, jax.random.key(0), loss_fn=loss_fn, tx=tx, schedule=lambda _: 0.1
        )
    )(after_good, bad)
    assert not np.isfinite(np.asarray(poisoned.params['w'])).all()


def diverging_run(workdir: str, vocab: str, *extra: str):
    """A learning rate of 1e30: the loss is NaN within a few steps."""
    return launch(
        'pretrain',
        '--config',
        'configs/bert_mlm.py:tiny',
        '--workdir',
        workdir,
        *SMALL_RUN,
        f'--config.data.vocab_file={vocab}',
        '--config.total_steps=40',
        '--config.warmup_steps=0',
        '--config.checkpoint_every=1',
        '--config.log_every=1',
        '--config.eval_every=40',
        '--config.learning_rate=1e30',
        *extra,
    )


def test_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, pydoc_vocab):
    workdir = str(tmp_path / 'nan')
    r = diverging_run(workdir, pydoc_vocab)
    assert r.returncode == 1, r.stderr[-2000:]
    assert 'the loss became non-finite at step' in r.stderr
    bad = int(r.stderr.split('non-finite at step ')[1].split()[0])
    kept = int(r.stderr.split('the last good checkpoint is step ')[1].split('.')[0])
    assert kept == bad - 1, r.stderr[-1000:]  # checkpoint_every=1: the step just before
    saved = ckpt_lib.saved_params_metadata(workdir)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved)
    params, step = ckpt_lib.restore_params(workdir, target)
    assert step == kept
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    assert not os.path.exists(os.path.join(workdir, 'checkpoints', str(bad)))
    # The error is said once on stderr; log.txt keeps it with its traceback.
    errors = [line for line in r.stderr.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and 'non-finite at step' in errors[0], r.stderr[-2000:]
    with open(os.path.join(workdir, 'log.txt')) as f:
        log = f.read()
    assert 'the run stopped: NonFiniteLossError' in log and 'Traceback' in log


@pytest.mark.slow  # the skip itself is checked step by step above
def test_skip_nonfinite_steps_stops_after_too_many_in_a_row(tmp_path, pydoc_vocab):
    workdir = str(tmp_path / 'skip')
    r = diverging_run(workdir, pydoc_vocab, '--config.skip_nonfinite_steps=3')
    assert r.returncode == 1, r.stderr[-2000:]
    assert 'non-finite loss or gradient norm, update skipped' in r.stderr
    assert '4 steps in a row up to step' in r.stderr
    assert '(skip_nonfinite_steps=3)' in r.stderr


# A task for the trainer (core/trainer.py imports it by this module's name): the MLM task
# whose loss gains a term that is 0 with an infinite gradient, so the loss stays finite
# and the gradient norm does not.
def check_config(config):
    from pretrain import mlm

    mlm.check_config(config)


@jax.custom_vjp
def _zero_with_infinite_gradient(x):
    return 0.0 * jnp.sum(x)


def _forward(x):
    return _zero_with_infinite_gradient(x), x


def _backward(x, g):
    return (jnp.full_like(x, jnp.inf) * g,)


_zero_with_infinite_gradient.defvjp(_forward, _backward)


def build(config, workdir, runtime):
    from pretrain import mlm

    task = mlm.build(config, workdir, runtime)
    loss_fn = task.loss_fn

    def infinite_gradient_loss(params, batch, rng, train, rows=None):
        loss, aux = loss_fn(params, batch, rng, train, rows)
        bias = params['output_bias']
        return loss + _zero_with_infinite_gradient(bias) * aux['denominator'], aux

    task.loss_fn = infinite_gradient_loss
    return task


def test_a_nonfinite_gradient_norm_stops_the_run_before_a_checkpoint_saves_it(
    tmp_path, pydoc_vocab
):
    """A finite loss with an infinite gradient norm (model.dropout_rate=1.5 did that): the
    update makes the parameters NaN, so the run stops at that step and saves nothing."""
    from configs import bert_mlm
    from core import trainer

    config = bert_mlm.get_config('tiny')
    for flag in SMALL_RUN:
        key, value = flag[len('--config.') :].split('=')
        parent, _, name = key.rpartition('.')
        section = config[parent] if parent else config
        section[name] = type(section[name])(value)
    config.data.vocab_file = pydoc_vocab
    config.total_steps, config.checkpoint_every, config.log_every = 4, 1, 1
    workdir = str(tmp_path / 'inf')
    with pytest.raises(loop.NonFiniteLossError) as e:
        trainer.train_and_evaluate(config, workdir, 'pretrain', tasks={'mlm': __name__})
    assert 'the gradient norm became non-finite at step 1' in str(e.value)
    assert 'there is no checkpoint yet' in str(e.value)
    assert not os.path.exists(os.path.join(workdir, 'checkpoints', '1'))
