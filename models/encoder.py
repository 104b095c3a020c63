"""The Transformer encoder shared by the text (BERT) and image (ViT) models.

Every parameter is created with logical axis names (`embed`, `mlp`, `heads`, `kv`, ...);
`core/sharding.py` maps them to mesh axes. Activations are constrained at a few chosen
points with logical names (`batch`, `length`, `act_embed`, `act_mlp`, `act_heads`).

Two layouts of an encoder's layer parameters, the same numbers either way:
  unscanned  encoder/layer_0/..., ..., encoder/layer_{L-1}/...   (checkpoints, imports)
  scanned    encoder/layers/...  every leaf stacked: [L, ...], leading axis named `layers`
`stack_layers` / `unstack_layers` convert a parameter tree between them.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import linen as nn

Dtype = jnp.dtype | str

# BERT and ViT both initialise weights from a truncated normal with std 0.02.
default_kernel_init = nn.initializers.truncated_normal(stddev=0.02)

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),  # BERT's erf GELU
    'gelu_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'relu': jax.nn.relu,
}


class FromConfig:
    """`from_config` of an architecture dataclass (BertConfig, VitConfig)."""

    @classmethod
    def from_config(cls, model_config, **overrides):
        """Builds from a `config.model` ConfigDict (extra keys there are ignored); the
        `overrides` (e.g. dtype=) win."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in dict(model_config).items() if k in fields}
        return cls(**{**values, **overrides})


def dense_init(*axes: str | None) -> Callable:
    return nn.with_logical_partitioning(default_kernel_init, axes)


def zeros_init(*axes: str | None) -> Callable:
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def layer_norm(eps: float, dtype: Dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ('norm',)),
        bias_init=zeros_init('norm'),
        name=name,
    )


def example_rows(rows: jax.Array | None, batch: int) -> jax.Array:
    """`rows` ([batch] int), or 0 .. batch - 1 when None (the batch is the whole step)."""
    return jnp.arange(batch, dtype=jnp.int32) if rows is None else rows


class ExampleDropout(nn.Module):
    """Dropout whose mask for example b is drawn from fold_in(key, rows[b]), `rows` being each
    example's row in the step's global batch: the masks depend on the key (seed, step,
    module) and the row only, not on how the batch is split over devices or micro-batches
    (one draw over the local batch would depend on which rows a device holds)."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, rows: jax.Array | None, deterministic: bool) -> jax.Array:
        """x: [batch, ...]; rows: [batch] int, or None (0 .. batch - 1)."""
        if deterministic or self.rate == 0.0:
            return x
        if self.rate == 1.0:
            return jnp.zeros_like(x)
        keep = 1.0 - self.rate
        key = self.make_rng('dropout')

        def example_mask(row):
            return jax.random.bernoulli(jax.random.fold_in(key, row), keep, x.shape[1:])

        mask = jax.vmap(example_mask)(example_rows(rows, x.shape[0]))
        return jax.lax.select(mask, x / keep, jnp.zeros_like(x))


class MlpBlock(nn.Module):
    """Position-wise feed-forward block: Dense -> activation -> Dense."""

    mlp_dim: int
    activation: str = 'gelu'
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = x.shape[-1]
        y = nn.Dense(
            self.mlp_dim,
            dtype=self.dtype,
            kernel_init=dense_init('embed', 'mlp'),
            bias_init=zeros_init('mlp'),
            name='wi',
        )(x)
        y = ACTIVATIONS[self.activation](y)
        y = nn.with_logical_constraint(y, ('batch', 'length', 'act_mlp'))
        return nn.Dense(
            hidden,
            dtype=self.dtype,
            kernel_init=dense_init('mlp', 'embed'),
            bias_init=zeros_init('embed'),
            name='wo',
        )(y)


class Projection(nn.Module):
    """A multi-dimensional linear map (einsum + bias) with named kernel axes.

    Written out (rather than nn.DenseGeneral) so the kernel is created in its final shape:
    DenseGeneral initialises a flat kernel and reshapes it, which clashes with logical
    sharding constraints on the named axes.
    """

    kernel_shape: tuple[int, ...]  # contracted input dims first, then output dims
    kernel_axes: tuple[str, ...]
    in_dims: int  # how many leading kernel dims contract with the input
    equation: str
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param('kernel', dense_init(*self.kernel_axes), self.kernel_shape)
        bias = self.param(
            'bias', zeros_init(*self.kernel_axes[self.in_dims :]), self.kernel_shape[self.in_dims :]
        )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return jnp.einsum(self.equation, x, kernel) + bias


ATTENTION_IMPLS = ('auto', 'xla', 'cudnn')


def attention_impl(choice: str, dtype, head_dim: int, backend: str | None = None) -> str:
    """The `implementation` that `jax.nn.dot_product_attention` is called with.

    That op's own default (None) is XLA's unfused softmax(QK^T)V on every backend; cuDNN's
    fused flash attention must be asked for. 'auto' asks for it where it applies: a GPU,
    bf16 or fp16 compute, and a head size that is a multiple of 8 up to 128 (BERT and ViT
    use 64); everywhere else it is 'xla'. 'cudnn' insists (an error off a GPU)."""
    if choice not in ATTENTION_IMPLS:
        raise ValueError(f'model.attention_impl={choice!r}; expected one of {ATTENTION_IMPLS}')
    backend = backend or jax.default_backend()
    if choice == 'cudnn' and backend != 'gpu':
        raise ValueError(
            f"model.attention_impl='cudnn' needs an NVIDIA GPU, and this run's backend is "
            f'{backend!r}; use --config.model.attention_impl=auto (or xla)'
        )
    if choice != 'auto':
        return choice
    fused = (
        backend == 'gpu'
        and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
        and head_dim % 8 == 0
        and head_dim <= 128
    )
    return 'cudnn' if fused else 'xla'


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection.

    Attention runs through `jax.nn.dot_product_attention`, as cuDNN's fused flash attention
    on a GPU in bf16/fp16 (`attention_impl`, see `attention_impl()`). That op has no
    attention-probability dropout, so a non-zero `attention_dropout_rate` switches to the
    explicit einsum path during training.
    """

    num_heads: int
    attention_dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    attention_impl: str = 'auto'  # auto | xla | cudnn

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None,
        deterministic: bool,
        rows: jax.Array | None = None,
    ) -> jax.Array:
        """x: [batch, length, hidden]; mask: [batch, 1, 1, length] (True = attend); rows:
        [batch], the examples' rows in the step's batch (ExampleDropout)."""
        hidden = x.shape[-1]
        if hidden % self.num_heads:
            raise ValueError(
                f'hidden size {hidden} is not divisible by num_heads {self.num_heads}; '
                'pick model.num_heads that divides model.hidden_size'
            )
        head_dim = hidden // self.num_heads
        qkv = Projection(
            (hidden, 3, self.num_heads, head_dim),
            ('embed', 'qkv', 'heads', 'kv'),
            1,
            'btd,dshk->btshk',
            self.dtype,
            name='qkv',
        )(x)
        # qkv: [batch, length, 3, heads, head_dim]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = nn.with_logical_constraint(q, ('batch', 'length', 'act_heads', 'act_kv'))
        if self.attention_dropout_rate > 0.0 and not deterministic:
            out = self._attention_with_dropout(q, k, v, mask, rows)
        else:
            out = self._fused_attention(q, k, v, mask, head_dim)
        out = nn.with_logical_constraint(out, ('batch', 'length', 'act_heads', 'act_kv'))
        return Projection(
            (self.num_heads, head_dim, hidden),
            ('heads', 'kv', 'embed'),
            2,
            'bthk,hkd->btd',
            self.dtype,
            name='out',
        )(out)

    def _fused_attention(self, q, k, v, mask, head_dim: int):
        if attention_impl(self.attention_impl, self.dtype, head_dim) == 'xla':
            return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation='xla')
        # cuDNN takes padding as lengths, not a mask (a [B, 1, 1, S] mask is refused): the
        # number of real tokens, which come first (every pretrax pipeline and HF tokenizer
        # pads at the end). Queries keep their full length, so padded positions attend to
        # the real tokens, as on the XLA path.
        lengths = None if mask is None else jnp.sum(mask[:, 0, 0, :], -1, dtype=jnp.int32)
        try:
            return jax.nn.dot_product_attention(
                q, k, v, key_value_seq_lengths=lengths, implementation='cudnn'
            )
        except (NotImplementedError, ValueError, RuntimeError) as e:  # jax's trace-time checks
            if self.attention_impl == 'cudnn':
                raise
            logging.warning('cuDNN flash attention does not apply (%s); using XLA attention', e)
            return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation='xla')

    def _attention_with_dropout(self, q, k, v, mask, rows):
        scale = q.shape[-1] ** -0.5
        logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) * scale
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        probs = ExampleDropout(self.attention_dropout_rate)(probs, rows, deterministic=False)
        return jnp.einsum('bhqk,bkhd->bqhd', probs, v)


class EncoderLayer(nn.Module):
    """One Transformer block, post-LN (BERT) or pre-LN (ViT)."""

    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    activation: str = 'gelu'
    layer_norm: Literal['post', 'pre'] = 'post'
    layer_norm_eps: float = 1e-12
    dtype: Dtype = jnp.float32
    attention_impl: str = 'auto'

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None,
        deterministic: bool,
        rows: jax.Array | None = None,
    ) -> jax.Array:
        attention = SelfAttention(
            self.num_heads,
            self.attention_dropout_rate,
            self.dtype,
            self.attention_impl,
            name='attention',
        )
        mlp = MlpBlock(self.mlp_dim, self.activation, self.dtype, name='mlp')
        dropout = ExampleDropout(self.dropout_rate)

        def drop(y):
            return dropout(y, rows, deterministic)

        ln_attn = layer_norm(self.layer_norm_eps, self.dtype, 'ln_attention')
        ln_mlp = layer_norm(self.layer_norm_eps, self.dtype, 'ln_mlp')
        if self.layer_norm == 'post':
            x = ln_attn(x + drop(attention(x, mask, deterministic, rows)))
            x = ln_mlp(x + drop(mlp(x)))
        else:
            x = x + drop(attention(ln_attn(x), mask, deterministic, rows))
            x = x + drop(mlp(ln_mlp(x)))
        x = nn.with_logical_constraint(x, ('batch', 'length', 'act_embed'))
        # The layer's output, kept only when an apply makes 'intermediates' mutable
        # (distillation's hidden-state matching, finetune/distill.py); else a no-op.
        self.sow('intermediates', 'hidden', x)
        return x


class Pooler(nn.Module):
    """BERT's (and Hugging Face ViT's) pooler: Dense + tanh on the first token ([CLS]).
    [batch, length, hidden] -> [batch, hidden]. Optional (`model.pooler`): checkpoints
    that carry one (imported BERT / ViT) keep it, so their pooled output is reproduced."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.Dense(
            x.shape[-1],
            dtype=self.dtype,
            kernel_init=dense_init('embed', 'mlp'),
            bias_init=zeros_init('mlp'),
            name='dense',
        )(x[:, 0])
        return jnp.tanh(y)


LAYERS = 'layers'  # the scanned Encoder's layer subtree, and the logical name of its axis


def _layer_keys(encoder: Mapping) -> list[str]:
    """layer_0 ... layer_{L-1} of an unscanned encoder's params (checked contiguous)."""
    found = sorted(int(k[len('layer_') :]) for k in encoder if k.startswith('layer_'))
    if found != list(range(len(found))):
        raise ValueError(f'encoder layers {found} are not layer_0 ... layer_{len(found) - 1}')
    return [f'layer_{i}' for i in found]


def _stack(encoder: Mapping, stack: Callable[[list], Any]) -> dict:
    keys = _layer_keys(encoder)
    if not keys:
        return dict(encoder)
    rest = {k: v for k, v in encoder.items() if k not in keys}
    stacked = jax.tree.map(lambda *xs: stack(list(xs)), *(encoder[k] for k in keys))
    return {**rest, LAYERS: stacked}


def _unstack(encoder: Mapping, split: Callable[[Any], list]) -> dict:
    if LAYERS not in encoder:
        return dict(encoder)
    rest = {k: v for k, v in encoder.items() if k != LAYERS}
    leaves, treedef = jax.tree.flatten(encoder[LAYERS])
    columns = [split(x) for x in leaves]  # per leaf, its value in each layer
    layers = {
        f'layer_{i}': treedef.unflatten([c[i] for c in columns]) for i in range(len(columns[0]))
    }
    return {**rest, **layers}


def _map_encoders(tree, convert: Callable[[Mapping], dict], like=None):
    """`convert` applied to every `encoder` subtree of a nested dict (at any depth); with
    `like`, only to those whose layout differs from the encoder at the same place there."""
    if not isinstance(tree, Mapping):
        return tree
    out = {}
    for key, value in tree.items():
        other = like.get(key) if isinstance(like, Mapping) else None
        if key == 'encoder' and isinstance(value, Mapping):
            differs = isinstance(other, Mapping) and (LAYERS in value) != (LAYERS in other)
            if like is None or differs:
                value = convert(value)
            out[key] = value
        else:
            out[key] = _map_encoders(value, convert, other if like is not None else None)
    return out


def stack_layers(tree, stack: Callable[[list], Any] = np.stack):
    """Unscanned -> scanned layout: in every `encoder` subtree, layer_0 ... layer_{L-1}
    become one `layers` subtree whose leaves are the per-layer leaves stacked on a new
    leading axis of size L. `stack` joins one leaf's per-layer values (jnp.stack under jit;
    core/checkpoint.py passes one for sharded ShapeDtypeStructs)."""
    return _map_encoders(tree, lambda e: _stack(e, stack))


def unstack_layers(tree, split: Callable[[Any], list] = list):
    """Scanned -> unscanned layout, the inverse of `stack_layers`. `split` cuts one leaf
    into its per-layer values (default: iterate over the leading axis)."""
    return _map_encoders(tree, lambda e: _unstack(e, split))


def match_layout(tree, like, stack: Callable = np.stack, split: Callable = list):
    """`tree` with each encoder converted to the layout of the encoder at the same place
    in `like` (a tree of the same model, or its checkpoint's metadata); the rest as is."""

    def convert(encoder: Mapping) -> dict:
        return _unstack(encoder, split) if LAYERS in encoder else _stack(encoder, stack)

    return _map_encoders(tree, convert, like)


REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _scan_body(layer: nn.Module, x: jax.Array, mask, deterministic: bool, rows):
    return layer(x, mask, deterministic, rows), None  # nn.scan's (carry, output)


class Encoder(nn.Module):
    """A stack of `num_layers` EncoderLayers (+ a final LayerNorm for pre-LN).

    `remat` trades compute for memory: 'none' keeps every activation, 'dots' keeps only
    matmul outputs, 'full' recomputes each layer in the backward pass.
    `scan_layers` runs one traced layer `num_layers` times (nn.scan) instead of unrolling
    them: XLA compiles one layer, not num_layers. Its params are the stacked layout
    (`encoder/layers/`, see the module docstring); dropout masks still differ per layer.
    """

    num_layers: int
    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    activation: str = 'gelu'
    layer_norm: Literal['post', 'pre'] = 'post'
    layer_norm_eps: float = 1e-12
    remat: str = 'none'
    scan_layers: bool = False
    dtype: Dtype = jnp.float32
    attention_impl: str = 'auto'

    @classmethod
    def of(cls, cfg, **overrides) -> 'Encoder':
        """The encoder a model config describes (BertConfig, VitConfig): each of these
        fields that the config has, then `overrides`."""
        fields = [f.name for f in dataclasses.fields(cls) if f.name not in ('parent', 'name')]
        return cls(**{**{k: getattr(cfg, k) for k in fields if hasattr(cfg, k)}, **overrides})

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        padding_mask: jax.Array | None = None,
        deterministic: bool = True,
        rows: jax.Array | None = None,
    ) -> jax.Array:
        """x: [batch, length, hidden]; padding_mask: [batch, length] (1 = real token; the
        real tokens first, padding after, wherever cuDNN attention runs); rows: [batch], the
        examples' rows in the step's batch, which their dropout masks depend on (None: 0 ..
        batch - 1)."""
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f'model.remat={self.remat!r}; expected one of {list(REMAT_POLICIES)}')
        rows = example_rows(rows, x.shape[0])
        mask = None
        if padding_mask is not None:
            mask = padding_mask.astype(bool)[:, None, None, :]  # [batch, 1, 1, length]
        layer_cls = EncoderLayer
        if self.remat != 'none':
            layer_cls = nn.remat(
                EncoderLayer,
                policy=REMAT_POLICIES[self.remat],
                static_argnums=(3,),  # deterministic
                prevent_cse=not self.scan_layers,  # scan already keeps XLA from merging
            )
        layer_args = dict(
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            dropout_rate=self.dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate,
            activation=self.activation,
            layer_norm=self.layer_norm,
            layer_norm_eps=self.layer_norm_eps,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
        )
        if self.scan_layers:
            scan = nn.scan(
                _scan_body,
                variable_axes={'params': 0, 'intermediates': 0},
                split_rngs={'params': True, 'dropout': True},  # per-layer init and masks
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),  # mask, deterministic, rows
                length=self.num_layers,
                metadata_params={nn.PARTITION_NAME: LAYERS},
            )
            x, _ = scan(layer_cls(**layer_args, name=LAYERS), x, mask, deterministic, rows)
        else:
            for i in range(self.num_layers):
                x = layer_cls(**layer_args, name=f'layer_{i}')(x, mask, deterministic, rows)
        if self.layer_norm == 'pre':
            x = layer_norm(self.layer_norm_eps, self.dtype, 'ln_final')(x)
        return x
