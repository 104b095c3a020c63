"""Vision Transformer: image patches become a sequence, and the shared `Encoder` reads it.

Parameter tree of `VisionEncoder` (what fine-tuning restores):
  patch_embed/kernel  [patch, patch, channels, hidden]   (a stride-`patch` convolution)
  patch_embed/bias    [hidden]
  cls                 [hidden]                           (when pooling == 'cls')
  pos_embedding       [num_tokens, hidden]               (cls first, then patches row-major)
  encoder/            pre-LN layers and the final LayerNorm
  pooler/dense/       Dense + tanh on the cls token (only with `pooler=True`: imported
                      Hugging Face ViTs); the pooled output is sown as intermediates/pooled
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from models.encoder import Encoder, ExampleDropout, FromConfig, Pooler, dense_init, zeros_init


@dataclasses.dataclass(frozen=True)
class VitConfig(FromConfig):
    """Architecture of a ViT image encoder (the `model.*` config keys)."""

    image_size: int = 224
    patch_size: int = 16
    channels: int = 3
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    activation: str = 'gelu'
    layer_norm_eps: float = 1e-6
    pooling: str = 'cls'  # cls | gap (mean over patches)
    pooler: bool = False  # pooler/ (Dense + tanh on the cls token), as HF ViTModel has
    remat: str = 'none'
    scan_layers: bool = False  # nn.scan over the layers: params stacked under encoder/layers
    dtype: str = 'float32'
    attention_impl: str = 'auto'  # auto | xla | cudnn (models/encoder.py attention_impl)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid**2 + (self.pooling == 'cls')


class PatchEmbed(nn.Module):
    """[batch, H, W, C] -> [batch, (H/p) * (W/p), hidden]: non-overlapping p x p patches,
    each mapped linearly (a stride-p convolution written as one einsum)."""

    patch_size: int
    hidden_size: int
    dtype: str = 'float32'

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        p = self.patch_size
        b, h, w, c = images.shape
        if h % p or w % p:
            raise ValueError(f'image size {h}x{w} is not divisible by patch_size {p}')
        kernel = self.param(
            'kernel', dense_init(None, None, None, 'embed'), (p, p, c, self.hidden_size)
        )
        bias = self.param('bias', zeros_init('embed'), (self.hidden_size,))
        x = images.astype(self.dtype).reshape(b, h // p, p, w // p, p, c)
        x = jnp.einsum('bypxqc,pqce->byxe', x, kernel.astype(self.dtype)) + bias.astype(self.dtype)
        return x.reshape(b, (h // p) * (w // p), self.hidden_size)


class VisionEncoder(nn.Module):
    """The ViT backbone: patches + (cls token) + learned positions, then the pre-LN
    `Encoder`. Returns every token, [batch, num_tokens, hidden]; `pool` picks the image
    representation."""

    cfg: VitConfig

    @nn.compact
    def __call__(
        self, images: jax.Array, deterministic: bool = True, rows=None, keep=None
    ) -> jax.Array:
        """images: [batch, image_size, image_size, channels], float in [0, 1]; rows: [batch],
        each image's row in the step's batch, which its dropout masks depend on (None: 0 ..
        batch - 1); keep: [batch, kept] patch indices (row-major), the only patches the
        encoder sees, each with its own position (MAE's visible patches; None: all).
        Returns [batch, (cls) + kept, hidden] with `keep`."""
        cfg = self.cfg
        if images.shape[1:] != (cfg.image_size, cfg.image_size, cfg.channels):
            raise ValueError(
                f'images of shape {images.shape[1:]} for a ViT of image_size '
                f'{cfg.image_size} and {cfg.channels} channels'
            )
        # Inputs scaled to [-1, 1] as in big_vision's ViT recipes.
        x = PatchEmbed(cfg.patch_size, cfg.hidden_size, cfg.dtype, name='patch_embed')(
            images * 2.0 - 1.0
        )
        has_cls = cfg.pooling == 'cls'
        if has_cls:  # params made in this order: their init keys depend on it
            cls = self.param('cls', zeros_init('embed'), (cfg.hidden_size,))
        pos = self.param(
            'pos_embedding', dense_init(None, 'embed'), (cfg.num_tokens, cfg.hidden_size)
        )
        pos = pos[None].astype(x.dtype)
        batch = x.shape[0]
        if keep is None:
            if has_cls:
                cls = jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, cfg.hidden_size))
                x = jnp.concatenate([cls, x], axis=1)
            x = x + pos
        else:  # positions first, then only the kept patches
            x = x + pos[:, int(has_cls) :]
            x = jnp.take_along_axis(x, keep[..., None].astype(jnp.int32), axis=1)
            if has_cls:
                cls = cls.astype(x.dtype) + pos[:, 0]
                x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, cfg.hidden_size)), x], 1)
        x = ExampleDropout(cfg.dropout_rate)(x, rows, deterministic)
        x = nn.with_logical_constraint(x, ('batch', 'length', 'act_embed'))
        x = Encoder.of(cfg, layer_norm='pre', name='encoder')(x, None, deterministic, rows)
        if cfg.pooler:
            if cfg.pooling != 'cls':
                raise ValueError('model.pooler=True pools the cls token; it needs pooling=cls')
            self.sow('intermediates', 'pooled', Pooler(cfg.dtype, name='pooler')(x))
        return x


def pool(tokens: jax.Array, pooling: str) -> jax.Array:
    """[batch, tokens, hidden] -> [batch, hidden]: the cls token, or the mean of all."""
    if pooling == 'cls':
        return tokens[:, 0]
    if pooling == 'gap':
        return jnp.mean(tokens, axis=1)
    raise ValueError(f'model.pooling={pooling!r}; expected cls or gap')


def interpolate_pos_embedding(
    pos: np.ndarray, old_grid: int, new_grid: int, has_cls: bool
) -> np.ndarray:
    """Resizes a learned position table to another patch grid (bicubic over the 2-D grid),
    so a ViT pretrained at one image size fine-tunes at another. pos: [tokens, hidden]."""
    cls, grid = (pos[:1], pos[1:]) if has_cls else (pos[:0], pos)
    if grid.shape[0] != old_grid**2:
        raise ValueError(
            f'position table of {grid.shape[0]} patch rows does not match a {old_grid}x'
            f'{old_grid} grid'
        )
    hidden = grid.shape[-1]
    grid = jnp.asarray(grid, jnp.float32).reshape(old_grid, old_grid, hidden)
    resized = jax.image.resize(grid, (new_grid, new_grid, hidden), method='bicubic')
    resized = np.asarray(resized.reshape(new_grid * new_grid, hidden), pos.dtype)
    return np.concatenate([np.asarray(cls), resized], axis=0)
