"""Evaluation metrics of fine-tuned classifiers and regressors, in numpy on the host.

scikit-learn computes accuracy, macro F1 and the Matthews correlation, scipy Pearson and
Spearman (average ranks for ties), so the figures compare with published ones. This module
checks the inputs (a DataError names the fault) and handles the degenerate cases.

Degenerate cases return 0.0 instead of NaN, so that metrics rows stay numbers that plots
and best-checkpoint selection can compare: the Matthews correlation when only one class is
predicted (or present), a correlation when the targets or the predictions are constant.
Non-finite regression predictions (a diverged model) give NaN correlations, on purpose.
"""

import warnings

import numpy as np
from scipy import stats
from sklearn import metrics as sk_metrics

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


def _check_class_ids(name: str, ids: np.ndarray, num_classes: int) -> None:
    if ids.dtype.kind not in 'iub':
        raise DataError(f'expected integer class ids in {name}, found dtype {ids.dtype}')
    if ids.min() < 0 or ids.max() >= num_classes:
        raise DataError(
            f'{name} hold class ids from {ids.min()} to {ids.max()}, outside 0..'
            f"{num_classes - 1} for num_classes={num_classes}; pass the label map's "
            'num_classes'
        )


def classification_metrics(labels, predictions, num_classes: int) -> dict[str, float]:
    """`accuracy`, `macro_f1` and `matthews_corrcoef` of predicted class ids.

    `macro_f1` averages the per-class F1 over the classes that occur in the labels or the
    predictions (scikit-learn's `f1_score(average='macro')`): a class absent from both has
    no defined F1 and is left out rather than counted as 0. `matthews_corrcoef` is the
    multi-class MCC (Gorodkin's R_K); scikit-learn gives 0.0 when it is undefined (a single
    class predicted, or a single class in the labels)."""
    labels, predictions = _check_pair('labels', labels, 'predictions', predictions)
    _check_class_ids('labels', labels, num_classes)
    _check_class_ids('predictions', predictions, num_classes)
    with warnings.catch_warnings():
        # One class in labels and predictions alike: the MCC's 0.0 is the answer, not a misuse.
        warnings.filterwarnings('ignore', 'A single label was found', UserWarning)
        mcc = sk_metrics.matthews_corrcoef(labels, predictions)
    return {
        'accuracy': float(sk_metrics.accuracy_score(labels, predictions)),
        'macro_f1': float(sk_metrics.f1_score(labels, predictions, average='macro')),
        'matthews_corrcoef': float(mcc),
    }


def _correlation(statistic, x: np.ndarray, y: np.ndarray) -> float:
    """scipy's `statistic` (pearsonr, spearmanr), 0.0 rather than NaN when a side is constant."""
    if np.ptp(x) == 0 or np.ptp(y) == 0:  # tested before centring, which leaves rounding noise
        return 0.0
    return float(statistic(x, y).statistic)


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
        'pearson': _correlation(stats.pearsonr, targets, predictions),
        'spearman': _correlation(stats.spearmanr, targets, predictions),
        'mse': mse,
    }
