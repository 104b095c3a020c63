"""Evaluation metrics of fine-tuned classifiers and regressors, in numpy on the host.

Definitions follow scikit-learn / scipy (accuracy, macro F1, Matthews correlation,
Pearson, Spearman with average ranks for ties), so the figures compare with published
ones, without making either library a dependency of the core path.

Degenerate cases return 0.0 instead of NaN, so that metrics rows stay numbers that plots
and best-checkpoint selection can compare: the Matthews correlation when only one class is
predicted (or present), a correlation when the targets or the predictions are constant.
Non-finite regression predictions (a diverged model) give NaN correlations, on purpose.
"""

import numpy as np

from core.errors import DataError


def _as_1d(name: str, values) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim != 1:
        raise DataError(f'expected {name} of shape [N], found shape {values.shape}')
    return values


def _check_pair(a_name: str, a, b_name: str, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_1d(a_name, a), _as_1d(b_name, b)
    if len(a) != len(b):
        raise DataError(
            f'expected as many {b_name} as {a_name}, found {len(b)} and {len(a)}; score the '
            'predictions of exactly the evaluated examples'
        )
    if len(a) == 0:
        raise DataError(f'no {a_name} to score: the eval set is empty; give it examples')
    return a, b


def confusion_matrix(labels, predictions, num_classes: int) -> np.ndarray:
    """int64 [num_classes, num_classes]: row = true class, column = predicted class."""
    labels, predictions = _check_pair('labels', labels, 'predictions', predictions)
    for name, ids in (('labels', labels), ('predictions', predictions)):
        if ids.dtype.kind not in 'iub':
            raise DataError(f'expected integer class ids in {name}, found dtype {ids.dtype}')
        if ids.min() < 0 or ids.max() >= num_classes:
            raise DataError(
                f'{name} hold class ids from {ids.min()} to {ids.max()}, outside 0..'
                f"{num_classes - 1} for num_classes={num_classes}; pass the label map's "
                'num_classes'
            )
    flat = labels.astype(np.int64) * num_classes + predictions.astype(np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_metrics(labels, predictions, num_classes: int) -> dict[str, float]:
    """`accuracy`, `macro_f1` and `matthews_corrcoef` of predicted class ids.

    `macro_f1` averages the per-class F1 over the classes that occur in the labels or the
    predictions (scikit-learn's `f1_score(average='macro')`): a class absent from both has
    no defined F1 and is left out rather than counted as 0. `matthews_corrcoef` is the
    multi-class MCC (Gorodkin's R_K, as scikit-learn computes it); 0.0 when it is undefined
    (a single class predicted, or a single class in the labels)."""
    c = confusion_matrix(labels, predictions, num_classes).astype(np.float64)
    n = c.sum()
    correct = np.trace(c)
    true_counts = c.sum(axis=1)
    pred_counts = c.sum(axis=0)
    tp = np.diag(c)
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (true count + predicted count).
    denominators = true_counts + pred_counts
    present = denominators > 0
    macro_f1 = float(np.mean(2 * tp[present] / denominators[present]))
    cov_true_pred = correct * n - true_counts @ pred_counts
    cov_pred = n * n - pred_counts @ pred_counts
    cov_true = n * n - true_counts @ true_counts
    mcc = 0.0 if cov_pred * cov_true == 0 else cov_true_pred / np.sqrt(cov_pred * cov_true)
    return {
        'accuracy': float(correct / n),
        'macro_f1': macro_f1,
        'matthews_corrcoef': float(mcc),
    }


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; 0.0 when either side is constant."""
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        return float('nan')
    if np.ptp(x) == 0 or np.ptp(y) == 0:  # tested before centring, which leaves rounding noise
        return 0.0
    x = x - x.mean()
    y = y - y.mean()
    norm = np.sqrt(x @ x) * np.sqrt(y @ y)
    # Clipped: rounding can put a perfect correlation a hair outside [-1, 1].
    return float(np.clip((x @ y) / norm, -1.0, 1.0))


def average_ranks(values) -> np.ndarray:
    """1-based ranks of `values`, ties given the mean of the ranks they span (as
    scipy.stats.rankdata's default)."""
    values = _as_1d('values', values)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # last rank of each distinct value
    starts = ends - counts + 1  # first rank
    return ((starts + ends) / 2.0)[inverse.reshape(-1)]


def regression_metrics(targets, predictions) -> dict[str, float]:
    """`pearson`, `spearman` (Pearson of average ranks) and `mse` of predicted values.

    Correlations are 0.0 when the targets or the predictions are constant (undefined);
    NaN when a prediction is not finite. DataError for non-finite targets."""
    targets, predictions = _check_pair('targets', targets, 'predictions', predictions)
    targets = targets.astype(np.float64)
    predictions = predictions.astype(np.float64)
    if not np.all(np.isfinite(targets)):
        raise DataError(
            f'{int(np.sum(~np.isfinite(targets)))} regression targets are NaN or infinite; '
            'fix the label column of the eval data'
        )
    mse = float(np.mean((targets - predictions) ** 2))
    if not np.all(np.isfinite(predictions)):
        return {'pearson': float('nan'), 'spearman': float('nan'), 'mse': mse}
    return {
        'pearson': _pearson(targets, predictions),
        'spearman': _pearson(average_ranks(targets), average_ranks(predictions)),
        'mse': mse,
    }
