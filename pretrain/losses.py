"""Pretraining losses as pure functions returning sums and a denominator."""

import jax
import jax.numpy as jnp
import optax


def weighted_cross_entropy(
    logits: jax.Array, targets: jax.Array, weights: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """logits: [..., vocab] (float32), targets and weights: [...].

    Returns (summed weighted loss, summed weighted correct predictions, summed weight).
    """
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    # "The target scores highest" (ties count as correct): the same as argmax == target
    # but for exact ties, and a plain max-reduction is ~20x faster than argmax on XLA:CPU.
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = (target_logit >= jnp.max(logits, axis=-1)).astype(jnp.float32)
    return jnp.sum(losses * weights), jnp.sum(correct * weights), jnp.sum(weights)


def mlm_loss_fn(model):
    """Builds `loss_fn(params, batch, rng, train, rows)` for a `BertForMlm`-like model.

    batch: input_ids, input_mask, segment_ids [batch, length]; masked_positions,
    masked_ids, masked_weights [batch, max_predictions] (weight 0 marks padding).
    """

    def loss_fn(params, batch, rng, train: bool, rows=None):
        logits = model.apply(
            {'params': params}, batch, not train, rows, rngs={'dropout': rng}
        )  # [batch, max_predictions, vocab]
        weights = batch['masked_weights'].astype(jnp.float32)
        loss_sum, correct, denominator = weighted_cross_entropy(
            logits, batch['masked_ids'], weights
        )
        return loss_sum, {'mlm_accuracy': correct, 'denominator': denominator}

    return loss_fn
