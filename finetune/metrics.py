"""Evaluation metrics of fine-tuned classifiers, regressors and taggers, in numpy on the host.

scikit-learn computes accuracy, macro F1 and the Matthews correlation, scipy Pearson and
Spearman (average ranks for ties), so the figures compare with published ones. This module
checks the inputs (a DataError names the fault) and handles the degenerate cases. Entity F1
of token classification is written here, as seqeval scores it (seqeval is not a dependency).

Degenerate cases return 0.0 instead of NaN, so that metrics rows stay numbers that plots
and best-checkpoint selection can compare: the Matthews correlation when only one class is
predicted (or present), a correlation when the targets or the predictions are constant.
Non-finite regression predictions (a diverged model) give NaN correlations, on purpose.
"""

import re
import warnings
from collections.abc import Sequence

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


_TAG = re.compile(r'([BIES])-(.+)')


def _split_tag(tag: str) -> tuple[str, str]:
    """'B-PER' -> ('B', 'PER'), 'O' -> ('O', '')."""
    if tag == 'O':
        return 'O', ''
    match = _TAG.fullmatch(tag)
    if match is None:
        raise DataError(
            f'tag {tag!r} is not an IOB2 / IOBES tag; expected "O" or a prefix B-, I-, E-, S- '
            'and an entity type ("B-PER"); integer tag ids (as some datasets store them) must '
            'be mapped to their names first'
        )
    return match.group(1), match.group(2)


def entity_chunks(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entity chunks (type, start, end exclusive) of one tag sequence.

    A chunk starts at B-X or S-X, and at I-X / E-X that does not continue a chunk of type X
    (after O, after another type, or after a chunk that ended with E- / S-); it ends before
    a B-, S-, O or a tag of another type, and after E- / S-. This is how seqeval's default
    (conlleval) mode reads tags, so an ill-formed I-X still counts as an entity."""
    chunks = []
    start, chunk_type, prev_prefix = None, '', 'O'
    for i, tag in enumerate(tags):
        prefix, kind = _split_tag(tag)
        continues = (
            start is not None
            and kind == chunk_type
            and prefix in ('I', 'E')
            and prev_prefix in ('B', 'I')
        )
        if start is not None and not continues:
            chunks.append((chunk_type, start, i))
            start = None
        if prefix != 'O' and start is None:
            start, chunk_type = i, kind
        if prefix in ('E', 'S') and start is not None:
            chunks.append((chunk_type, start, i + 1))
            start = None
        prev_prefix = prefix
    if start is not None:
        chunks.append((chunk_type, start, len(tags)))
    return chunks


def entity_f1(true_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]]) -> dict:
    """Micro precision, recall and F1 over entity chunks, as seqeval scores NER by default.

    A predicted chunk is correct only when its type, start and end all match a true chunk
    (a partial chunk is a miss). Returns `precision`, `recall`, `f1` (0.0 when undefined:
    no predicted or no true chunks) and the counts `true_entities`, `pred_entities`,
    `correct_entities`."""
    if len(true_tags) != len(pred_tags):
        raise DataError(
            f'expected predictions for every sentence, found {len(true_tags)} true and '
            f'{len(pred_tags)} predicted sentences'
        )
    n_true = n_pred = n_correct = 0
    for s, (true, pred) in enumerate(zip(true_tags, pred_tags)):
        if len(true) != len(pred):
            raise DataError(
                f'sentence {s}: {len(true)} true tags but {len(pred)} predicted; predict a tag '
                'for every word (words cut by truncation as "O")'
            )
        true_chunks = set(entity_chunks(true))
        pred_chunks = set(entity_chunks(pred))
        n_true += len(true_chunks)
        n_pred += len(pred_chunks)
        n_correct += len(true_chunks & pred_chunks)
    precision = n_correct / n_pred if n_pred else 0.0
    recall = n_correct / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        'precision': precision,
        'recall': recall,
        'f1': f1,
        'true_entities': n_true,
        'pred_entities': n_pred,
        'correct_entities': n_correct,
    }
