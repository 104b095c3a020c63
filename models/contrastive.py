"""Models for contrastive pretraining. Each keeps its transferable encoder under a
`*backbone` subtree (what fine-tuning restores) and puts what only the loss needs
(projection heads, temperature) beside it.

  SimClrModel   backbone/ (VisionEncoder), projection/ (MLP)
  SimCseModel   backbone/ (TextEncoder),   projection/ (MLP)
  TwoTower      image_backbone/, image_projection/, text_backbone/, text_projection/,
                logit_scale, logit_bias (CLIP / SigLIP)
"""

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from models.bert import BertConfig, TextEncoder
from models.encoder import dense_init
from models.heads import ProjectionHead, pool_tokens
from models.vit import VisionEncoder, VitConfig, pool


class SimClrModel(nn.Module):
    """ViT + projection MLP. `__call__` gives the projections the loss compares;
    `features` gives the pooled representation that transfers."""

    vit: VitConfig
    proj_hidden: int = 2048
    proj_dim: int = 128
    proj_layers: int = 2

    def setup(self):
        self.backbone = VisionEncoder(self.vit)
        self.projection = ProjectionHead(
            self.proj_hidden, self.proj_dim, self.proj_layers, dtype=self.vit.dtype
        )

    def features(self, images: jax.Array, deterministic: bool = True, rows=None) -> jax.Array:
        """images: [batch, S, S, C] -> [batch, hidden] (float32); rows: [batch], each
        image's id in the step's batch, which its dropout masks depend on."""
        tokens = self.backbone(images, deterministic, rows)
        return pool(tokens, self.vit.pooling).astype(jnp.float32)

    def __call__(self, images: jax.Array, deterministic: bool = True, rows=None) -> jax.Array:
        """images: [batch, S, S, C] -> projections [batch, proj_dim] (float32)."""
        return self.projection(self.features(images, deterministic, rows)).astype(jnp.float32)


class SimCseModel(nn.Module):
    """BERT text encoder + projection MLP (SimCSE: the MLP over [CLS] in training only)."""

    bert: BertConfig
    pooling: str = 'cls'
    proj_hidden: int = 768
    proj_dim: int = 768
    proj_layers: int = 2

    def setup(self):
        self.backbone = TextEncoder(self.bert)
        self.projection = ProjectionHead(
            self.proj_hidden, self.proj_dim, self.proj_layers, dtype=self.bert.dtype
        )

    def features(
        self, batch: dict[str, jax.Array], deterministic: bool = True, rows=None
    ) -> jax.Array:
        """batch: input_ids, input_mask [batch, length] -> [batch, hidden] (float32); rows:
        [batch], each sentence's id in the step's batch, which its dropout masks depend on."""
        hidden = self.backbone(batch['input_ids'], batch['input_mask'], None, deterministic, rows)
        return pool_tokens(hidden, batch['input_mask'], self.pooling).astype(jnp.float32)

    def __call__(
        self, batch: dict[str, jax.Array], deterministic: bool = True, rows=None
    ) -> jax.Array:
        return self.projection(self.features(batch, deterministic, rows)).astype(jnp.float32)


class TwoTower(nn.Module):
    """CLIP / SigLIP: a ViT image tower and a Transformer text tower, each followed by a
    linear projection into a shared space, and a learned temperature (and bias).

    The temperature is a learned log-scale, clamped at `max_logit_scale` (CLIP: 100) so the
    logits cannot blow up; the bias (sigmoid loss) is clamped to +-`max_abs_logit_bias`.
    Both clamps stop the gradient past the bound.
    """

    vit: VitConfig
    text: BertConfig
    embed_dim: int = 512
    text_pooling: str = 'cls'
    init_logit_scale: float = math.log(1 / 0.07)  # CLIP; SigLIP uses log(10)
    init_logit_bias: float = 0.0  # SigLIP: -10
    max_logit_scale: float = 100.0
    max_abs_logit_bias: float = 30.0

    def setup(self):
        self.image_backbone = VisionEncoder(self.vit)
        self.text_backbone = TextEncoder(self.text)
        self.image_projection = nn.Dense(
            self.embed_dim, use_bias=False, kernel_init=dense_init('embed', None)
        )
        self.text_projection = nn.Dense(
            self.embed_dim, use_bias=False, kernel_init=dense_init('embed', None)
        )

        def scalar(value: float):
            return nn.with_logical_partitioning(nn.initializers.constant(value), ())

        self.logit_scale = self.param('logit_scale', scalar(self.init_logit_scale), ())
        self.logit_bias = self.param('logit_bias', scalar(self.init_logit_bias), ())

    def image_features(self, images: jax.Array, deterministic: bool = True, rows=None) -> jax.Array:
        """The image tower's pooled representation, [batch, hidden] (what transfers); rows:
        [batch], each pair's row in the step's batch, which its dropout masks depend on."""
        tokens = self.image_backbone(images, deterministic, rows)
        return pool(tokens, self.vit.pooling).astype(jnp.float32)

    def embed_images(self, images: jax.Array, deterministic: bool = True, rows=None) -> jax.Array:
        """[batch, S, S, C] -> [batch, embed_dim] in the shared space (not normalised)."""
        features = self.image_features(images, deterministic, rows)
        return self.image_projection(features).astype(jnp.float32)

    def embed_texts(
        self, input_ids: jax.Array, input_mask: jax.Array, deterministic: bool = True, rows=None
    ) -> jax.Array:
        """[batch, length] token ids and mask -> [batch, embed_dim] (not normalised)."""
        hidden = self.text_backbone(input_ids, input_mask, None, deterministic, rows)
        pooled = pool_tokens(hidden, input_mask, self.text_pooling)
        return self.text_projection(pooled).astype(jnp.float32)

    def temperature(self) -> tuple[jax.Array, jax.Array]:
        """(scale, bias) after the clamps: scale = exp(min(logit_scale, log(max)))."""
        log_max = math.log(self.max_logit_scale)
        scale = jnp.exp(jnp.minimum(self.logit_scale, log_max))
        bias = jnp.clip(self.logit_bias, -self.max_abs_logit_bias, self.max_abs_logit_bias)
        return scale, bias

    def __call__(self, batch: dict[str, jax.Array], deterministic: bool = True, rows=None):
        """batch: image [batch, S, S, C], input_ids / input_mask [batch, length]; rows:
        [batch], the pairs' rows in the step's batch (dropout masks).

        Returns (image embeddings, text embeddings, scale, bias)."""
        img = self.embed_images(batch['image'], deterministic, rows)
        txt = self.embed_texts(batch['input_ids'], batch['input_mask'], deterministic, rows)
        scale, bias = self.temperature()
        return img, txt, scale, bias
