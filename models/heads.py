"""Heads that sit on an encoder: the projection MLP of contrastive learning, pooling of
text tokens."""

import jax
import jax.numpy as jnp
from flax import linen as nn

from models.encoder import ACTIVATIONS, Dtype, dense_init, zeros_init


class ProjectionHead(nn.Module):
    """The MLP between the representation and the contrastive loss (SimCLR's g(.)):
    `num_layers` Dense layers, the activation between them. Used for the loss only and
    dropped for transfer, where the representation before it transfers better (Chen et
    al. 2020, section 4.2)."""

    hidden_dim: int
    out_dim: int
    num_layers: int = 2
    activation: str = 'gelu'
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers - 1):
            x = nn.Dense(
                self.hidden_dim,
                dtype=self.dtype,
                kernel_init=dense_init('embed' if i == 0 else None, 'mlp'),
                bias_init=zeros_init('mlp'),
                name=f'hidden_{i}',
            )(x)
            x = ACTIVATIONS[self.activation](x)
        return nn.Dense(
            self.out_dim,
            dtype=self.dtype,
            kernel_init=dense_init('mlp' if self.num_layers > 1 else 'embed', None),
            bias_init=zeros_init(None),
            name='out',
        )(x)


def pool_tokens(hidden: jax.Array, input_mask: jax.Array, pooling: str) -> jax.Array:
    """[batch, length, hidden] -> [batch, hidden]: the [CLS] token, or the mean over the
    real (mask 1) tokens."""
    if pooling == 'cls':
        return hidden[:, 0]
    if pooling == 'mean':
        mask = input_mask.astype(hidden.dtype)[..., None]
        return jnp.sum(hidden * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
    raise ValueError(f'model.pooling={pooling!r}; expected cls or mean')
