"""Domain-adaptive pretraining (configs/dapt.py): MLM continued on a task's own training
text, never its validation or test text, and the study's domain_adapted arm."""

import json
import os

import numpy as np
import pytest

from configs import dapt, text_cls
from configs import study as study_config
from core import recipe, trainer
from core.errors import ConfigError
from data import labelled
from data.labels import LabelMap
from data.tokenizer import make_tokenizer
from study import report, runner
from tests.conftest import SMALL_RUN, launch


def test_the_corpus_is_the_training_text_less_the_seeds_validation_split():
    config = dapt.get_config('tiny')
    config.seed = 0
    train, validation, where = labelled.task_texts(config)
    assert where == 'the embedded pydoc_topics task'
    task_train = [e['text'] for e in labelled.pydoc_topics_task('train')]
    task_test = {e['text'] for e in labelled.pydoc_topics_task('test')}
    assert not task_test & (set(train) | set(validation))  # the test split is never read
    assert sorted(train + validation) == sorted(task_train) and not set(train) & set(validation)
    # The validation text is exactly what a text_cls run of the same seed validates on.
    finetune = text_cls.get_config('tiny')
    examples = labelled.pydoc_topics_task('train')
    labels = LabelMap.fit([e['label'] for e in examples]).encode([e['label'] for e in examples])
    _, val_idx = labelled.carve_validation(labels, finetune, True, 'pydoc_topics')
    assert validation == [examples[i]['text'] for i in val_idx] and len(validation) == 62
    config.seed = 1
    assert set(labelled.task_texts(config)[1]) != set(validation)  # carved by seed


def test_given_validation_files_are_held_out_whole(tmp_path):
    rows = [('a b c d e', 'x'), ('f g h i j', 'y'), ('k l m n o', 'x'), ('p q r s t', 'y')]
    (tmp_path / 'train.tsv').write_text('text\tlabel\n' + ''.join(f'{t}\t{y}\n' for t, y in rows))
    (tmp_path / 'dev.tsv').write_text('text\tlabel\nheld out text\tx\n')
    config = dapt.get_config('tiny')
    config.seed = 0
    config.data.files, config.data.eval_files = (
        str(tmp_path / 'train.tsv'),
        str(tmp_path / 'dev.tsv'),
    )
    train, validation, _ = labelled.task_texts(config)
    assert train == [t for t, _ in rows] and validation == ['held out text']


def test_a_dapt_run_trains_on_the_task_text_and_never_reads_its_test_split(tmp_path, monkeypatch):
    read = labelled.pydoc_topics_task

    def no_test(split, *args, **kwargs):
        assert split != 'test', 'domain-adaptive pretraining read the test split'
        return read(split, *args, **kwargs)

    monkeypatch.setattr(labelled, 'pydoc_topics_task', no_test)
    config = dapt.get_config('tiny')
    config.model.update(hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32, vocab_size=512)
    config.data.seq_len = 32
    config.update(
        dict(batch_size=8, total_steps=2, warmup_steps=1, eval_every=2, checkpoint_every=2)
    )
    config.eval_steps = 1
    workdir = tmp_path / 'dapt'
    trainer.train_and_evaluate(config, str(workdir), 'pretrain')
    summary = json.loads((workdir / 'summary.json').read_text())
    assert summary['completed'] and summary['steps'] == 2
    assert 0.0 <= summary['final_mlm_accuracy'] <= 1.0
    # From scratch, the WordPiece is trained on the task's training text, and only on it.
    make_tokenizer(config, str(tmp_path / 'expected'), labelled.task_texts(config)[0])
    expected = (tmp_path / 'expected' / 'vocab.txt').read_text()
    assert (workdir / 'vocab.txt').read_text() == expected


def test_a_continued_pretraining_pools_as_its_start(tmp_path):
    start, dapt_run = tmp_path / 'minilm', tmp_path / 'dapt'
    for path in (start, dapt_run):
        (path / 'checkpoints' / '0').mkdir(parents=True)
    (start / 'config.json').write_text(json.dumps({'model': {'hidden_size': 384}}))
    (start / 'import.json').write_text(json.dumps({'pooling': 'mean'}))
    saved = {'model': {'hidden_size': 384}, 'init_from': str(start / 'checkpoints' / '0')}
    (dapt_run / 'config.json').write_text(json.dumps(saved))
    assert recipe.source_pooling(saved, str(dapt_run)) == 'mean'
    assert recipe.source_pooling({'model': {}}, str(dapt_run)) is None  # no start: nothing


def test_the_domain_adapted_arm_fine_tunes_the_checkpoint_validation_chose(tmp_path):
    imported, dapt_dir = tmp_path / 'minilm', tmp_path / 'dapt'
    c = study_config.get_config('text')
    saved = c.pretrain.to_dict()
    saved['model'].update(vocab_size=30522, hidden_size=384, num_layers=6)
    for path in (imported, dapt_dir):
        path.mkdir()
        (path / 'config.json').write_text(json.dumps(saved))
    (imported / 'import.json').write_text(json.dumps({'pooling': 'mean'}))
    for step in (50, 100):
        (dapt_dir / 'checkpoints' / str(step) / 'state').mkdir(parents=True)
    rows = [{'split': 'eval', 'step': s, 'mlm_accuracy': a} for s, a in ((50, 0.4), (100, 0.3))]
    (dapt_dir / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    saved_dapt = dict(saved, init_from=str(imported))
    (dapt_dir / 'config.json').write_text(json.dumps(saved_dapt))
    c.imported, c.arms = str(imported), 'domain_adapted'
    assert runner.arms(c) == ['domain_adapted', 'imported']
    run = runner.Run('domain_adapted', 0.1, 2)
    tuned = runner.finetune_config(c, run, '', dapt_dir=str(dapt_dir))
    assert tuned.init_from == str(dapt_dir / 'checkpoints' / '50')  # best held-out MLM
    assert tuned.model.num_layers == 6 and tuned.model.pooling == 'mean'  # as imported
    direct = runner.finetune_config(c, runner.Run('imported', 0.1, 2), '')
    assert tuned.learning_rate == direct.learning_rate  # the same recipe as the imported arm
    pre = runner.dapt_config(c, 2)
    assert pre.seed == 2 and pre.init_from == str(imported) and pre.data.task_text
    assert pre.data.name == c.finetune.data.name
    assert pre.data.eval_fraction == c.finetune.data.eval_fraction
    c.imported = ''
    with pytest.raises(ConfigError, match='--config.imported'):
        runner.plan(c)
    digits = study_config.get_config('digits')
    digits.arms, digits.imported = 'domain_adapted', str(imported)
    with pytest.raises(ConfigError, match='text studies'):
        runner.plan(digits)


@pytest.mark.slow
def test_smoke_study_with_a_domain_adapted_arm(tmp_path):
    """A text study whose `imported` start is a small MLM run: each seed's domain-adaptive
    pretraining continues it on the task's text, and the domain_adapted arm fine-tunes that
    with the imported arm's vocabulary and recipe; the table pairs it with imported."""
    imported = str(tmp_path / 'mlm')
    steps = ['--config.total_steps=4', '--config.checkpoint_every=4', '--config.eval_every=4']
    r = launch(
        'pretrain', '--config', 'configs/bert_mlm.py:tiny', '--workdir', imported,
        *SMALL_RUN, *steps,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    workdir = tmp_path / 'study'
    short = {'total_steps': 4, 'warmup_steps': 1, 'eval_every': 2, 'checkpoint_every': 2}
    r = launch(
        'study',
        '--config',
        'configs/study.py:text',
        '--workdir',
        str(workdir),
        f'--config.imported={imported}',
        '--config.arms=domain_adapted',
        '--config.label_fractions=(0.5,)',
        '--config.seeds=(0,)',
        '--config.finetune.batch_size=16',
        '--config.dapt.batch_size=8',
        '--config.dapt.eval_steps=1',
        *(f'--config.finetune.{k}={v}' for k, v in short.items()),
        *(f'--config.dapt.{k}={v}' for k, v in short.items()),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    pre = workdir / 'dapt' / 'seed0'
    pre_config = json.loads((pre / 'config.json').read_text())
    assert json.loads((pre / 'summary.json').read_text())['completed']
    assert pre_config['data']['name'] == 'pydoc_topics' and pre_config['init_from'] == imported
    tuned = json.loads((workdir / 'runs/domain_adapted/frac_0.5/seed0/config.json').read_text())
    assert os.path.dirname(tuned['init_from']) == str(pre / 'checkpoints')
    vocab = open(os.path.join(imported, 'vocab.txt')).read()
    assert (pre / 'vocab.txt').read_text() == vocab
    result = json.loads((workdir / 'study.json').read_text())
    by_arm = {t['arm']: t for t in result['table']}
    assert set(by_arm) == {'domain_adapted', 'imported'}
    paired = by_arm['domain_adapted']['diff_vs_start']
    runs = {r['arm']: r['test_accuracy'] for r in result['runs']}
    assert np.isclose(paired, runs['domain_adapted'] - runs['imported'])
    assert 'domain_adapted - imported (paired)' in r.stdout


def test_the_table_pairs_domain_adapted_with_the_imported_arm_at_every_budget():
    def row(arm, budget, seed, test):
        return {
            'arm': arm,
            'budget': budget,
            'seed': seed,
            'train_examples': 58 if budget == 0.1 else 569,
            'test_accuracy': test,
            'val_accuracy': test,
            'steps_to_target': None,
            'train_time_to_target_sec': None,
            'wall_time_sec': 1.0,
        }

    rows = [
        row('imported', 0.1, 0, 0.60),
        row('domain_adapted', 0.1, 0, 0.70),
        row('imported', 0.1, 1, 0.50),
        row('domain_adapted', 0.1, 1, 0.70),
        row('imported', 1.0, 0, 0.80),
        row('domain_adapted', 1.0, 0, 0.75),
    ]
    table = report.aggregate(rows, 'accuracy')
    by_key = {(t['arm'], t['budget']): t for t in table}
    # Paired by seed: +0.1 and +0.2; t(0.975, 1 dof) = 12.706, std 0.0707: +- 0.635.
    low = by_key[('domain_adapted', 0.1)]
    assert low['diff_vs_start'] == pytest.approx(0.15)
    assert low['start_ci_low'] == pytest.approx(0.15 - 0.6353, abs=1e-3)
    assert by_key[('domain_adapted', 1.0)]['diff_vs_start'] == pytest.approx(-0.05)
    assert by_key[('imported', 0.1)]['diff_vs_start'] is None
    assert low['diff_vs_scratch'] is None  # no scratch arm ran
    text = report.markdown(table, 'accuracy', 0.9)
    assert 'domain_adapted - imported (paired)' in text
    assert '| 1 | 569 | 0.800 | 0.750 | -0.050 |' in text
