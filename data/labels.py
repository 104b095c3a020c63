"""Label maps for sequence classification and regression: label strings <-> class ids.

Labels stay strings until a `LabelMap`, fitted on the training labels and saved in the
workdir, turns them into ids, so train, eval and a later `evaluate` run agree on the ids.
Numeric-looking labels sort by value; two texts of one number are refused, not merged.
"""

import json
import math
import os
from collections.abc import Iterable, Sequence

import numpy as np

from core.errors import ConfigError, DataError
from core.files import atomic_write

_MAX_LISTED = 5  # unknown or bad labels named in an error message
_MAX_KNOWN_LISTED = 30  # training labels named in an error message


def _listed(values: Sequence, limit: int) -> str:
    """`values` as a short list for an error message: the first `limit` and a count."""
    values = list(values)
    shown = repr(values[:limit])
    return shown if len(values) <= limit else f'{shown} (and {len(values) - limit} more)'


def _as_number(label: str) -> float | None:
    """The value of a numeric-looking label ('2', '-0.5', '1e3'); None otherwise (also for
    'nan' and 'inf', which are names rather than numbers here)."""
    try:
        value = float(label)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _label_order(label: str) -> tuple:
    """Sort key: numeric-looking labels first, by value ('2' before '10'), then the rest
    as strings."""
    value = _as_number(label)
    return (0, value, label) if value is not None else (1, 0.0, label)


def _refuse_mixed_forms(labels: Sequence[str], where: str) -> None:
    """Two label texts that are one number ('1' and '1.0', '2' and '02') would be two
    classes: refused, naming them (a text label is kept as written, so an identifier such
    as a postcode '02134' is never merged with '2134' behind the user's back)."""
    by_value = {}
    for label in labels:
        value = _as_number(label)
        if value is not None:
            by_value.setdefault(value, []).append(label)
    mixed = [forms for forms in by_value.values() if len(forms) > 1]
    if mixed:
        shown = '; '.join(' and '.join(repr(f) for f in forms) for forms in mixed[:_MAX_LISTED])
        raise DataError(
            f'{where}: labels {shown} are one number written in different ways, which would '
            'make them different classes; write every label of a class the same way (e.g. all '
            f'{mixed[0][0]!r}), or make the task a regression (--config.task_type=regression)'
        )


class LabelMap:
    """Label strings <-> class ids, fixed by the training labels and saved in the workdir.

    Classes are the sorted unique training labels; numeric-looking labels sort by value,
    so a dataset labelled '0'..'K-1' keeps its own ids (and '10' comes after '2'). A label is
    one text: two texts of one number ('1' and '1.0') are refused, not merged, in training
    and eval data alike (JSON numbers are read in one form, so 1 and 1.0 there are '1').
    With `regression=True` there are no classes: labels are parsed as floats
    (`num_classes` is 1, the size of a regression head)."""

    def __init__(self, classes: Sequence[str] = (), regression: bool = False):
        self.classes = [str(c) for c in classes]
        self.regression = bool(regression)
        if self.regression and self.classes:
            raise ConfigError(
                f'a regression LabelMap has no classes, found {self.classes[:_MAX_LISTED]}; '
                'give either classes or regression=True'
            )
        if len(set(self.classes)) != len(self.classes):
            raise DataError(f'LabelMap classes must be unique, found {self.classes}')
        self._index = {c: i for i, c in enumerate(self.classes)}

    @classmethod
    def fit(
        cls, labels: Iterable[str], regression: bool = False, where: str = 'the training data'
    ) -> 'LabelMap':
        """The label map of the training `labels`; `where` names them in errors.

        A classification task needs at least two distinct labels and no empty one; a
        regression task needs every label to be a number."""
        labels = [str(label).strip() for label in labels]
        if not labels:
            raise DataError(f'{where} holds no labelled examples; check --config.data.files')
        if regression:
            label_map = cls(regression=True)
            label_map.encode(labels, where=where)  # raises for labels that are not numbers
            return label_map
        if '' in labels:
            raise DataError(
                f'{where}: {labels.count("")} examples have an empty label; fill them in, or '
                'point --config.data.label_field at the label column'
            )
        classes = sorted(set(labels), key=_label_order)
        _refuse_mixed_forms(classes, where)
        if len(classes) < 2:
            raise DataError(
                f'{where} has a single label {classes[0]!r}; a classifier needs at least two '
                'classes; check --config.data.label_field and the training files'
            )
        return cls(classes)

    @property
    def num_classes(self) -> int:
        """Outputs of the head: the number of classes, or 1 for regression."""
        return 1 if self.regression else len(self.classes)

    def __len__(self) -> int:
        return self.num_classes

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, LabelMap)
            and self.regression == other.regression
            and self.classes == other.classes
        )

    def __repr__(self) -> str:
        if self.regression:
            return 'LabelMap(regression=True)'
        return f'LabelMap({_listed(self.classes, 10)})'

    def encode(self, labels: Iterable[str], where: str = 'the eval data') -> np.ndarray:
        """Labels -> int32 class ids [N] (float32 targets [N] for regression).

        DataError for a label the training data did not have (or, for regression, one that
        is not a finite number), naming up to 5 of them, `where` they come from and the
        known labels."""
        labels = [str(label).strip() for label in labels]
        if self.regression:
            values = [_as_number(label) for label in labels]
            bad = list(dict.fromkeys(s for s, v in zip(labels, values) if v is None))
            if bad:
                raise DataError(
                    f'{where}: a regression task needs numeric labels, found '
                    f'{_listed(bad, _MAX_LISTED)}; fix the label column '
                    '(--config.data.label_field) or make the task a classification'
                )
            return np.asarray(values, np.float32)
        ids = [self._index.get(label, -1) for label in labels]
        unknown = list(dict.fromkeys(s for s, i in zip(labels, ids) if i < 0))
        known = {_as_number(c): c for c in self.classes if _as_number(c) is not None}
        respelled = [(s, known[_as_number(s)]) for s in unknown if _as_number(s) in known]
        if respelled:
            shown = ', '.join(f'{a!r} (training: {b!r})' for a, b in respelled[:_MAX_LISTED])
            raise DataError(
                f'{where}: labels {shown} are training labels written another way; write '
                'each label as the training data does'
            )
        if unknown:
            raise DataError(
                f'{where}: labels {_listed(unknown, _MAX_LISTED)} are not among the '
                f'{len(self.classes)} training labels {_listed(self.classes, _MAX_KNOWN_LISTED)}'
                '; give both splits the same label set, or check --config.data.label_field'
            )
        return np.asarray(ids, np.int32)

    def decode(self, ids: Iterable) -> list[str]:
        """Class ids -> label strings (regression: the values as text)."""
        ids = np.asarray(ids).reshape(-1)
        if self.regression:
            return [f'{float(v):g}' for v in ids]
        out = []
        for i in ids:
            if not 0 <= int(i) < len(self.classes):
                raise DataError(
                    f'class id {int(i)} is out of range for {len(self.classes)} classes; the '
                    'predictions do not come from a head of this label map'
                )
            out.append(self.classes[int(i)])
        return out

    def save(self, path: str) -> None:
        """Writes the map as JSON, atomically (a crash never leaves half a file)."""
        directory = os.path.dirname(path) or '.'
        os.makedirs(directory, exist_ok=True)
        content = {'regression': self.regression, 'classes': self.classes}
        with atomic_write(path, encoding='utf-8') as f:
            json.dump(content, f, indent=1, ensure_ascii=False)
            f.write('\n')

    @classmethod
    def load(cls, path: str) -> 'LabelMap':
        """The map `save` wrote at `path`."""
        if not os.path.isfile(path):
            raise DataError(
                f'label map {path} not found; it is written by the fine-tuning run, so point '
                "at that run's workdir (or rerun fine-tuning)"
            )
        try:
            with open(path, encoding='utf-8-sig') as f:
                content = json.load(f)
            classes, regression = content['classes'], content['regression']
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(
                f'label map {path} is not a label map written by LabelMap.save '
                f'({type(e).__name__}: {e}); delete it and rerun fine-tuning'
            ) from e
        return cls(classes, regression=regression)
