"""Training / validation / test discipline: the validation split is carved from the
training examples by seed (stratified, fixed whatever the label budget); the test split is
read once, after training, and scores the validation-selected checkpoint; no pretraining
data or probe of the embedded sets touches a downstream test split, and the embedded text
corpora hold none of the text-classification task's paragraphs."""

import collections
import json
import os

import numpy as np
import pytest

from core import selection, trainer
from data import digits, image_splits, labelled, text

# ---------------------------------------------------------------------------------------
# The validation split


def test_validation_split_is_stratified_by_seed_and_fixed_whatever_the_budget():
    labels = np.repeat(np.arange(4), [50, 30, 11, 2])
    train, val = labelled.validation_split(labels, 0.1, seed=0)
    assert np.intersect1d(train, val).size == 0
    assert np.union1d(train, val).tolist() == list(range(len(labels)))
    # Per class: a tenth, rounded half up, at least one, and at least one left to train on.
    assert np.bincount(labels[val], minlength=4).tolist() == [5, 3, 1, 1]
    again_train, again_val = labelled.validation_split(labels, 0.1, seed=0)
    np.testing.assert_array_equal(val, again_val)
    np.testing.assert_array_equal(train, again_train)
    assert not np.array_equal(val, labelled.validation_split(labels, 0.1, seed=1)[1])
    # The label budgets of one seed take nested subsets of the same training examples.
    small = train[labelled.select_train_examples(labels[train], 2, 0)]
    large = train[labelled.select_train_examples(labels[train], 5, 0)]
    assert set(small) < set(large) and not set(large) & set(val)
    # Regression targets (per_class=False): a plain fraction.
    _, plain = labelled.validation_split(np.linspace(0, 1, 40), 0.25, seed=3, per_class=False)
    assert len(plain) == 10


@pytest.mark.parametrize('fraction', [0.0, 1.0, -0.1, 1.5])
def test_validation_fraction_out_of_range_is_a_config_error(fraction):
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match='eval_fraction'):
        labelled.validation_split(np.arange(10) % 2, fraction, seed=0)


def test_pydoc_topics_task_ships_a_fixed_test_split():
    train = labelled.pydoc_topics_task('train')
    test = labelled.pydoc_topics_task('test')
    texts, _, names = text.pydoc_topic_paragraphs()
    assert len(train) == 631 and len(test) == 268 and len(train) + len(test) == len(texts)
    assert not {e['text'] for e in train} & {e['text'] for e in test}
    assert {e['label'] for e in test} <= set(names)
    assert test == labelled.pydoc_topics_task('test')  # the same split in every run


# ---------------------------------------------------------------------------------------
# Clean pretraining data


def _overlap(docs, keys) -> int:
    return sum(text.normalise_paragraph(p) in keys for d in docs for p in text.paragraphs(d))


@pytest.fixture(scope='module')
def task_keys() -> set[str]:
    """Every pydoc_topics task paragraph, normalised: the training examples too, since the
    validation split is carved from them by seed."""
    texts, _, _ = text.pydoc_topic_paragraphs()
    return {text.normalise_paragraph(t) for t in texts}


@pytest.mark.parametrize('name', ['pydoc', 'pydoc_stdlib'])
def test_embedded_corpora_hold_no_text_classification_paragraph(name, task_keys):
    val_and_test = {text.normalise_paragraph(e['text']) for e in labelled.pydoc_topics_task('test')}
    val_and_test |= task_keys  # every validation split of every seed lies in the task
    clean = text.embedded_corpus(name)
    assert _overlap(clean, val_and_test) == 0
    # Not inside a longer paragraph either.
    joined = '\n'.join(
        ' '.join(text.normalise_paragraph(p) for p in text.paragraphs(d)) for d in clean
    )
    assert not [k for k in val_and_test if k in joined]
    # ... and the filter is what makes it so: the raw corpus holds every task paragraph.
    raw = text.embedded_corpus(name, decontaminate=False)
    assert {text.normalise_paragraph(p) for d in raw for p in text.paragraphs(d)} >= task_keys
    assert sum(map(len, raw)) > sum(map(len, text.embedded_corpus(name)))


def test_simcse_topic_probe_reads_no_test_paragraph():
    from pretrain import simcse

    texts, labels, _ = text.pydoc_topic_paragraphs()
    fit, score = simcse.topic_probe_indices()
    test = {e['text'] for e in labelled.pydoc_topics_task('test')}
    assert len(fit) and len(score) and not set(fit) & set(score)
    assert not {texts[i] for i in [*fit, *score]} & test
    assert len(set(labels[score])) == len(set(labels))


def _hashes(source) -> collections.Counter:
    return collections.Counter(np.asarray(source[i]['image']).tobytes() for i in range(len(source)))


def test_digits_pretraining_never_sees_the_digits_test_images():
    import ml_collections

    c = ml_collections.ConfigDict({'name': 'digits', 'eval_fraction': 0.2, 'resize': False})
    test = _hashes(digits.digits_images(8, 1, split='test'))
    assert sum(test.values()) == 389
    train, eval_ = image_splits.image_splits(c, 8, 1)
    assert len(train) + len(eval_) == 1797 - 389
    assert not (_hashes(train) | _hashes(eval_)) & test
    c.name = 'digits_captions'
    train, eval_ = image_splits.pair_splits(c, 8, 1)
    assert len(train) + len(eval_) == 1797 - 389
    assert not (_hashes(train) | _hashes(eval_)) & test


# ---------------------------------------------------------------------------------------
# The test split: read once, after training, on the validation-selected checkpoint


def _write_tsv(path, n: int, seed: int) -> str:
    words = {
        'negative': ['error', 'raise', 'exception', 'fails', 'invalid', 'deprecated'],
        'positive': ['return', 'value', 'list', 'string', 'module', 'class'],
    }
    rng = np.random.default_rng(seed)
    with open(path, 'w') as f:
        f.write('text\tlabel\n')
        for i in range(n):
            label = ('negative', 'positive')[i % 2]
            f.write(' '.join(rng.choice(words[label], size=6)) + f'\t{label}\n')
    return str(path)


def _rows(workdir) -> list[dict]:
    path = os.path.join(workdir, 'metrics.jsonl')
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _text_config(workdir, vocab, **data):
    from configs import text_cls

    c = text_cls.get_config('tiny')
    c.model.update(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64, vocab_size=1024)
    c.data.update(seq_len=32, vocab_file=vocab, **data)
    c.update(batch_size=8, total_steps=6, warmup_steps=1, eval_every=2, checkpoint_every=2)
    c.log_every = 2
    return c


def test_the_test_split_is_read_once_after_training_on_the_selected_checkpoint(
    tmp_path, monkeypatch, pydoc_vocab
):

    train_tsv = _write_tsv(tmp_path / 'train.tsv', 48, 0)
    test_tsv = _write_tsv(tmp_path / 'test.tsv', 10, 1)
    workdir = str(tmp_path / 'run')
    config = _text_config(workdir, pydoc_vocab, files=train_tsv, test_files=test_tsv)
    reads = []
    read = labelled.read_labelled_text

    def spy(pattern, **kw):
        if pattern == test_tsv:
            reads.append(_rows(workdir))  # what the run had written when the test was read
        return read(pattern, **kw)

    monkeypatch.setattr(labelled, 'read_labelled_text', spy)
    summary = trainer.train_and_evaluate(config, workdir, 'finetune')

    assert len(reads) == 1, 'the test split is read exactly once'
    before = reads[0]
    assert not any(r['split'] == 'test' for r in before)
    assert [r['step'] for r in before if r['split'] == 'eval'] == [0, 2, 4, 6]  # all done
    rows = _rows(workdir)
    tests = [r for r in rows if r['split'] == 'test']
    assert len(tests) == 1 and rows[-1] == tests[0]
    selected = selection.best_kept_step(workdir, 'accuracy')
    assert tests[0]['step'] == selected == summary['test_step'] == summary['best_checkpoint_step']
    assert summary['test_accuracy'] == tests[0]['accuracy']
    assert {f'test_{k}' for k in tests[0] if k not in ('step', 'split')} <= set(summary)
    evals = {r['step']: r for r in rows if r['split'] == 'eval'}
    assert summary['best_accuracy'] == evals[selected]['accuracy']  # a validation figure
    with open(os.path.join(workdir, 'summary.json')) as f:
        assert json.load(f) == summary

    # The evaluate stage: the same checkpoint on the test split by default, on the
    # validation split when asked; predictions of the split it scored.
    report = trainer.evaluate_checkpoint(config, workdir)
    assert report['split'] == 'test' and report['step'] == selected
    assert report['accuracy'] == pytest.approx(tests[0]['accuracy'], abs=1e-6)
    with open(os.path.join(workdir, 'predictions.jsonl')) as f:
        assert len(f.readlines()) == 10
    config.eval.evaluate_split = 'validation'
    report = trainer.evaluate_checkpoint(config, workdir)
    assert report['split'] == 'validation'
    assert report['accuracy'] == pytest.approx(evals[selected]['accuracy'], abs=1e-6)
    config.eval.evaluate_split = 'test'
    assert len(reads) == 2  # the first evaluate read it; the second did not

    # A finished run started again reads nothing and scores nothing again.
    again = trainer.train_and_evaluate(config, workdir, 'finetune')
    assert again == summary and _rows(workdir) == rows and len(reads) == 2


def test_embedded_text_task_scores_its_fixed_test_split(tmp_path, monkeypatch, pydoc_vocab):

    calls = []
    task = labelled.pydoc_topics_task
    monkeypatch.setattr(
        labelled, 'pydoc_topics_task', lambda split: calls.append(split) or task(split)
    )
    workdir = str(tmp_path / 'topics')
    config = _text_config(workdir, pydoc_vocab)
    config.total_steps = 2
    summary = trainer.train_and_evaluate(config, workdir, 'finetune')
    assert calls == ['train', 'test']
    tests = [r for r in _rows(workdir) if r['split'] == 'test']
    assert len(tests) == 1 and summary['test_step'] == tests[0]['step'] == 2
    assert 0.0 <= summary['test_accuracy'] <= 1.0
    # The validation split: a tenth of each topic's training paragraphs, carved by seed.
    train = task('train')
    _, val = labelled.validation_split(
        np.array([e['label'] for e in train]), config.data.eval_fraction, config.seed
    )
    assert summary['train_examples'] == len(train) - len(val)


def test_split_config_errors(tmp_path, pydoc_vocab):
    from core.errors import ConfigError, DataError

    workdir = str(tmp_path / 'w')
    train_tsv = _write_tsv(tmp_path / 'train.tsv', 8, 0)

    def fails(error, match, **data):
        config = _text_config(workdir, pydoc_vocab, **data)
        with pytest.raises(error, match=match):
            trainer.train_and_evaluate(config, workdir, 'finetune')

    fails(ConfigError, 'give one', files=train_tsv, test_files=train_tsv, test_split='test')
    fails(ConfigError, 'ships its own test split', test_files=train_tsv)
    fails(ConfigError, 'names a TFDS split', files=train_tsv, test_split='test')
    # A test file that is not there stops the run at start, not after training.
    fails(DataError, 'no files match', files=train_tsv, test_files=str(tmp_path / 'no*.tsv'))
    assert not os.path.exists(os.path.join(workdir, 'metrics.jsonl'))
    config = _text_config(workdir, pydoc_vocab)
    config.eval.evaluate_split = 'dev'
    with pytest.raises(ConfigError, match='evaluate_split'):
        trainer.train_and_evaluate(config, workdir, 'finetune')


def test_a_test_image_folder_is_opened_only_when_asked(tmp_path):
    import ml_collections
    from PIL import Image

    def folder(root, per_class: int, shade: int) -> str:
        for name in ('cat', 'dog'):
            os.makedirs(root / name)
            for i in range(per_class):
                pixels = np.full((4, 4), shade + i, np.uint8)
                Image.fromarray(pixels, mode='L').save(root / name / f'{i}.png')
        return str(root)

    c = ml_collections.ConfigDict(
        {'files': folder(tmp_path / 'train', 5, 0), 'test_files': str(tmp_path / 'test')}
    )
    train, validation, open_test = image_splits.labelled_image_splits(c, 4, 1)
    assert len(train) == 10 and validation is None  # carved by the caller, by seed
    folder(tmp_path / 'test', 2, 100)  # the test folder exists only from here on
    test = open_test()
    assert len(test) == 4 and test.classes == ['cat', 'dog'] and test[0]['image'].min() >= 100


def test_image_split_config_errors(tmp_path):
    from configs import image_cls as image_config
    from core.errors import ConfigError, DataError
    from finetune import image_cls

    def fails(error, match, **data):
        c = image_config.get_config('tiny')
        c.data.update(data)
        with pytest.raises(error, match=match):
            image_cls.check_config(c)

    fails(ConfigError, 'ships its own test split', test_files=str(tmp_path))
    fails(ConfigError, 'names a TFDS split', files=str(tmp_path), test_split='test')
    fails(DataError, 'does not exist', files=str(tmp_path), test_files=str(tmp_path / 'none'))


def test_digits_test_images_are_read_once_at_the_end(tmp_path, monkeypatch):
    from configs import image_cls as image_config

    workdir = str(tmp_path / 'digits')
    read = digits.digits_images
    calls = []

    def spy(*args, split='all', **kw):
        calls.append((split, len(_rows(workdir))))
        return read(*args, split=split, **kw)

    monkeypatch.setattr(image_splits, 'digits_images', spy)  # where the splits find it
    c = image_config.get_config('tiny')
    c.model.update(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64)
    c.update(batch_size=32, total_steps=2, warmup_steps=1, eval_every=1, checkpoint_every=1)
    summary = trainer.train_and_evaluate(c, workdir, 'finetune')
    rows = _rows(workdir)
    assert [split for split, _ in calls] == ['train', 'test']
    assert calls[1][1] == len(rows) - 1  # everything but the test row was written before
    assert rows[-1]['split'] == 'test' and summary['test_step'] == rows[-1]['step']
    assert summary['train_examples'] == 1408 - 140  # a tenth of each class validates
