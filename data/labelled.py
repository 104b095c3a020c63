"""Labelled data for the fine-tuning stage: examples, label maps, low-label subsets.

Sequence classification (and regression) examples are dicts
`{'text': str, 'text_pair': str, 'label': str}`, read from local `.tsv` / `.csv` / `.jsonl`
files (`read_labelled_text`) or built from the embedded pydoc topics (`pydoc_topics_task`,
which ships a fixed test split).
Labels stay strings until a `LabelMap`, fitted on the training labels and saved in the
workdir, turns them into ids, so train, eval and a later `evaluate` run agree on the ids.

Token classification (NER-style) sentences are dicts `{'tokens': [str], 'tags': [str]}`,
read from CoNLL files or `.jsonl` (`read_token_files`); `align_tags` puts each word's tag on
its first WordPiece.

Three splits: training; validation (the periodic eval rows, the best checkpoint, early
stopping), given or carved out of the training examples by `validation_split`; and test,
scored once at the end. `select_train_examples` picks the labelled subset a run trains on
(`config.train_examples`) from what validation left: a count or a fraction per class,
deterministic for a seed and nested across sizes.
"""

import csv
import glob
import io
import json
import math
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np

from core.errors import ConfigError, DataError
from core.files import atomic_write
from data.text import (
    heldout_indices,
    json_kind,
    jsonl_field,
    jsonl_records,
    pydoc_topic_paragraphs,
    read_lines,
    read_text,
)
from data.tokenizer import WordPiece

LABELLED_EXTENSIONS = ('.tsv', '.csv', '.jsonl')
# Salt for the subset permutations, so they differ from other draws seeded by `config.seed`.
_SUBSET_SALT = 0x5E1EC7
_MAX_LISTED = 5  # unknown or bad labels named in an error message
_MAX_KNOWN_LISTED = 30  # training labels named in an error message


def match_files(pattern: str) -> list[str]:
    """Sorted paths matching `pattern` (comma-separated globs); DataError when none do."""
    paths = sorted(
        {
            p
            for part in pattern.split(',')
            if part.strip()
            for p in glob.glob(part.strip(), recursive=True)
        }
    )
    paths = [p for p in paths if os.path.isfile(p)]
    if not paths:
        raise DataError(
            f'no files match {pattern!r}; check the path in --config.data.files (or '
            '--config.data.eval_files, --config.data.test_files)'
        )
    return paths


def _listed(values: Sequence, limit: int) -> str:
    """`values` as a short list for an error message: the first `limit` and a count."""
    values = list(values)
    shown = repr(values[:limit])
    return shown if len(values) <= limit else f'{shown} (and {len(values) - limit} more)'


# ---------------------------------------------------------------------------------------------
# Sequence classification / regression examples


def _column_index(field: str, arg: str) -> int:
    """A 0-based column index given as a string (headerless files)."""
    if not re.fullmatch(r'\s*\d+\s*', str(field)):
        raise ConfigError(
            f'data.{arg}={field!r}: a file without a header row addresses its columns by '
            f'0-based index, so expected an integer such as "0" or "1"; set --config.data.{arg}'
        )
    return int(field)


def _read_delimited_labelled(
    path: str, delimiter: str, fields: dict[str, tuple[str, str]], header: bool
) -> list[dict]:
    """Rows of a .tsv / .csv as examples; `fields` maps example keys to column names
    (header) or 0-based column indices as strings (no header).

    TSV is read without quote handling (as GLUE's .tsv files need: their sentences contain
    unbalanced `"`); CSV follows the usual quoting rules, so quoted fields may hold commas."""
    quoting = csv.QUOTE_NONE if delimiter == '\t' else csv.QUOTE_MINIMAL
    examples = []
    with io.StringIO(read_text(path), newline='') as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        try:
            if header:
                names = next(reader, None)
                if names is None:
                    raise DataError(f'{path} is empty; expected a header row naming its columns')
                names = [n.strip() for n in names]
                columns = {}
                for key, (arg, field) in fields.items():
                    if field not in names:
                        raise DataError(
                            f'{path} line 1: no column {field!r} in the header (columns: '
                            f'{names}); set --config.data.{arg} to one of them (a file without '
                            'a header row is read with header=False and column indices)'
                        )
                    columns[key] = names.index(field)
            else:
                columns = {key: _column_index(field, arg) for key, (arg, field) in fields.items()}
            for row in reader:
                if not row or all(not cell.strip() for cell in row):
                    continue  # blank line
                missing = [key for key, c in columns.items() if c >= len(row)]
                if missing:
                    names_note = f'columns: {names}' if header else 'columns are 0-based'
                    raise DataError(
                        f'{path} line {reader.line_num}: found {len(row)} column(s), fewer than '
                        f'the {sorted(fields[k][1] for k in missing)} asked for ({names_note}); '
                        'fix the row or the --config.data.*_field settings'
                    )
                examples.append({key: row[c] for key, c in columns.items()})
        except csv.Error as e:
            raise DataError(
                f'{path} line {reader.line_num} is not valid {delimiter!r}-separated text ({e})'
            ) from e
    return examples


def _json_label(value) -> str:
    """A JSON label as text: a string as written; a number in one canonical form (an
    integral value as an integer, 1.0 -> '1', so 1 and 1.0 are one class); true / false."""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return json.dumps(value)


def _read_jsonl_labelled(path: str, fields: dict[str, tuple[str, str]]) -> list[dict]:
    """Objects of a .jsonl file as examples; `fields` maps example keys to object keys.
    Texts must be JSON strings; a label may be a string, a number or a boolean."""
    examples = []
    for n, record in jsonl_records(path):
        example = {}
        for key, (arg, field) in fields.items():
            if key == 'label':
                value = jsonl_field(path, n, record, field, arg, (str, int, float, bool))
                example[key] = _json_label(value)
            else:
                example[key] = jsonl_field(path, n, record, field, arg)
        examples.append(example)
    return examples


def read_labelled_text(
    pattern: str,
    *,
    text_field: str = 'text',
    text_pair_field: str = '',
    label_field: str = 'label',
    header: bool = True,
) -> list[dict]:
    """Labelled examples `{'text', 'text_pair', 'label'}` (all strings) of the local files
    matching `pattern` (a glob, comma-separated globs ok), in file-name order.

    `.tsv` / `.csv` files have a header row naming their columns; with `header=False` the
    `*_field` arguments are 0-based column indices as strings ('0', '1'). `.jsonl` files
    hold one object a line, fields named by the same arguments. `text_pair_field=''` gives
    single-text examples (`text_pair` ''), `label_field=''` unlabelled ones (`label` '',
    for prediction). Labels are stripped of surrounding whitespace; JSON numbers and
    booleans become text in one form (`1` for 1 and 1.0, `0.5`, `true`); texts must be
    JSON strings (a null or a number is an error naming the line)."""
    fields = {'text': ('text_field', text_field)}
    if text_pair_field:
        fields['text_pair'] = ('text_pair_field', text_pair_field)
    if label_field:
        fields['label'] = ('label_field', label_field)
    examples = []
    for path in match_files(pattern):
        ext = os.path.splitext(path)[1].lower()
        if ext == '.jsonl':
            rows = _read_jsonl_labelled(path, fields)
        elif ext in ('.tsv', '.csv'):
            rows = _read_delimited_labelled(path, '\t' if ext == '.tsv' else ',', fields, header)
        else:
            raise DataError(
                f'{path}: unsupported extension {ext!r}; labelled text files must be one of '
                f'{LABELLED_EXTENSIONS}'
            )
        for row in rows:
            examples.append(
                {
                    'text': row['text'],
                    'text_pair': row.get('text_pair', ''),
                    'label': row.get('label', '').strip(),
                }
            )
    if not examples:
        raise DataError(
            f'the files matching {pattern!r} hold no examples (empty, or header rows only)'
        )
    return examples


PYDOC_TOPICS_TEST_FRACTION = 0.3


def pydoc_topics_task(split: str, min_paragraphs: int = 20) -> list[dict]:
    """The embedded text classification task (no download): which CPython `help()` topic a
    documentation paragraph comes from (`data.text.pydoc_topic_paragraphs`: 13 topics,
    899 paragraphs on Python 3.11, none of them under two topics); labels are the topic
    names.

    `split`: 'train' (631 paragraphs; a run carves its validation split out of them by
    seed) or 'test' (268 paragraphs), a fixed 70/30 cut by `heldout_indices`, the same in
    every run. The embedded pretraining corpora hold none of these paragraphs."""
    if split not in ('train', 'test'):
        raise ConfigError(f'pydoc_topics has a train and a test split, not {split!r}')
    texts, labels, names = pydoc_topic_paragraphs(min_paragraphs)
    train_idx, test_idx = heldout_indices(len(texts), PYDOC_TOPICS_TEST_FRACTION)
    return [
        {'text': texts[i], 'text_pair': '', 'label': names[labels[i]]}
        for i in (train_idx if split == 'train' else test_idx)
    ]


# ---------------------------------------------------------------------------------------------
# Label maps


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


# ---------------------------------------------------------------------------------------------
# Low-label subsets


def _parse_train_examples(spec) -> int | float | None:
    """`config.train_examples` -> None (all), an int (per class) or a float in (0, 1)."""

    def bad(why: str) -> ConfigError:
        return ConfigError(
            f'--config.train_examples={spec!r}: {why}; expected a count per class (an integer '
            "such as 10), a fraction of each class in (0, 1) (such as 0.1), or '' / 0 for all "
            'the training examples'
        )

    if spec is None or isinstance(spec, bool):
        if spec is None:
            return None
        raise bad('a boolean is not a number of examples')
    if isinstance(spec, str):
        text = spec.strip()
        if text == '' or text.lower() == 'all':
            return None
        if re.fullmatch(r'[+-]?\d+', text):
            spec = int(text)
        else:
            try:
                spec = float(text)
            except ValueError:
                raise bad('not a number') from None
    if isinstance(spec, int | np.integer):
        if spec < 0:
            raise bad('a count cannot be negative')
        return int(spec) or None
    if isinstance(spec, float | np.floating):
        if not 0.0 < spec < 1.0:
            if spec == 0.0:
                return None
            raise bad('a fraction must lie strictly between 0 and 1 (a count must be an integer)')
        return float(spec)
    raise bad(f'a {type(spec).__name__}')


def select_train_examples(
    labels: np.ndarray, spec: str | int | float | None, seed: int, per_class: bool = True
) -> np.ndarray:
    """Sorted indices of the training examples a run uses, as `config.train_examples` says.

    `spec`: '' / None / 0 -> all; an integer (or '10') -> that many of each class (all of a
    class that has fewer); a float in (0, 1) (or '0.1') -> that fraction of each class,
    rounded half up, at least one. Each class is shuffled by a permutation drawn from `seed` and
    its first examples are taken, so the choice is deterministic for a seed, differs across
    seeds, and is nested: the subset for k per class lies inside the one for k' > k (and a
    smaller fraction's inside a larger one's), as low-label studies need.

    `labels` are class ids (any values; each distinct value is a class). `per_class=False`
    treats the whole set as one class (regression targets): the count or fraction is then
    of all the examples."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f'expected labels of shape [N], found shape {labels.shape}')
    amount = _parse_train_examples(spec)
    if amount is None:
        return np.arange(len(labels), dtype=np.int64)
    if per_class:
        _, groups = np.unique(labels, return_inverse=True)
        groups = groups.reshape(-1)
    else:
        groups = np.zeros(len(labels), np.int64)
    chosen = []
    for g in range(int(groups.max()) + 1 if len(groups) else 0):
        members = np.flatnonzero(groups == g)
        rng = np.random.default_rng([_SUBSET_SALT, int(seed) % 2**32, g])
        order = members[rng.permutation(len(members))]
        if isinstance(amount, int):
            take = amount
        else:
            take = max(1, int(np.floor(amount * len(members) + 0.5)))  # half rounds up
        chosen.append(order[:take])
    return np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, np.int64)


_VALIDATION_SALT = 0x7A11D


def validation_split(
    labels: np.ndarray, fraction: float, seed: int, per_class: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(training, validation) sorted indices: `fraction` of each class held out for
    validation (`data.eval_fraction`, when a task has no validation split of its own).

    Per class, rounded half up, at least one example and at least one left for training
    (a class of one stays in training). Each class is shuffled by a permutation drawn from
    `seed` alone, so the validation split is fixed for a seed whatever `train_examples`
    then takes from the rest: the label budgets of a study share one validation split per
    seed and their training subsets stay nested. `per_class=False` (regression targets,
    sentences) holds out `fraction` of all the examples."""
    if not 0.0 < float(fraction) < 1.0:
        raise ConfigError(
            f'--config.data.eval_fraction={fraction}: the part of the training examples held '
            'out for validation must lie strictly between 0 and 1 (e.g. 0.1); or give a '
            'validation split (data.eval_files / data.eval_split)'
        )
    labels = np.asarray(labels)
    if per_class:
        _, groups = np.unique(labels, return_inverse=True)
        groups = groups.reshape(-1)
    else:
        groups = np.zeros(len(labels), np.int64)
    held = []
    for g in range(int(groups.max()) + 1 if len(groups) else 0):
        members = np.flatnonzero(groups == g)
        rng = np.random.default_rng([_VALIDATION_SALT, int(seed) % 2**32, g])
        take = min(max(1, int(np.floor(fraction * len(members) + 0.5))), len(members) - 1)
        held.append(members[rng.permutation(len(members))][:take])
    val = np.sort(np.concatenate(held)).astype(np.int64) if held else np.zeros(0, np.int64)
    return np.setdiff1d(np.arange(len(labels)), val).astype(np.int64), val


# ---------------------------------------------------------------------------------------------
# Token classification


def _read_conll_file(path: str) -> list[dict]:
    """The sentences of one CoNLL file (see `read_conll`)."""
    sentences, tokens, tags = [], [], []
    for n, line in enumerate(read_lines(path), 1):
        columns = line.split()
        if not columns or columns[0] == '-DOCSTART-':
            if tokens:
                sentences.append({'tokens': tokens, 'tags': tags})
                tokens, tags = [], []
            continue
        if len(columns) < 2:
            raise DataError(
                f'{path} line {n}: expected a token and its tag separated by whitespace '
                f'(tag in the last column), found {line.strip()!r}'
            )
        tokens.append(columns[0])
        tags.append(columns[-1])
    if tokens:
        sentences.append({'tokens': tokens, 'tags': tags})
    return sentences


def read_conll(pattern: str) -> list[dict]:
    """Sentences `{'tokens': [str], 'tags': [str]}` of CoNLL files matching `pattern` (comma-
    separated globs ok): one token a line, its tag in the last whitespace-separated column
    (CoNLL-2003's 4 columns or plain `token tag`), a blank line between sentences,
    `-DOCSTART-` lines skipped."""
    sentences = []
    for path in match_files(pattern):
        found = _read_conll_file(path)
        if not found:
            raise DataError(f'{path} holds no sentences; expected CoNLL lines "token ... tag"')
        sentences.extend(found)
    return sentences


def _read_token_jsonl(path: str, tokens_field: str, tags_field: str) -> list[dict]:
    sentences = []
    for n, record in jsonl_records(path):
        tokens = jsonl_field(path, n, record, tokens_field, 'tokens_field', (list,))
        tags = jsonl_field(path, n, record, tags_field, 'tags_field', (list,))
        for field, values, allowed in (
            (tokens_field, tokens, (str,)),
            (tags_field, tags, (str, int)),
        ):
            bad = [i for i, v in enumerate(values) if type(v) not in allowed]  # bool: not int
            if bad:
                value = values[bad[0]]
                what = 'strings' if allowed == (str,) else 'strings or integer tag ids'
                raise DataError(
                    f'{path} line {n}: item {bad[0]} of field {field!r} is {json_kind(value)} '
                    f'({json.dumps(value)[:80]}); expected a list of {what}; fix the line'
                )
        if len(tokens) != len(tags):
            raise DataError(
                f'{path} line {n}: {len(tokens)} tokens but {len(tags)} tags; each token '
                'needs exactly one tag'
            )
        if tokens:
            sentences.append({'tokens': [str(t) for t in tokens], 'tags': [str(t) for t in tags]})
    return sentences


def read_token_files(
    pattern: str, tokens_field: str = 'tokens', tags_field: str = 'tags'
) -> list[dict]:
    """Token-classification sentences `{'tokens', 'tags'}` of the files matching `pattern`:
    `.jsonl` (lists in `tokens_field` and `tags_field`, one sentence a line) or CoNLL text
    (any other extension, see `read_conll`). Integer tags in `.jsonl` become strings."""
    sentences = []
    for path in match_files(pattern):
        if os.path.splitext(path)[1].lower() == '.jsonl':
            found = _read_token_jsonl(path, tokens_field, tags_field)
        else:
            found = _read_conll_file(path)
        if not found:
            raise DataError(f'{path} holds no sentences')
        sentences.extend(found)
    return sentences


def align_tags(
    tokens: Sequence[str], tag_ids: Sequence[int], wordpiece: WordPiece, seq_len: int
) -> dict:
    """One sentence -> fixed-length model inputs with word labels on first WordPieces.

    Returns `input_ids`, `input_mask` (int32 [seq_len]): [CLS] pieces [SEP], padded with 0;
    `labels` (int32 [seq_len]) and `label_weights` (float32 [seq_len]): each word's tag id
    on its first piece with weight 1, everything else (later pieces, [CLS], [SEP], padding)
    label 0 weight 0; and `num_words`, the words kept. Words are encoded one at a time with
    `wordpiece.encode` (lowercased, accents stripped, punctuation split off as the
    vocabulary's normalizer does), a word with no pieces (whitespace, control characters)
    becomes [UNK]; whole trailing words that do not fit are dropped, so predictions exist
    only for the first `num_words` words (score the rest as 'O' or count them as missed)."""
    if seq_len < 3:
        raise ConfigError(
            f'seq_len must be at least 3 ([CLS] a token [SEP]), found {seq_len}; set '
            '--config.data.seq_len'
        )
    if wordpiece.pad_id != 0:
        raise DataError(
            f'vocabulary {wordpiece.vocab_file} has [PAD] at id {wordpiece.pad_id}; batches pad '
            'with 0, so [PAD] must be its first line'
        )
    if len(tokens) != len(tag_ids):
        raise DataError(
            f'expected one tag per token, found {len(tokens)} tokens and {len(tag_ids)} tags'
        )
    input_ids = np.zeros(seq_len, np.int32)
    labels = np.zeros(seq_len, np.int32)
    weights = np.zeros(seq_len, np.float32)
    input_ids[0] = wordpiece.cls_id
    position, num_words = 1, 0
    for word, tag in zip(tokens, tag_ids):
        pieces = wordpiece.encode(word)
        if len(pieces) == 0:
            pieces = np.asarray([wordpiece.unk_id], np.int32)
        if position + len(pieces) > seq_len - 1:  # keep room for [SEP]
            break
        input_ids[position : position + len(pieces)] = pieces
        labels[position] = tag
        weights[position] = 1.0
        position += len(pieces)
        num_words += 1
    input_ids[position] = wordpiece.sep_id
    input_mask = np.zeros(seq_len, np.int32)
    input_mask[: position + 1] = 1
    return {
        'input_ids': input_ids,
        'input_mask': input_mask,
        'labels': labels,
        'label_weights': weights,
        'num_words': num_words,
    }
