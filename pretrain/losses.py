"""Pretraining losses as pure functions returning sums and a denominator."""

import jax.numpy as jnp

from core.losses import weighted_cross_entropy


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
