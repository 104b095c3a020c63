"""Token classification end to end: generated CoNLL files (a person, a verb, a place),
tags on first WordPieces, entity F1 rising from its step-0 value, and the evaluate stage
writing one predicted tag per word."""

import json
import os
import random

from tests.conftest import launch

PEOPLE = ['guido', 'tim', 'barry', 'raymond', 'larry']
PLACES = ['amsterdam', 'boston', 'london', 'paris']
VERBS = ['visited', 'left', 'wrote about', 'liked']


def write_conll(path: str, sentences: int, seed: int) -> None:
    rng = random.Random(seed)
    lines = ['-DOCSTART- -X- -X- O', '']
    for _ in range(sentences):
        words = [(rng.choice(PEOPLE).capitalize(), 'B-PER')]
        if rng.random() < 0.3:
            words.append(('van', 'I-PER'))
        words += [(w, 'O') for w in rng.choice(VERBS).split()]
        words += [(rng.choice(PLACES).capitalize(), 'B-LOC'), ('.', 'O')]
        lines += [f'{w} X X {t}' for w, t in words] + ['']
    with open(path, 'w') as f:
        f.write('\n'.join(lines))


def test_token_classification_learns_entities_and_predicts_per_word(tmp_path):
    train, dev = str(tmp_path / 'train.conll'), str(tmp_path / 'dev.conll')
    write_conll(train, 200, 0)
    write_conll(dev, 40, 1)
    workdir = str(tmp_path / 'ner')
    args = [
        '--config',
        'configs/token_cls.py:tiny',
        '--workdir',
        workdir,
        f'--config.data.files={train}',
        f'--config.data.eval_files={dev}',
        '--config.model.hidden_size=64',
        '--config.model.num_layers=1',
        '--config.model.num_heads=2',
        '--config.model.mlp_dim=128',
        '--config.model.vocab_size=256',
        '--config.data.seq_len=16',
        '--config.batch_size=16',
        '--config.total_steps=40',
        '--config.warmup_steps=5',
        '--config.eval_every=20',
        '--config.checkpoint_every=20',
    ]
    r = launch('finetune', *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "4 tags ['B-LOC', 'B-PER', 'I-PER', 'O']" in r.stderr
    rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
    evals = [row for row in rows if row['split'] == 'eval']
    assert {'entity_f1', 'entity_precision', 'entity_recall', 'token_accuracy'} <= set(evals[0])
    assert evals[-1]['entity_f1'] > max(0.8, evals[0]['entity_f1'])
    r = launch('evaluate', *args)
    assert r.returncode == 0, r.stderr[-3000:]
    predictions = [json.loads(line) for line in open(os.path.join(workdir, 'predictions.jsonl'))]
    assert len(predictions) == 40
    assert all(len(p['prediction']) == len(p['tokens']) == len(p['tags']) for p in predictions)
