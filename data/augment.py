"""On-device random image augmentations for SimCLR-style contrastive pretraining.

`augment(rng, images, cfg)` runs inside the jitted train step: it takes the step's rng key
and a batch `[B, H, W, C]` of float images in [0, 1] (C = 1 grayscale or 3 RGB) and returns
a batch of the same shape and dtype, still in [0, 1]. Example b's key is
`fold_in(rng, rows[b])`, its row in the step's global batch, and a per-example function is
vmapped, so every example draws its own crop box, flip, jitter factors, op order and blur
sigma, the same whichever device or micro-batch holds it. No host callbacks and no
data-dependent shapes: it jits with `cfg` static (a frozen, hashable dataclass) and runs
with the batch sharded over a mesh or under `pmap` (pass the global rows there).

The pipeline follows SimCLR (Chen et al. 2020), in this order:

  1. random resized crop (Inception-style area fraction and log-uniform aspect ratio; the
     box is clipped to the image rather than re-drawn, since rejection loops do not jit
     well), resampled back to H x W with bilinear `jax.image.scale_and_translate`;
  2. horizontal flip with probability 0.5;
  3. colour jitter with probability `color_jitter_prob`: brightness, contrast, saturation
     and hue (the last two for RGB only), in a random order per example, each followed by a
     clip to [0, 1], as torchvision's ColorJitter;
  4. random grayscale (RGB only) with probability `grayscale_prob`;
  5. Gaussian blur with probability `blur_prob`, sigma uniform in `blur_sigma` * H / 224.

An op that is disabled in `cfg` (probability or strength 0) is left out of the traced
program altogether, so the all-off config is the exact identity. Each example's key is split
into one fixed sub-key per op, so switching one op off does not change the others' draws.
"""

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

# ITU-R 601-2 luma weights, as PIL and torchvision use for RGB -> grayscale.
_LUMA = (0.299, 0.587, 0.114)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Static augmentation settings (hashable, so it can be a static jit argument).

    Strengths are torchvision's: a factor is drawn uniformly in [max(0, 1 - s), 1 + s] for
    brightness, contrast and saturation, and a hue shift uniformly in [-hue, hue] of a full
    turn. `blur_sigma` is in pixels for a 224-pixel image and scales with the height.
    """

    crop: bool = True
    crop_scale: tuple[float, float] = (0.08, 1.0)  # area fraction of the source
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio w/h range (log-uniform)
    flip: bool = True  # horizontal, p=0.5
    color_jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4  # RGB only
    hue: float = 0.1  # RGB only, fraction of a full turn
    grayscale_prob: float = 0.2  # RGB only
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # in pixels at 224; scales with image size

    def __post_init__(self):
        for name in ('crop_scale', 'crop_ratio', 'blur_sigma'):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 2 or value[0] > value[1]:
                raise ValueError(f'augment.{name} must be a (low, high) pair, got {value}')
            object.__setattr__(self, name, value)
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f'augment.crop_scale must satisfy 0 < low <= high <= 1, got {lo, hi}')
        if self.crop_ratio[0] <= 0:
            raise ValueError(f'augment.crop_ratio must be positive, got {self.crop_ratio}')
        if self.blur_sigma[0] < 0:
            raise ValueError(f'augment.blur_sigma must be >= 0, got {self.blur_sigma}')
        for name in ('color_jitter_prob', 'grayscale_prob', 'blur_prob'):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f'augment.{name} must be in [0, 1], got {getattr(self, name)}')
        for name in ('brightness', 'contrast', 'saturation'):
            if getattr(self, name) < 0:
                raise ValueError(f'augment.{name} must be >= 0, got {getattr(self, name)}')
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f'augment.hue must be in [0, 0.5], got {self.hue}')

    @classmethod
    def from_config(cls, c) -> 'AugmentConfig':
        """From `config.augment` (an ml_collections ConfigDict or a plain mapping).

        Lists become tuples (command-line overrides and JSON give lists); a key that is not
        a field raises ValueError naming it, so a typo cannot silently keep a default.
        """
        items = c.to_dict() if hasattr(c, 'to_dict') else dict(c)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(items) - fields)
        if unknown:
            raise ValueError(f'unknown augment keys {unknown}; expected some of {sorted(fields)}')
        return cls(**{k: tuple(v) if isinstance(v, list | tuple) else v for k, v in items.items()})


# ---------------------------------------------------------------------------------------
# Single-example ops: x is [H, W, C] float, key a single PRNG key.


def _crop(key: jax.Array, x: jax.Array, cfg: AugmentConfig) -> jax.Array:
    """Random resized crop: a box of random area and aspect ratio, resampled to H x W."""
    height, width, _ = x.shape
    k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
    area = jax.random.uniform(k_area, (), minval=cfg.crop_scale[0], maxval=cfg.crop_scale[1])
    log_ratio = jax.random.uniform(
        k_ratio, (), minval=math.log(cfg.crop_ratio[0]), maxval=math.log(cfg.crop_ratio[1])
    )
    ratio = jnp.exp(log_ratio)  # w / h
    area = area * height * width
    # Clipping instead of Inception's re-draw loop: a box too wide or too tall for the
    # image is cut to its side (area and ratio then move toward the image's own).
    box_h = jnp.clip(jnp.sqrt(area / ratio), 1.0, height)
    box_w = jnp.clip(jnp.sqrt(area * ratio), 1.0, width)
    y0 = jax.random.uniform(k_y, ()) * (height - box_h)
    x0 = jax.random.uniform(k_x, ()) * (width - box_w)
    scale = jnp.stack([height / box_h, width / box_w])
    translation = -jnp.stack([y0, x0]) * scale
    out = jax.image.scale_and_translate(
        x, x.shape, (0, 1), scale, translation, method='linear', antialias=True
    )
    return jnp.clip(out, 0.0, 1.0)


def _gray(x: jax.Array) -> jax.Array:
    """[H, W, 3] -> [H, W, 1] luma; [H, W, 1] is returned as is."""
    if x.shape[-1] == 1:
        return x
    return jnp.tensordot(x, jnp.asarray(_LUMA, x.dtype), axes=([-1], [0]))[..., None]


def _rgb_to_hsv(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    value = jnp.max(x, axis=-1)
    delta = value - jnp.min(x, axis=-1)
    sat = jnp.where(value > 0, delta / jnp.where(value > 0, value, 1.0), 0.0)
    safe = jnp.where(delta > 0, delta, 1.0)
    hue = jnp.where(
        r == value,
        (g - b) / safe,
        jnp.where(g == value, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe),
    )
    hue = jnp.where(delta > 0, hue / 6.0, 0.0) % 1.0
    return hue, sat, value


def _hsv_to_rgb(hue: jax.Array, sat: jax.Array, value: jax.Array) -> jax.Array:
    # Branch-free form: channel n is v - v s clip(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6.
    n = jnp.asarray([5.0, 3.0, 1.0], value.dtype)
    k = (n + hue[..., None] * 6.0) % 6.0
    return value[..., None] - (value * sat)[..., None] * jnp.clip(jnp.minimum(k, 4.0 - k), 0, 1)


def _jitter_ops(key: jax.Array, channels: int, cfg: AugmentConfig) -> list[Callable]:
    """The enabled colour ops, each closed over its own random factor."""
    k_b, k_c, k_s, k_h = jax.random.split(key, 4)

    def factor(k, s):
        return jax.random.uniform(k, (), minval=max(0.0, 1.0 - s), maxval=1.0 + s)

    ops = []
    if cfg.brightness > 0:
        f_b = factor(k_b, cfg.brightness)
        ops.append(lambda x: jnp.clip(x * f_b, 0.0, 1.0))
    if cfg.contrast > 0:
        f_c = factor(k_c, cfg.contrast)

        def contrast_op(x):
            mean = jnp.mean(_gray(x))
            return jnp.clip(mean + f_c * (x - mean), 0.0, 1.0)

        ops.append(contrast_op)
    if channels == 3 and cfg.saturation > 0:
        f_s = factor(k_s, cfg.saturation)
        ops.append(lambda x: jnp.clip(_gray(x) + f_s * (x - _gray(x)), 0.0, 1.0))
    if channels == 3 and cfg.hue > 0:
        shift = jax.random.uniform(k_h, (), minval=-cfg.hue, maxval=cfg.hue)

        def hue_op(x):
            h, s, v = _rgb_to_hsv(x)
            return jnp.clip(_hsv_to_rgb((h + shift) % 1.0, s, v), 0.0, 1.0)

        ops.append(hue_op)
    return ops


def _color_jitter(key: jax.Array, x: jax.Array, cfg: AugmentConfig) -> jax.Array:
    """The enabled colour ops in a random order (a random permutation per example)."""
    k_ops, k_perm = jax.random.split(key)
    ops = _jitter_ops(k_ops, x.shape[-1], cfg)
    if len(ops) <= 1:
        return ops[0](x) if ops else x
    order = jax.random.permutation(k_perm, len(ops))
    # Every step evaluates every op and selects the one of this example's order: len(ops)**2
    # cheap elementwise passes, the price of a per-example order under vmap (where a
    # `lax.switch` would become the same select; written out, it also works on meshes with
    # Explicit axes, where a vmapped switch fails to trace).
    for i in range(len(ops)):
        outs = [op(x) for op in ops]
        x = outs[-1]
        for j in range(len(ops) - 1):
            x = jnp.where(order[i] == j, outs[j], x)
    return x


def blur_radius(side: int) -> int:
    """Half-width of the blur kernel: kernel ~10% of the side, odd, at least 3 (23 at 224)."""
    return max(1, int(0.1 * side) // 2)


def _blur_1d(x: jax.Array, weights: jax.Array, axis: int) -> jax.Array:
    radius = (weights.shape[0] - 1) // 2
    n = x.shape[axis]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    xp = jnp.pad(x, pad, mode='reflect' if radius < n else 'edge')
    out = jnp.zeros_like(x)
    for k in range(weights.shape[0]):
        out = out + weights[k] * jax.lax.slice_in_dim(xp, k, k + n, axis=axis)
    return out


def _blur(key: jax.Array, x: jax.Array, cfg: AugmentConfig) -> jax.Array:
    """Separable Gaussian blur, per-example sigma, reflect padding, fixed kernel size."""
    height, width, _ = x.shape
    sigma = jax.random.uniform(key, (), minval=cfg.blur_sigma[0], maxval=cfg.blur_sigma[1])
    sigma = jnp.maximum(sigma * height / 224.0, 1e-3)
    radius = blur_radius(max(height, width))
    offsets = jnp.arange(-radius, radius + 1, dtype=x.dtype)
    weights = jnp.exp(-0.5 * (offsets / sigma) ** 2)
    weights = weights / jnp.sum(weights)
    out = _blur_1d(_blur_1d(x, weights, 0), weights, 1)
    return jnp.clip(out, 0.0, 1.0)


def _augment_one(key: jax.Array, x: jax.Array, cfg: AugmentConfig) -> jax.Array:
    k_crop, k_flip, k_jitter, k_gray, k_blur = jax.random.split(key, 5)
    rgb = x.shape[-1] == 3
    if cfg.crop:
        x = _crop(k_crop, x, cfg)
    if cfg.flip:
        x = jnp.where(jax.random.bernoulli(k_flip), x[:, ::-1], x)
    has_jitter = cfg.brightness > 0 or cfg.contrast > 0
    has_jitter |= rgb and (cfg.saturation > 0 or cfg.hue > 0)
    if cfg.color_jitter_prob > 0 and has_jitter:
        k_apply, k_ops = jax.random.split(k_jitter)
        jittered = _color_jitter(k_ops, x, cfg)
        x = jnp.where(jax.random.bernoulli(k_apply, cfg.color_jitter_prob), jittered, x)
    if rgb and cfg.grayscale_prob > 0:
        gray = jnp.broadcast_to(_gray(x), x.shape)
        x = jnp.where(jax.random.bernoulli(k_gray, cfg.grayscale_prob), gray, x)
    if cfg.blur_prob > 0:
        k_apply, k_sigma = jax.random.split(k_blur)
        x = jnp.where(jax.random.bernoulli(k_apply, cfg.blur_prob), _blur(k_sigma, x, cfg), x)
    return x


def _sharded_like_batch(keys: jax.Array, images: jax.Array) -> jax.Array:
    """On a mesh with Explicit axes, vmap needs the keys sharded like the images' batch.

    (With Auto axes, as core.sharding builds the mesh, the compiler propagates it and the
    spec seen here is empty.)
    """
    spec = jax.typeof(images).sharding.spec
    if len(spec) and spec[0] is not None:
        keys = jax.sharding.reshard(keys, jax.sharding.PartitionSpec(spec[0]))
    return keys


@functools.partial(jax.jit, static_argnames=('cfg',))
def augment(
    rng: jax.Array, images: jax.Array, cfg: AugmentConfig, rows: jax.Array | None = None
) -> jax.Array:
    """One random augmentation per example of `images` [B, H, W, C] (C = 1 or 3) in [0, 1].

    Returns the same shape and dtype, values in [0, 1]. Example b draws from
    `fold_in(rng, rows[b])`; `rows` [B] are the examples' rows in the step's global batch
    (None: 0 .. B - 1).
    """
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f'augment expects [B, H, W, C] images with C in (1, 3), got {images.shape}'
        )
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f'augment expects float images in [0, 1], got dtype {images.dtype}')
    if rows is None:
        rows = jnp.arange(images.shape[0], dtype=jnp.int32)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, rows)
    keys = _sharded_like_batch(keys, images)
    return jax.vmap(functools.partial(_augment_one, cfg=cfg))(keys, images)


def two_views(
    rng: jax.Array, images: jax.Array, cfg: AugmentConfig, rows: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Two independent augmentations of the same batch (the positive pairs of SimCLR)."""
    k1, k2 = jax.random.split(rng)
    return augment(k1, images, cfg, rows), augment(k2, images, cfg, rows)
