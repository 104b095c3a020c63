"""Optimizer factory: optax AdamW, LAMB or LARS with warmup + decay and global-norm
clipping."""

import re
from collections.abc import Callable

import jax
import numpy as np
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


# Parameters exempt from weight decay (and from LAMB's / LARS's trust ratio) by role, read
# from the parameter's path: never from its shape, which a scanned layer stack or the fused
# QKV bias [3, heads, head_dim] changes. BERT's recipe (no decay on biases or LayerNorm)
# decays its token, segment and position embeddings; a ViT's cls token and position table
# are not decayed, as in big_vision and timm; CLIP's temperature is not a weight.
NO_DECAY_LEAVES = ('bias', 'scale', 'cls', 'pos_embedding', 'logit_scale')


def is_layer_norm(module: str) -> bool:
    """models/encoder.py names every LayerNorm `ln` or `ln_<where>`."""
    return module == 'ln' or module.startswith('ln_')


def decays(path: str) -> bool:
    """Whether the parameter at `path` ('backbone/encoder/layer_0/mlp/wi/kernel') gets
    weight decay: every kernel and embedding table does; no bias (`bias`, `*_bias`), nothing
    inside a LayerNorm, nor the other NO_DECAY_LEAVES. The same in either layer layout."""
    *modules, leaf = path.split('/')
    if leaf in NO_DECAY_LEAVES or leaf.endswith('_bias'):
        return False
    return not any(is_layer_norm(m) for m in modules)


def decay_mask(params):
    """True where `decays`: the mask of weight decay and of LAMB's / LARS's trust ratio. The
    params may be boxed (flax.linen.Partitioned, as at optimizer init): the mask then is too."""
    return jax.tree_util.tree_map_with_path(lambda path, _: decays(_path(path)), params)


def make_optimizer(
    config, frozen_state: bool = False
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns (transformation, schedule) from `config.optimizer` and the shared keys.

    BERT's defaults: AdamW, beta2 0.999, eps 1e-6, weight decay 0.01 not on biases or
    LayerNorm, gradients clipped to global norm 1.0. Frozen parameters get no optimizer
    state (`without_frozen_state`) unless `frozen_state`: the layout of pretrax before
    2026-11-30, read to resume its runs (`drop_frozen_state`).
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
        # optax.lamb applies its trust ratio to every parameter; as in BERT's LAMB (You et
        # al. 2020) biases and LayerNorm parameters take neither decay nor the trust ratio.
        core = optax.chain(
            optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps),
            optax.add_decayed_weights(opt.weight_decay, mask=decay_mask),
            optax.masked(optax.scale_by_trust_ratio(), decay_mask),
            optax.scale_by_learning_rate(schedule),
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
    parts = [core]
    if opt.grad_clip_norm and opt.grad_clip_norm > 0:
        parts.insert(0, optax.clip_by_global_norm(opt.grad_clip_norm))
    scale = transfer_scale_fn(config)
    if scale is not None:
        # Frozen parameters' gradients are zeroed before clipping (they must not count in
        # the global norm), and every update is scaled by its layer's factor after.
        trainable = lambda path: (np.asarray(scale(path)) > 0).astype(np.float32)
        parts = [scale_by_path(trainable), *parts, scale_by_path(scale)]
    tx = core if len(parts) == 1 else optax.chain(*parts)
    if scale is not None and freezes(config) and not frozen_state:
        tx = without_frozen_state(tx, scale)
    return tx, schedule


def freezes(config) -> bool:
    """Whether `config` freezes whole parameters: a linear probe's encoder, the first
    `freeze_layers` layers, a distillation teacher."""
    t = config.get('transfer') or {}
    return bool(
        t.get('freeze_backbone', False) or t.get('freeze_layers', 0) > 0 or config.get('teacher')
    )


def without_frozen_state(
    tx: optax.GradientTransformation, scale: Callable[[str], float | np.ndarray]
) -> optax.GradientTransformation:
    """`tx` on the parameters that train; a zero update and no optimizer state for those
    whose every factor is 0. A frozen teacher or linear-probe encoder then costs neither
    Adam's two moments (twice its size in memory) nor their update each step, and the
    gradients of frozen weights are unused, so the compiled step drops them. A scanned
    stack that freezes some of its layers trains (its frozen layers take `tx`'s zero)."""

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: 'train' if np.any(np.asarray(scale(_path(path))) > 0) else 'frozen',
            params,
        )

    return optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, labels)


def drop_frozen_state(opt_state, earlier):
    """`opt_state` (a `without_frozen_state` optimizer's state, or its abstract shape) with
    every entry taken from `earlier`, the state of the same optimizer laid out with an
    entry for every parameter (`make_optimizer(config, frozen_state=True)`), less the
    frozen parameters' (Adam's moments of a frozen parameter: zeros, never read). A
    structure that does not fit raises ValueError."""
    masked = lambda x: isinstance(x, optax.MaskedNode)

    def take(ours, theirs):
        if masked(ours):
            return ours
        if np.shape(ours) != np.shape(theirs):
            raise ValueError(
                f'optimizer state of shape {np.shape(theirs)}, {np.shape(ours)} expected'
            )
        return theirs

    train = opt_state.inner_states['train']
    inner = jax.tree.map(take, train.inner_state, earlier, is_leaf=masked)
    states = {**opt_state.inner_states, 'train': train._replace(inner_state=inner)}
    return opt_state._replace(inner_states=states)


def _path(keys) -> str:
    """'backbone/encoder/layer_0/...' of a key path (a box's `.value` attribute left out)."""
    return '/'.join(str(k.key) for k in keys if hasattr(k, 'key'))


def scale_by_path(scale: Callable[[str], float | np.ndarray]) -> optax.GradientTransformation:
    """Multiplies each update by `scale('backbone/encoder/layer_3/...')`, a constant per
    parameter (0 freezes it), or per layer along the leading axis of a scanned encoder's
    stacked parameter (an array of num_layers factors)."""

    def scaled(path, u):
        factor = np.asarray(scale(_path(path)), np.float32)
        return u * factor.reshape(factor.shape + (1,) * (u.ndim - factor.ndim)).astype(u.dtype)

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(scaled, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


_LAYER = re.compile(r'^backbone/encoder/layer_(\d+)/')
_STACKED = 'backbone/encoder/layers/'  # model.scan_layers: every layer's leaf in one array


def layer_depth(path: str, num_layers: int) -> int:
    """0 for the backbone's embeddings, i + 1 for its encoder layer i, num_layers + 1 for
    everything above them (final LayerNorm, pooler, heads). A scanned encoder's stacked
    parameters hold every layer: see `transfer_scale_fn`."""
    if path.startswith(_STACKED):
        raise ValueError(f'{path} holds all {num_layers} layers; it has no single depth')
    if not path.startswith('backbone/'):
        return num_layers + 1
    match = _LAYER.match(path)
    if match:
        return int(match.group(1)) + 1
    if path.startswith(('backbone/encoder/', 'backbone/pooler/')):
        return num_layers + 1  # the pre-LN encoder's final LayerNorm, BERT's pooler
    return 0


def transfer_scale_fn(config) -> Callable[[str], float | np.ndarray] | None:
    """The per-parameter learning-rate factor of `config.transfer` (None: no transfer
    keys, or plain full fine-tuning), an array of one factor per layer for a scanned
    encoder's stacked parameters (`backbone/encoder/layers/...`):

      freeze_backbone  the encoder is frozen (linear probe): factor 0 under backbone/
      freeze_layers=k  the embeddings and the first k encoder layers are frozen
      layer_decay=d    layer-wise learning-rate decay: depth l of L + 1 gets d ** (L + 1 - l)
                       (embeddings the smallest, the head 1; Clark et al. 2020, BEiT)
      head_lr_scale=s  the new head (every parameter outside backbone/) learns s times
                       faster than the encoder's top layer
      teacher          (config.teacher, distillation) factor 0 under teacher/
    """
    # A config without transfer keys (pretraining) trains every parameter but a teacher's.
    t = config.get('transfer') or {}
    freeze_backbone = t.get('freeze_backbone', False)
    freeze_layers = t.get('freeze_layers', 0)
    layer_decay = t.get('layer_decay', 1.0)
    head = t.get('head_lr_scale', 1.0)
    teacher = bool(config.get('teacher'))
    plain = not freeze_backbone and freeze_layers == 0 and layer_decay == 1.0
    if plain and head == 1.0 and not teacher:
        return None
    num_layers = config.model.num_layers

    def factor(path: str, depth: int) -> float:
        if path.startswith('teacher/'):
            return 0.0  # a distillation teacher (finetune/distill.py): never trained
        if not path.startswith('backbone/'):
            return float(head)
        if freeze_backbone or (freeze_layers > 0 and depth <= freeze_layers):
            return 0.0
        return float(layer_decay ** (num_layers + 1 - depth))

    def scale(path: str) -> float | np.ndarray:
        if path.startswith(_STACKED):  # one factor per layer, along the stacked axis
            return np.array([factor(path, i + 1) for i in range(num_layers)], np.float32)
        return factor(path, layer_depth(path, num_layers))

    return scale
