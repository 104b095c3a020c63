"""Labelled data for the fine-tuning stage: examples and low-label subsets.

Sequence classification (and regression) examples are dicts
`{'text': str, 'text_pair': str, 'label': str}`, read from local `.tsv` / `.csv` / `.jsonl`
files (also `.gz` / `.zst`), `.parquet`, `.arrow` or `datasets` directories
(`read_labelled_text`) or built from the embedded pydoc topics (`pydoc_topics_task`, which
ships a fixed test split). Labels stay strings until a `data.labels.LabelMap` turns
them into ids; token classification files are read by `data.token_files`.

Three splits: training; validation (the periodic eval rows, the best checkpoint, early
stopping), given or carved out of the training examples by `validation_split`; and test,
scored once at the end. `select_train_examples` picks the labelled subset a run trains on
(`config.train_examples`) from what validation left: a count or a fraction per class,
deterministic for a seed and nested across sizes.
"""

import csv
import io
import json
import re
from collections.abc import Callable

import numpy as np
from absl import logging

from core.errors import ConfigError, DataError
from data import formats
from data.formats import match_files  # noqa: F401 (the readers' one file matcher, re-exported)
from data.labels import LabelMap
from data.text import (
    TfdsText,
    heldout_indices,
    jsonl_field,
    pydoc_topic_paragraphs,
    read_text,
    records,
)

LABELLED_EXTENSIONS = ('.tsv', '.csv', '.jsonl', '.parquet', '.arrow')
# Salt for the subset permutations, so they differ from other draws seeded by `config.seed`.
_SUBSET_SALT = 0x5E1EC7


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


def _read_records_labelled(path: str, fields: dict[str, tuple[str, str]]) -> list[dict]:
    """Objects of a .jsonl file (or rows of a table) as examples; `fields` maps example keys
    to object keys. Texts must be strings; a label may be a string, a number or a boolean."""
    examples = []
    for n, record in records(path, {field: arg for arg, field in fields.values()}):
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
    hold one object a line, fields named by the same arguments, as are the columns of
    `.parquet`, `.arrow` and `datasets` directories; text files may be .gz / .zst.
    `text_pair_field=''` gives single-text examples (`text_pair` ''), `label_field=''`
    unlabelled ones (`label` '', for prediction). Labels are stripped of surrounding
    whitespace; JSON numbers and booleans become text in one form (`1` for 1 and 1.0,
    `0.5`, `true`); texts must be strings (a null or a number is an error naming the
    line)."""
    fields = {'text': ('text_field', text_field)}
    if text_pair_field:
        fields['text_pair'] = ('text_pair_field', text_pair_field)
    if label_field:
        fields['label'] = ('label_field', label_field)
    examples = []
    for path in match_files(pattern):
        ext = formats.kind(path)
        if ext == '.jsonl' or ext in formats.TABLES:
            rows = _read_records_labelled(path, fields)
        elif ext in ('.tsv', '.csv'):
            rows = _read_delimited_labelled(path, '\t' if ext == '.tsv' else ',', fields, header)
        else:
            raise DataError(
                f'{path}: unsupported extension {ext!r}; labelled text files must be one of '
                f'{LABELLED_EXTENSIONS} (text also .gz or .zst), or a datasets save_to_disk '
                'directory'
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


def _read_task_files(d, pattern: str) -> list[dict]:
    return read_labelled_text(
        pattern,
        text_field=d.text_field,
        text_pair_field=d.text_pair_field,
        label_field=d.label_field,
        header=d.header,
    )


def text_task_splits(
    d,
) -> tuple[list[dict], list[dict] | None, Callable[[], list[dict]] | None, str]:
    """(training examples, validation examples, test loader, where they come from) of the
    text classification task that `d` (a text_cls config's `data`) describes.

    Validation: `data.eval_files`, or the TFDS `data.eval_split`; None when neither is
    given (the caller carves it out of the training examples by seed). Test: a function
    that reads `data.test_files`, the TFDS `data.test_split` or the embedded task's fixed
    test split when called, at the end of training; None without a test split."""
    embedded = not d.files and d.name == 'pydoc_topics'
    tfds = not d.files and not embedded
    if d.files:
        train, where = _read_task_files(d, d.files), d.files
    elif embedded:
        train, where = pydoc_topics_task('train'), 'the embedded pydoc_topics task'
    elif not d.name:
        raise ConfigError(
            'text classification needs data: the embedded --config.data.name=pydoc_topics, '
            'a prepared TFDS dataset by name, or --config.data.files=train.tsv'
        )
    else:
        train, where = tfds_examples(d, d.train_split), f'TFDS {d.name}'
    if d.eval_files:
        validation = _read_task_files(d, d.eval_files)
    elif tfds and d.eval_split:
        validation = tfds_examples(d, d.eval_split)
    else:
        validation = None
    if d.get('test_files'):
        test = lambda: _read_task_files(d, d.test_files)  # noqa: E731
    elif embedded:
        test = lambda: pydoc_topics_task('test')  # noqa: E731
    elif tfds and d.get('test_split'):
        test = lambda: tfds_examples(d, d.test_split)  # noqa: E731
    else:
        test = None
    return train, validation, test, where


def tfds_examples(d, split: str) -> list[dict]:
    """A prepared TFDS split (GLUE-style: text, optional pair, label features) read without
    TensorFlow; ClassLabel ids become label strings ('0', '1', ...)."""
    fields = {'text': d.text_field, 'label': d.label_field}
    if d.text_pair_field:
        fields['text_pair'] = d.text_pair_field
    columns = {k: TfdsText(d.name, split, f, d.data_dir) for k, f in fields.items()}
    n = len(columns['text'])
    return [
        {
            'text': columns['text'][i],
            'text_pair': columns['text_pair'][i] if 'text_pair' in columns else '',
            'label': columns['label'][i],
        }
        for i in range(n)
    ]


def task_texts(config) -> tuple[list[str], list[str], str]:
    """(training texts, validation texts, where) of the text classification task that a
    text_cls-style `config` describes (`data.*`, `seed`, `task_type`): the text a run of
    that task with this seed trains on (every training example, whatever its label budget:
    their labels are never read here) and the text its validation split scores, carved by
    seed exactly as the fine-tuning carves it (data.eval_fraction of each class) when the
    task has no validation split of its own. The test split is not read. A pair's two
    texts are one document. Domain-adaptive pretraining (configs/dapt.py) trains on the
    first and evaluates on the second."""
    train, validation, _, where = text_task_splits(config.data)
    if validation is None:
        regression = config.get('task_type', 'classification') == 'regression'
        raw = [e['label'] for e in train]
        labels = LabelMap.fit(raw, regression=regression, where=where).encode(raw, where=where)
        train_idx, val_idx = carve_validation(labels, config, not regression, where)
        train, validation = [train[i] for i in train_idx], [train[i] for i in val_idx]
    join = lambda e: (e['text'] + ' ' + e['text_pair']).strip()  # noqa: E731
    return [join(e) for e in train], [join(e) for e in validation], where


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


def carve_validation(
    labels: np.ndarray, config, per_class: bool, where: str
) -> tuple[np.ndarray, np.ndarray]:
    """(training, validation) indices of a task given no validation split: `data.eval_fraction`
    of each class (all examples when not `per_class`) held out by `seed`, the same for every
    label budget of that seed (data/labelled.py:validation_split)."""
    train_idx, val_idx = validation_split(
        labels, config.data.eval_fraction, config.seed, per_class=per_class
    )
    if len(val_idx) == 0:
        raise DataError(
            f'{where}: {len(labels)} examples are too few to hold out eval_fraction='
            f'{config.data.eval_fraction} for validation; give a validation split '
            '(--config.data.eval_files, or data.eval_split of a TFDS dataset)'
        )
    logging.info(
        'validation: %d of the %d training examples of %s held out (eval_fraction=%g%s, seed %d)',
        len(val_idx),
        len(labels),
        where,
        config.data.eval_fraction,
        ' of each class' if per_class else '',
        config.seed,
    )
    return train_idx, val_idx
