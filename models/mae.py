"""Masked autoencoder (He et al. 2022): a ViT encodes only the visible patches of each
image, and a light Transformer decoder reconstructs the pixels of the masked ones.

Parameter tree of `MaeModel`:
  backbone/   the VisionEncoder (what fine-tuning restores, as from a SimCLR run)
  decoder/    embed (encoder width -> decoder width), mask_token, pos_embedding, a pre-LN
              encoder stack, pred (decoder width -> the pixels of one patch)

Masking (`random_masking`) is drawn on device, per example from fold_in(rng, row), so an
image's mask depends on the seed, the step and its row in the global batch only, not on
the device layout. Every image keeps the same number of patches (static shapes).
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from models.encoder import Encoder, dense_init, example_rows
from models.vit import VisionEncoder, VitConfig, pool


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """The MAE decoder (`decoder.*` config keys): narrower and shallower than the encoder;
    it exists only in pretraining."""

    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 16
    mlp_dim: int = 2048

    @classmethod
    def from_config(cls, c) -> 'DecoderConfig':
        return cls(**{f.name: c[f.name] for f in dataclasses.fields(cls)})


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Patches each image keeps: (1 - mask_ratio) of them, rounded, at least one and at
    least one masked."""
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f'mae.mask_ratio={mask_ratio}; expected a fraction in (0, 1)')
    return min(max(1, round(num_patches * (1.0 - mask_ratio))), num_patches - 1)


def random_masking(
    rng: jax.Array, rows: jax.Array, num_patches: int, mask_ratio: float
) -> tuple[jax.Array, jax.Array]:
    """(keep [batch, kept], restore [batch, num_patches]): each example's visible patch
    indices (a uniformly random subset, in random order) and the permutation that puts
    [visible; masked] tokens back in patch order. rows: [batch], the examples' rows in the
    step's batch; example b's draw comes from fold_in(rng, rows[b])."""
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, rows)
    noise = jax.vmap(lambda k: jax.random.uniform(k, (num_patches,)))(keys)
    shuffle = jnp.argsort(noise, axis=1)
    restore = jnp.argsort(shuffle, axis=1)
    return shuffle[:, : num_kept(num_patches, mask_ratio)], restore


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """[batch, H, W, C] -> [batch, patches, p * p * C], patches row-major (PatchEmbed's order)."""
    b, h, w, c = images.shape
    p = patch_size
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def reconstruction_loss(
    pred: jax.Array, images: jax.Array, restore: jax.Array, kept: int, patch_size: int, norm: bool
) -> tuple[jax.Array, jax.Array]:
    """(loss summed over masked patches, masked patch count): each masked patch's mean
    squared error over its pixels, against the pixels normalised by the patch's own mean
    and variance when `norm` (MAE's normalised-pixel target). pred: [batch, patches,
    p * p * C]; restore: random_masking's (a patch is masked when its place in the shuffle
    is at or past `kept`)."""
    target = patchify(images.astype(jnp.float32), patch_size)
    if norm:
        mean = jnp.mean(target, axis=-1, keepdims=True)
        var = jnp.var(target, axis=-1, keepdims=True)
        target = (target - mean) * jax.lax.rsqrt(var + 1e-6)
    per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)
    masked = (restore >= kept).astype(jnp.float32)
    return jnp.sum(per_patch * masked), jnp.sum(masked)


class MaeDecoder(nn.Module):
    """Encoded visible tokens -> every patch's predicted pixels, [batch, patches, p*p*C]."""

    vit: VitConfig
    cfg: DecoderConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, restore: jax.Array, deterministic: bool, rows):
        vit, cfg = self.vit, self.cfg
        has_cls = int(vit.pooling == 'cls')
        x = nn.Dense(
            cfg.hidden_size, dtype=vit.dtype, kernel_init=dense_init('embed', None), name='embed'
        )(tokens)
        mask_token = self.param('mask_token', dense_init('embed'), (cfg.hidden_size,))
        batch, patches = restore.shape
        visible = x[:, has_cls:]
        hidden = jnp.broadcast_to(
            mask_token.astype(x.dtype), (batch, patches - visible.shape[1], cfg.hidden_size)
        )
        # [visible; mask tokens] is the shuffled order: `restore` puts each back in place.
        x_patches = jnp.take_along_axis(
            jnp.concatenate([visible, hidden], axis=1), restore[..., None], axis=1
        )
        x = jnp.concatenate([x[:, :has_cls], x_patches], axis=1)
        pos = self.param(
            'pos_embedding', dense_init(None, 'embed'), (vit.num_tokens, cfg.hidden_size)
        )
        x = x + pos[None].astype(x.dtype)
        x = Encoder(
            num_layers=cfg.num_layers,
            num_heads=cfg.num_heads,
            mlp_dim=cfg.mlp_dim,
            dropout_rate=0.0,
            layer_norm='pre',
            layer_norm_eps=vit.layer_norm_eps,
            dtype=vit.dtype,
            attention_impl=vit.attention_impl,
            name='encoder',
        )(x, None, deterministic, rows)
        pixels = vit.patch_size**2 * vit.channels
        return nn.Dense(
            pixels, dtype=vit.dtype, kernel_init=dense_init('embed', None), name='pred'
        )(x[:, has_cls:])


class MaeModel(nn.Module):
    """ViT encoder on the visible patches + MaeDecoder. `__call__` gives the predicted
    pixels of every patch; `features` the pooled representation of the whole image (every
    patch visible) that transfers."""

    vit: VitConfig
    decoder_config: DecoderConfig

    def setup(self):
        self.backbone = VisionEncoder(self.vit)
        self.decoder = MaeDecoder(self.vit, self.decoder_config)

    def features(self, images: jax.Array, deterministic: bool = True, rows=None) -> jax.Array:
        """images: [batch, S, S, C] -> [batch, hidden] (float32)."""
        tokens = self.backbone(images, deterministic, rows)
        return pool(tokens, self.vit.pooling).astype(jnp.float32)

    def __call__(
        self, images: jax.Array, keep: jax.Array, restore: jax.Array, deterministic=True, rows=None
    ) -> jax.Array:
        """images: [batch, S, S, C] in [0, 1]; keep, restore: random_masking's. Returns
        [batch, patches, p * p * C] (float32)."""
        rows = example_rows(rows, images.shape[0])
        tokens = self.backbone(images, deterministic, rows, keep)
        return self.decoder(tokens, restore, deterministic, rows).astype(jnp.float32)
