"""Encoders with a new task head, for fine-tuning. The encoder sits under `backbone/`
(restored from pretraining), the head under `head/` (new).

  TextClassifier   BERT backbone, [CLS], mean or BERT's pooler -> logits [batch, classes]
  TokenClassifier  BERT backbone -> logits per token [batch, length, classes]
  ImageClassifier  ViT backbone, cls or mean pooling -> logits [batch, classes]

`classes` is 1 for regression. The head is zero-initialised by default, so fine-tuning
starts from the pretrained function (uniform predictions) and early updates go to the head
rather than to undoing a random one.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

from models.bert import BertConfig, TextEncoder
from models.encoder import ExampleDropout, dense_init, zeros_init
from models.heads import pool_tokens
from models.vit import VisionEncoder, VitConfig, pool


class ClassifierHead(nn.Module):
    """Dropout then one Dense layer to the classes."""

    num_classes: int
    dropout_rate: float = 0.1
    zero_init: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True, rows=None) -> jax.Array:
        """x: [batch, ..., hidden]; rows: [batch] (ExampleDropout)."""
        x = ExampleDropout(self.dropout_rate)(x, rows, deterministic)
        kernel_init = zeros_init('embed', None) if self.zero_init else dense_init('embed', None)
        logits = nn.Dense(
            self.num_classes, kernel_init=kernel_init, bias_init=zeros_init(None), name='out'
        )(x)
        return logits.astype(jnp.float32)


class TextClassifier(nn.Module):
    bert: BertConfig
    num_classes: int
    pooling: str = 'cls'
    head_dropout: float = 0.1
    zero_init_head: bool = True

    def setup(self):
        self.backbone = TextEncoder(self.bert)
        self.head = ClassifierHead(self.num_classes, self.head_dropout, self.zero_init_head)

    def features(
        self, batch: dict[str, jax.Array], deterministic: bool = True, rows=None
    ) -> jax.Array:
        hidden = self.backbone(
            batch['input_ids'], batch['input_mask'], batch.get('segment_ids'), deterministic, rows
        )
        if self.pooling == 'pooler':  # BERT's pooler: Dense + tanh on [CLS]
            return self.backbone.pooled(hidden)
        return pool_tokens(hidden, batch['input_mask'], self.pooling)

    def __call__(
        self, batch: dict[str, jax.Array], deterministic: bool = True, rows=None
    ) -> jax.Array:
        """batch: input_ids, input_mask (, segment_ids) [batch, length] -> [batch, classes];
        rows: [batch], the examples' rows in the step's batch (dropout masks)."""
        return self.head(self.features(batch, deterministic, rows), deterministic, rows)


class TokenClassifier(nn.Module):
    bert: BertConfig
    num_classes: int
    head_dropout: float = 0.1
    zero_init_head: bool = True

    def setup(self):
        self.backbone = TextEncoder(self.bert)
        self.head = ClassifierHead(self.num_classes, self.head_dropout, self.zero_init_head)

    def __call__(
        self, batch: dict[str, jax.Array], deterministic: bool = True, rows=None
    ) -> jax.Array:
        """batch: input_ids, input_mask [batch, length] -> [batch, length, classes]; rows:
        [batch], the examples' rows in the step's batch (dropout masks)."""
        hidden = self.backbone(
            batch['input_ids'], batch['input_mask'], batch.get('segment_ids'), deterministic, rows
        )
        return self.head(hidden, deterministic, rows)


class ImageClassifier(nn.Module):
    vit: VitConfig
    num_classes: int
    head_dropout: float = 0.0
    zero_init_head: bool = True

    def setup(self):
        self.backbone = VisionEncoder(self.vit)
        self.head = ClassifierHead(self.num_classes, self.head_dropout, self.zero_init_head)

    def features(self, images: jax.Array, deterministic: bool = True, rows=None) -> jax.Array:
        return pool(self.backbone(images, deterministic, rows), self.vit.pooling)

    def __call__(self, images: jax.Array, deterministic: bool = True, rows=None) -> jax.Array:
        """images: [batch, S, S, C] in [0, 1] -> [batch, classes]; rows: [batch], the
        examples' rows in the step's batch (dropout masks)."""
        return self.head(self.features(images, deterministic, rows), deterministic, rows)
