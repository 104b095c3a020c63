"""Regression fine-tuning (task_type=regression) from local TSV files: numeric labels, a
one-output head, Pearson / Spearman / MSE in the eval rows and the predictions file."""

import json
import os

from tests.conftest import launch
from tests.test_finetune_tfds import TINY_TEXT


def write_tsv(path: str, n: int, offset: int) -> None:
    words = ['alpha', 'beta', 'gamma', 'delta', 'epsilon', 'zeta']
    with open(path, 'w') as f:
        f.write('sentence\tscore\n')
        for i in range(n):
            k = 1 + (i + offset) % 6
            f.write(' '.join(words[:k]) + f'\t{k / 2}\n')


def test_regression_from_tsv_reports_correlations(tmp_path, pydoc_vocab):
    train, dev = str(tmp_path / 'train.tsv'), str(tmp_path / 'dev.tsv')
    write_tsv(train, 48, 0)
    write_tsv(dev, 12, 3)
    workdir = str(tmp_path / 'reg')
    args = [
        '--config',
        'configs/text_cls.py:tiny',
        '--workdir',
        workdir,
        *TINY_TEXT,
        f'--config.data.vocab_file={pydoc_vocab}',
        f'--config.data.files={train}',
        f'--config.data.eval_files={dev}',
        '--config.data.text_field=sentence',
        '--config.data.label_field=score',
        '--config.task_type=regression',
    ]
    r = launch('finetune', *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'regression' in r.stderr
    rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
    final = [row for row in rows if row['split'] == 'eval'][-1]
    assert {'pearson', 'spearman', 'mse'} <= set(final)
    r = launch('evaluate', *args)
    assert r.returncode == 0, r.stderr[-3000:]
    predictions = [json.loads(line) for line in open(os.path.join(workdir, 'predictions.jsonl'))]
    assert len(predictions) == 12
    assert predictions[0]['label'] == 2.0 and isinstance(predictions[0]['prediction'], float)
