"""Optimizer factory: optax AdamW, LAMB or LARS with warmup + decay and global-norm
clipping."""

import jax
import optax


def learning_rate_schedule(config) -> optax.Schedule:
    """Linear warmup to `learning_rate`, then `schedule` decay to `end_learning_rate`."""
    peak, warmup, total = config.learning_rate, config.warmup_steps, config.total_steps
    end = config.optimizer.end_learning_rate
    decay_steps = max(total - warmup, 1)
    if config.optimizer.schedule == 'linear':
        decay = optax.linear_schedule(peak, end, decay_steps)
    elif config.optimizer.schedule == 'cosine':
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0.0)
    elif config.optimizer.schedule == 'constant':
        decay = optax.constant_schedule(peak)
    else:
        raise ValueError(
            f'optimizer.schedule={config.optimizer.schedule!r}; expected linear, cosine or constant'
        )
    if warmup <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params):
    """Weight decay on matrices only: biases and LayerNorm parameters (1-D) are exempt."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns (transformation, schedule) from `config.optimizer` and the shared keys.

    BERT's defaults: AdamW, beta2 0.999, eps 1e-6, weight decay 0.01 not on biases or
    LayerNorm, gradients clipped to global norm 1.0.
    """
    opt = config.optimizer
    schedule = learning_rate_schedule(config)
    if opt.name == 'adamw':
        core = optax.adamw(
            schedule,
            b1=opt.b1,
            b2=opt.b2,
            eps=opt.eps,
            weight_decay=opt.weight_decay,
            mask=decay_mask,
        )
    elif opt.name == 'lamb':
        core = optax.lamb(
            schedule,
            b1=opt.b1,
            b2=opt.b2,
            eps=opt.eps,
            weight_decay=opt.weight_decay,
            mask=decay_mask,
        )
    elif opt.name == 'lars':
        # SimCLR's large-batch recipe: momentum SGD with a per-layer trust ratio; biases and
        # LayerNorm parameters get neither weight decay nor the trust ratio.
        core = optax.lars(
            schedule,
            weight_decay=opt.weight_decay,
            weight_decay_mask=decay_mask,
            trust_coefficient=opt.get('trust_coefficient', 0.001),
            eps=0.0,
            trust_ratio_mask=decay_mask,
            momentum=opt.b1,
        )
    else:
        raise ValueError(f'optimizer.name={opt.name!r}; expected adamw, lamb or lars')
    if opt.grad_clip_norm and opt.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), core), schedule
    return core, schedule
