import jax
import jax.numpy as jnp
import numpy as np

from core.losses import weighted_cross_entropy


def test_weighted_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 5, 11)).astype(np.float32)
    targets = rng.integers(0, 11, (4, 5))
    targets[0, :3] = logits[0, :3].argmax(-1)  # some correct predictions
    weights = (rng.random((4, 5)) < 0.7).astype(np.float32)
    loss, correct, denom = weighted_cross_entropy(
        jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights)
    )
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(loss, (nll * weights).sum(), rtol=1e-5)
    np.testing.assert_allclose(correct, ((logits.argmax(-1) == targets) * weights).sum())
    assert denom == weights.sum() and correct >= weights[0, :3].sum()


def test_padding_weights_contribute_nothing():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 7))
    targets = jnp.zeros((2, 3), jnp.int32)
    w = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    full = weighted_cross_entropy(logits, targets, w)
    changed = weighted_cross_entropy(logits.at[0, 2].set(100.0).at[1, 1:].set(-5.0), targets, w)
    np.testing.assert_allclose(full, changed, rtol=1e-6)
