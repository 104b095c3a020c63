"""Online evaluation of frozen representations: weighted k-NN accuracy and a linear probe.

During contrastive pretraining the loss says little about how useful the features are, so the
trainer periodically embeds a labelled train split and a labelled held-out split, gathers the
features on the host (float32 [N, D], int labels [N]) and scores them here; the results go to
the metrics as `knn_accuracy` and `linear_probe_accuracy`.

These figures are eval rows: they pick a pretraining's best checkpoint. So both splits must
be training or validation data, never a downstream task's test split (the callers,
core/evaluators.py:FeatureProbe and the pretraining tasks, see to it); below, "test" names
whichever split is scored, which is validation data when a probe runs during pretraining.

- `knn_accuracy`: cosine-similarity k-NN with the temperature-weighted vote of Wu et al. 2018
  (InstDisc), as in the SimCLR/DINO evaluations. No training, no hyperparameter search: a
  cheap and stable signal that tracks the quality of the embedding geometry.
- `linear_probe_accuracy`: multinomial logistic regression on standardised features, trained
  full-batch with L-BFGS under one `jax.jit`. It measures linear separability, which k-NN can
  miss when the useful information lies in a few directions of a high-dimensional space.

Both are deterministic: same inputs, same numbers, so curves from resumed runs line up.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from core.errors import DataError

# The l2 values `select_l2` tries when `linear_probe_accuracy` is given no l2.
L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
# The part of the train split `select_l2` holds out to score them.
VAL_FRACTION = 0.2

# L-BFGS stops once the gradient norm falls below this or the loss stops decreasing by more
# than this fraction (float32 cannot resolve smaller changes; accuracy no longer moves).
_GRAD_TOL = 1e-5
_REL_DECREASE_TOL = 1e-7


# ----------------------------------------------------------------------------------------------
# Input checks


def _check_split(x, y, name: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (float32 [N, D] features, int32 [N] labels) of one split, or raises DataError."""
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim != 2:
        raise DataError(f'{name}_x must be 2-D [N, D], got shape {x.shape}')
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise DataError(f'{name}_x must hold numbers, got dtype {x.dtype}')
    if y.ndim != 1:
        raise DataError(f'{name}_y must be 1-D [N], got shape {y.shape}')
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f'{name}_y must hold integer class ids, got dtype {y.dtype}')
    if x.shape[0] != y.shape[0]:
        raise DataError(
            f'{name}_x has {x.shape[0]} rows but {name}_y has {y.shape[0]} labels; '
            'they must be the same examples'
        )
    if x.shape[0] == 0:
        raise DataError(f'{name} split is empty (0 examples); need at least one')
    if y.min() < 0 or y.max() >= num_classes:
        bad = y[(y < 0) | (y >= num_classes)]
        raise DataError(
            f'{name}_y must be in [0, num_classes={num_classes}), found {bad.size} label(s) '
            f'outside it, e.g. {int(bad[0])} (min {int(y.min())}, max {int(y.max())})'
        )
    x = x.astype(np.float32, copy=False)
    finite = np.isfinite(x)
    if not finite.all():
        raise DataError(
            f'{name}_x has {int(x.size - finite.sum())} non-finite value(s) (NaN/inf) in '
            f'{int((~finite.all(axis=1)).sum())} row(s): the encoder produced bad features'
        )
    return x, y.astype(np.int32, copy=False)


def _check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer):
        raise DataError(f'num_classes must be an int, got {num_classes!r}')
    if num_classes < 1:
        raise DataError(f'num_classes must be >= 1, got {num_classes}')


def _check_splits(train_x, train_y, test_x, test_y, num_classes: int):
    """Both splits checked, and their feature dimensions compared."""
    _check_num_classes(num_classes)
    train_x, train_y = _check_split(train_x, train_y, 'train', num_classes)
    test_x, test_y = _check_split(test_x, test_y, 'test', num_classes)
    if train_x.shape[1] != test_x.shape[1]:
        raise DataError(
            f'train_x has {train_x.shape[1]} features per example but test_x has '
            f'{test_x.shape[1]}; both splits must come from the same encoder'
        )
    return train_x, train_y, test_x, test_y


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise DataError(f'{name} must be an int >= 1, got {value!r}')
    return int(value)


def _check_positive_float(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise DataError(f'{name} must be a number, got {value!r}')
    if not np.isfinite(value) or value <= 0:
        raise DataError(f'{name} must be finite and > 0, got {value!r}')
    return float(value)


def _check_non_negative_float(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise DataError(f'{name} must be a number, got {value!r}')
    if not np.isfinite(value) or value < 0:
        raise DataError(f'{name} must be finite and >= 0, got {value!r}')
    return float(value)


# ----------------------------------------------------------------------------------------------
# k-NN


def _l2_normalise(x: jax.Array) -> jax.Array:
    """Rows scaled to unit norm; an all-zero row stays zero (similarity 0 to everything)."""
    return x * lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


@functools.partial(jax.jit, static_argnames=('num_classes', 'k'))
def _knn_predict_chunks(train_x, train_y, test_chunks, temperature, *, num_classes: int, k: int):
    """Predictions for test rows [num_chunks, chunk, D]: one [chunk, N_train] block at a time."""
    train_x = _l2_normalise(train_x)

    def predict(test_x):
        # [chunk, N_train]; full float32 precision (not TF32/bf16 passes on GPU/TPU), so the
        # neighbour ranking is the same on every backend.
        sims = jnp.matmul(_l2_normalise(test_x), train_x.T, precision=lax.Precision.HIGHEST)
        top_sims, top_idx = lax.top_k(sims, k)  # [chunk, k], most similar first
        # exp(sim / T), scaled per row by exp(-max sim / T) so no temperature overflows; a
        # common factor per row does not change which class wins. (The max rather than the
        # equal top_sims[:, :1]: slicing top_k's output loses XLA CPU's fast top-k path,
        # measured 10x slower on 1024 x 1500 similarities.)
        weights = jnp.exp((top_sims - jnp.max(top_sims, axis=-1, keepdims=True)) / temperature)
        # One-hot matmul instead of a scatter-add: the same sums on every backend, in the
        # same order (GPU scatters add in whatever order the atomics land).
        votes = jax.nn.one_hot(train_y[top_idx], num_classes, dtype=weights.dtype)
        scores = jnp.einsum('nk,nkc->nc', weights, votes)
        return jnp.argmax(scores, axis=-1).astype(jnp.int32)  # ties: lowest class id

    return lax.map(predict, test_chunks)


def _knn_predict_checked(train_x, train_y, test_x, num_classes, k, temperature, chunk):
    """`knn_predict` on inputs `_check_splits` has already passed."""
    k = min(_check_positive_int(k, 'k'), train_x.shape[0])
    chunk = min(_check_positive_int(chunk, 'chunk'), test_x.shape[0])
    temperature = _check_positive_float(temperature, 'temperature')
    num_test = test_x.shape[0]
    num_chunks = -(-num_test // chunk)
    padded = np.zeros((num_chunks * chunk, test_x.shape[1]), np.float32)
    padded[:num_test] = test_x
    preds = _knn_predict_chunks(
        train_x,
        train_y,
        padded.reshape(num_chunks, chunk, -1),
        np.float32(temperature),
        num_classes=int(num_classes),
        k=k,
    )
    return np.asarray(preds).reshape(-1)[:num_test]


def knn_predict(
    train_x,
    train_y,
    test_x,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> np.ndarray:
    """Predicted class [N_test] of each test row by temperature-weighted cosine k-NN.

    Features are l2-normalised; each test row takes its k most similar train rows and
    class c scores sum(exp(sim / temperature)) over those neighbours labelled c (Wu et al.
    2018); the prediction is the best-scoring class, the lowest class id on a tie. k is
    clipped to the number of train rows. Test rows go through in chunks of `chunk`, so the
    similarity matrix held at a time is [chunk, N_train] (plus a [chunk, k, num_classes]
    one-hot of the neighbours' labels).
    """
    no_labels = np.zeros(np.shape(test_x)[:1], np.int32)  # test labels are not needed here
    train_x, train_y, test_x, _ = _check_splits(train_x, train_y, test_x, no_labels, num_classes)
    return _knn_predict_checked(train_x, train_y, test_x, num_classes, k, temperature, chunk)


def knn_accuracy(
    train_x,
    train_y,
    test_x,
    test_y,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> float:
    """Fraction of test rows whose weighted cosine k-NN prediction (`knn_predict`) is right.

    The defaults (k=20, temperature=0.07) are those of the InstDisc/DINO k-NN evaluations, so
    numbers are comparable with theirs. Raises DataError (a ValueError) on malformed inputs.
    """
    train_x, train_y, test_x, test_y = _check_splits(train_x, train_y, test_x, test_y, num_classes)
    preds = _knn_predict_checked(train_x, train_y, test_x, num_classes, k, temperature, chunk)
    return float(np.mean(preds == test_y))


# ----------------------------------------------------------------------------------------------
# Linear probe


def _standardise_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std (float64 on the host, returned float32).

    A feature (nearly) constant on the train split gets std 1, as in scikit-learn's
    StandardScaler: dividing by a ~0 std would blow up whatever test rows differ there.
    """
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=0)
    std = x64.std(axis=0)
    floor = 1e-6 * max(float(std.max()), np.finfo(np.float32).tiny)
    std = np.where(std > floor, std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)


def _objective(params, x, y, l2):
    """Mean softmax cross-entropy plus l2 / 2 * ||w||^2 (the bias is not penalised)."""
    w, b = params
    logits = jnp.matmul(x, w, precision=lax.Precision.HIGHEST) + b  # exact f32 for L-BFGS
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce + 0.5 * l2 * jnp.sum(w * w)


@functools.partial(jax.jit, static_argnames=('num_classes',))
def _fit_lbfgs(x, y, l2, max_steps, *, num_classes: int):
    """L-BFGS (zoom linesearch) from zero weights; returns ((w, b), steps taken, final loss).

    The problem is strictly convex for l2 > 0, so the zero start loses nothing and makes the
    result independent of any seed. Stops after `max_steps` iterations, when the gradient
    norm drops below _GRAD_TOL, or when an iteration lowers the loss by less than
    _REL_DECREASE_TOL of it (float32 resolution: the linesearch can make no more progress).
    """
    fun = functools.partial(_objective, x=x, y=y, l2=l2)
    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(fun)
    params = (
        jnp.zeros((x.shape[1], num_classes), jnp.float32),
        jnp.zeros((num_classes,), jnp.float32),
    )

    def step(carry):
        params, state, _, count = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=fun)
        return optax.apply_updates(params, updates), state, value, count + 1

    def keep_going(carry):
        _, state, prev_value, count = carry
        value = optax.tree.get(state, 'value')  # at the current params, from the linesearch
        grad_norm = optax.tree.norm(optax.tree.get(state, 'grad'))
        stalled = prev_value - value <= _REL_DECREASE_TOL * jnp.maximum(jnp.abs(value), 1.0)
        return (count == 0) | ((count < max_steps) & (grad_norm > _GRAD_TOL) & ~stalled)

    init = (params, solver.init(params), jnp.array(jnp.inf, jnp.float32), jnp.array(0, jnp.int32))
    params, _, _, count = lax.while_loop(keep_going, step, init)
    return params, count, fun(params)


def linear_probe(
    train_x,
    train_y,
    *,
    num_classes: int,
    l2: float = 1e-4,
    steps: int = 500,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fits multinomial logistic regression on standardised features; returns (w, b, mean, std).

    Features are standardised with the train split's per-feature mean and std, then
    softmax(((x - mean) / std) @ w + b) is fitted full-batch by L-BFGS (at most `steps`
    iterations) minimising mean cross-entropy + l2 / 2 * ||w||^2. This l2 matches
    scikit-learn's LogisticRegression(C=1 / (l2 * N_train)). Deterministic (zero start, no
    sampling). w is float32 [D, num_classes], b [num_classes], mean and std [D].
    """
    _check_num_classes(num_classes)
    train_x, train_y = _check_split(train_x, train_y, 'train', num_classes)
    return _linear_probe_checked(train_x, train_y, num_classes, l2, steps)


def _linear_probe_checked(train_x, train_y, num_classes, l2, steps):
    """`linear_probe` on a train split `_check_split` has already passed."""
    l2 = _check_non_negative_float(l2, 'l2')
    steps = _check_positive_int(steps, 'steps')
    mean, std = _standardise_stats(train_x)
    (w, b), _, _ = _fit_lbfgs(
        (train_x - mean) / std,
        train_y,
        np.float32(l2),
        np.int32(steps),
        num_classes=int(num_classes),
    )
    return np.asarray(w), np.asarray(b), mean, std


def _probe_predict(w, b, mean, std, x: np.ndarray) -> np.ndarray:
    """Class predictions [N] of a fitted probe on float32 features [N, D]."""
    return np.argmax(((x - mean) / std) @ w + b, axis=-1)


def select_l2(
    train_x,
    train_y,
    *,
    num_classes: int,
    grid=L2_GRID,
    val_fraction: float = VAL_FRACTION,
    seed: int = 0,
    steps: int = 500,
) -> float:
    """The l2 of `grid` whose probe does best on a held-out part of the train split.

    A seeded shuffle holds out `val_fraction` of the train rows (at least one, and at least
    one is kept for fitting); a probe is fitted on the rest for every l2 in the grid and
    scored on the held-out rows. Best accuracy wins, ties broken by lower held-out
    cross-entropy, then by the larger l2. The test split is never looked at, so the probe's
    test accuracy stays an honest estimate. Deterministic for a given seed.
    """
    _check_num_classes(num_classes)
    train_x, train_y = _check_split(train_x, train_y, 'train', num_classes)
    return _select_l2_checked(train_x, train_y, num_classes, grid, val_fraction, seed, steps)


def _select_l2_checked(train_x, train_y, num_classes, grid, val_fraction, seed, steps):
    """`select_l2` on a train split `_check_split` has already passed."""
    grid = tuple(grid)
    if not grid:
        raise DataError('grid must hold at least one l2 value, got an empty grid')
    grid = tuple(_check_non_negative_float(v, 'every l2 in grid') for v in grid)
    if len(grid) == 1:
        return grid[0]
    if not 0.0 < float(val_fraction) < 1.0:
        raise DataError(f'val_fraction must be in (0, 1), got {val_fraction!r}')
    n = train_x.shape[0]
    if n < 2:
        raise DataError(
            f'choosing l2 needs at least 2 train examples (one to fit, one to validate), got '
            f'{n}; pass l2 explicitly'
        )
    num_val = min(max(int(round(n * float(val_fraction))), 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    val_idx, fit_idx = order[:num_val], order[num_val:]
    val_x, val_y = train_x[val_idx], train_y[val_idx]

    best_key, best_l2 = None, grid[0]
    for l2 in grid:
        w, b, mean, std = _linear_probe_checked(
            train_x[fit_idx], train_y[fit_idx], num_classes, l2, steps
        )
        logits = ((val_x - mean) / std) @ w + b
        accuracy = float(np.mean(np.argmax(logits, axis=-1) == val_y))
        log_z = np.logaddexp.reduce(logits.astype(np.float64), axis=-1)
        val_ce = float(np.mean(log_z - logits[np.arange(num_val), val_y]))
        key = (accuracy, -val_ce, l2)
        if best_key is None or key > best_key:
            best_key, best_l2 = key, l2
    return best_l2


def linear_probe_accuracy(
    train_x,
    train_y,
    test_x,
    test_y,
    *,
    num_classes: int,
    l2: float | None = None,
    steps: int = 500,
    seed: int = 0,
) -> float:
    """Test accuracy of a linear probe (`linear_probe`) fitted on the train split.

    With l2=None (the default) the penalty is chosen by `select_l2` on a held-out part of the
    train split (seeded by `seed`, which has no other use: the fit itself involves no
    randomness), at the cost of one extra fit per grid value; pass a float to skip that.
    Raises DataError (a ValueError) on malformed inputs.
    """
    train_x, train_y, test_x, test_y = _check_splits(train_x, train_y, test_x, test_y, num_classes)
    if l2 is None:
        l2 = _select_l2_checked(train_x, train_y, num_classes, L2_GRID, VAL_FRACTION, seed, steps)
    w, b, mean, std = _linear_probe_checked(train_x, train_y, num_classes, l2, steps)
    return float(np.mean(_probe_predict(w, b, mean, std, test_x) == test_y))
