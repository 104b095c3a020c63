"""BERT: text embeddings + the shared Transformer encoder, and the MLM head.

Parameter tree of `BertForMlm`:
  backbone/   embeddings (token, position, segment, LayerNorm) and encoder layers (and,
              with `pooler=True`, BERT's pooler: Dense + tanh on [CLS]): what fine-tuning
              restores
  mlm_head/   transform (Dense + activation + LayerNorm) and an output bias; the output
              matrix is the token embedding (tied), so the head adds no vocab x hidden matrix
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from models.encoder import (
    ACTIVATIONS,
    Dtype,
    Encoder,
    ExampleDropout,
    FromConfig,
    Pooler,
    dense_init,
    layer_norm,
    zeros_init,
)


@dataclasses.dataclass(frozen=True)
class BertConfig(FromConfig):
    """Architecture of a BERT-style text encoder (the `model.*` config keys)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    max_len: int = 512
    type_vocab_size: int = 2
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    activation: str = 'gelu'
    layer_norm: str = 'post'
    layer_norm_eps: float = 1e-12
    pooler: bool = False  # backbone/pooler (Dense + tanh on [CLS]), as BERT checkpoints have
    remat: str = 'none'
    scan_layers: bool = False  # nn.scan over the layers: params stacked under encoder/layers
    dtype: str = 'float32'
    attention_impl: str = 'auto'  # auto | xla | cudnn (models/encoder.py attention_impl)


class TextEmbed(nn.Module):
    """Token + position + segment embeddings, then LayerNorm (post-LN) and dropout."""

    cfg: BertConfig

    def setup(self):
        cfg = self.cfg
        self.token = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            embedding_init=dense_init('vocab', 'embed'),
            dtype=cfg.dtype,
            name='token',
        )
        self.position = self.param(
            'position', dense_init(None, 'embed'), (cfg.max_len, cfg.hidden_size)
        )
        if cfg.type_vocab_size:
            self.segment = nn.Embed(
                cfg.type_vocab_size,
                cfg.hidden_size,
                embedding_init=dense_init(None, 'embed'),
                dtype=cfg.dtype,
                name='segment',
            )
        if cfg.layer_norm == 'post':
            self.ln = layer_norm(cfg.layer_norm_eps, cfg.dtype, 'ln')
        self.dropout = ExampleDropout(cfg.dropout_rate)

    def __call__(self, input_ids, segment_ids, deterministic: bool, rows=None) -> jax.Array:
        """input_ids, segment_ids: [batch, length] -> [batch, length, hidden]; rows: [batch]
        (ExampleDropout)."""
        length = input_ids.shape[1]
        x = self.token(input_ids) + self.position[None, :length].astype(self.cfg.dtype)
        if self.cfg.type_vocab_size:
            x = x + self.segment(segment_ids)
        if self.cfg.layer_norm == 'post':
            x = self.ln(x)
        x = self.dropout(x, rows, deterministic)
        return nn.with_logical_constraint(x, ('batch', 'length', 'act_embed'))

    def attend(self, x: jax.Array) -> jax.Array:
        """Scores against every token embedding: [..., hidden] -> [..., vocab]."""
        return self.token.attend(x)


class TextEncoder(nn.Module):
    """The BERT backbone: `TextEmbed` then `Encoder`. Returns [batch, length, hidden].

    With `cfg.pooler` the pooled output ([batch, hidden], Dense + tanh on [CLS]) is sown as
    intermediates/pooled: `apply(..., mutable=['intermediates'])` returns it."""

    cfg: BertConfig

    def setup(self):
        cfg = self.cfg
        self.embeddings = TextEmbed(cfg)
        self.encoder = Encoder.of(cfg)
        if cfg.pooler:
            self.pooler = Pooler(cfg.dtype)

    def __call__(
        self, input_ids, input_mask, segment_ids=None, deterministic: bool = True, rows=None
    ):
        """input_ids, input_mask (1 = real token), segment_ids: [batch, length]; rows:
        [batch], each example's row in the step's batch, which its dropout masks depend on
        (None: 0 .. batch - 1)."""
        if segment_ids is None:
            segment_ids = jnp.zeros_like(input_ids)
        x = self.embeddings(input_ids, segment_ids, deterministic, rows)
        x = self.encoder(x, input_mask, deterministic, rows)
        if self.cfg.pooler:
            self.sow('intermediates', 'pooled', self.pooler(x))
        return x

    def pooled(self, x: jax.Array) -> jax.Array:
        """BERT's pooled output of this encoder's output x: [batch, length, hidden] ->
        [batch, hidden] (needs cfg.pooler)."""
        return self.pooler(x)

    def attend(self, x: jax.Array) -> jax.Array:
        return self.embeddings.attend(x)


class MlmHead(nn.Module):
    """BERT's MLM transform (Dense, activation, LayerNorm) before the tied output layer."""

    activation: str = 'gelu'
    layer_norm_eps: float = 1e-12
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = x.shape[-1]
        x = nn.Dense(
            hidden,
            dtype=self.dtype,
            kernel_init=dense_init('embed', 'mlp'),
            bias_init=zeros_init('mlp'),
            name='transform',
        )(x)
        x = ACTIVATIONS[self.activation](x)
        return layer_norm(self.layer_norm_eps, self.dtype, 'ln')(x)


@jax.custom_vjp
def add_bias(x: jax.Array, bias: jax.Array) -> jax.Array:
    """x + bias over the last axis, whose bias gradient is a matrix-vector product: XLA:CPU
    sums a [rows, vocab] gradient over rows ~30x slower than it multiplies it by ones."""
    return x + bias


def _add_bias_fwd(x, bias):
    return x + bias, None


def _add_bias_bwd(_, g):
    rows = g.reshape(-1, g.shape[-1])
    return g, jnp.ones((rows.shape[0],), g.dtype) @ rows


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def gather_positions(x: jax.Array, positions: jax.Array) -> jax.Array:
    """x: [batch, length, hidden], positions: [batch, P] -> [batch, P, hidden]."""
    return jnp.take_along_axis(x, positions[..., None], axis=1)


class BertForMlm(nn.Module):
    """BERT with the MLM head applied only at the masked positions.

    Computing the output layer at `max_predictions` positions instead of every token is
    what makes the step cheap: at vocab 30522 the full-sequence output layer is most of
    BERT-tiny's FLOPs.
    """

    cfg: BertConfig

    def setup(self):
        self.backbone = TextEncoder(self.cfg)
        self.mlm_head = MlmHead(self.cfg.activation, self.cfg.layer_norm_eps, self.cfg.dtype)
        self.output_bias = self.param(
            'output_bias', zeros_init('vocab'), (self.cfg.vocab_size,), jnp.float32
        )

    def __call__(
        self, batch: dict[str, jax.Array], deterministic: bool = True, rows=None
    ) -> jax.Array:
        """batch: input_ids, input_mask, segment_ids [batch, length], masked_positions
        [batch, P]; rows: [batch] (TextEncoder). Returns logits [batch, P, vocab] in float32."""
        hidden = self.backbone(
            batch['input_ids'], batch['input_mask'], batch.get('segment_ids'), deterministic, rows
        )
        x = self.mlm_head(gather_positions(hidden, batch['masked_positions']))
        logits = add_bias(self.backbone.attend(x).astype(jnp.float32), self.output_bias)
        return nn.with_logical_constraint(logits, ('batch', 'length', 'act_vocab'))
