"""Labelled data for fine-tuning (data/labelled.py, data/labels.py, data/token_files.py) and
its metrics (finetune/metrics.py)."""

import json
import os

import numpy as np
import pytest

from core.errors import ConfigError, DataError
from data import labelled, token_files
from data.labelled import select_train_examples
from data.labels import LabelMap
from data.token_files import align_tags
from data.tokenizer import WordPiece
from finetune import metrics


def write(path, text: str) -> str:
    with open(path, 'w', encoding='utf-8') as f:
        f.write(text)
    return str(path)


# --- read_labelled_text -----------------------------------------------------------------------


def test_tsv_with_header(tmp_path):
    # GLUE-style: the label column is not the first, and a sentence holds an unbalanced quote.
    write(tmp_path / 'train.tsv', 'id\tsentence\tlabel\n1\ta " quoted start\t1\n2\tplain\t0\n')
    got = labelled.read_labelled_text(str(tmp_path / '*.tsv'), text_field='sentence')
    assert got == [
        {'text': 'a " quoted start', 'text_pair': '', 'label': '1'},
        {'text': 'plain', 'text_pair': '', 'label': '0'},
    ]


def test_csv_with_quoted_commas_and_pairs(tmp_path):
    write(
        tmp_path / 'pairs.csv',
        'premise,hypothesis,gold\n"one, two",three,entailment\nfour,"five, six",neutral \n',
    )
    got = labelled.read_labelled_text(
        str(tmp_path / 'pairs.csv'),
        text_field='premise',
        text_pair_field='hypothesis',
        label_field='gold',
    )
    assert got == [
        {'text': 'one, two', 'text_pair': 'three', 'label': 'entailment'},
        {'text': 'four', 'text_pair': 'five, six', 'label': 'neutral'},
    ]


def test_jsonl_and_several_globs(tmp_path):
    write(tmp_path / 'a.jsonl', '{"text": "x", "label": 1}\n\n{"text": "y", "label": "neg"}\n')
    write(tmp_path / 'b.tsv', 'text\tlabel\nz\tpos\n')
    pattern = f'{tmp_path}/*.jsonl,{tmp_path}/*.tsv'
    got = labelled.read_labelled_text(pattern)
    assert [(e['text'], e['label']) for e in got] == [('x', '1'), ('y', 'neg'), ('z', 'pos')]


def test_headerless_tsv_by_index(tmp_path):
    write(tmp_path / 'cola.tsv', 'src\t1\t\tgood sentence\nsrc\t0\t*\tbad sentence\n')
    got = labelled.read_labelled_text(
        str(tmp_path / 'cola.tsv'), text_field='3', label_field='1', header=False
    )
    assert got == [
        {'text': 'good sentence', 'text_pair': '', 'label': '1'},
        {'text': 'bad sentence', 'text_pair': '', 'label': '0'},
    ]
    with pytest.raises(ConfigError, match='0-based index'):
        labelled.read_labelled_text(str(tmp_path / 'cola.tsv'), text_field='text', header=False)
    with pytest.raises(DataError, match=r'cola.tsv line 1: found 4 column\(s\)'):
        labelled.read_labelled_text(
            str(tmp_path / 'cola.tsv'), text_field='7', label_field='1', header=False
        )


def test_missing_column_and_field_errors(tmp_path):
    path = write(tmp_path / 'train.tsv', 'sentence\tlabel\nhello\t1\n')
    with pytest.raises(DataError) as e:
        labelled.read_labelled_text(path)  # text_field='text' is not a column
    message = str(e.value)
    assert 'train.tsv line 1' in message
    assert "['sentence', 'label']" in message
    assert '--config.data.text_field' in message

    path = write(tmp_path / 'short.tsv', 'text\tlabel\nhello\t1\n\nshort\n')
    with pytest.raises(DataError, match=r"short.tsv line 4: found 1 column\(s\).*\['label'\]"):
        labelled.read_labelled_text(path)

    path = write(tmp_path / 'train.jsonl', '{"text": "a", "label": "x"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"line 2 has no field 'label' \(fields: \['text'\]\)"):
        labelled.read_labelled_text(path)
    with pytest.raises(DataError, match='no files match'):
        labelled.read_labelled_text(str(tmp_path / 'none*.tsv'))
    path = write(tmp_path / 'train.txt', 'hello\n')
    with pytest.raises(DataError, match="unsupported extension '.txt'"):
        labelled.read_labelled_text(path)


# --- LabelMap ------------------------------------------------------------------------------


def test_label_map_round_trip_and_unknown_labels(tmp_path):
    label_map = LabelMap.fit(['pos', 'neg', 'neutral', 'neg'])
    assert label_map.classes == ['neg', 'neutral', 'pos']
    assert label_map.num_classes == 3
    ids = label_map.encode(['pos', 'neg'])
    assert ids.dtype == np.int32 and ids.tolist() == [2, 0]
    assert label_map.decode(ids) == ['pos', 'neg']

    path = str(tmp_path / 'run' / 'labels.json')
    label_map.save(path)
    assert LabelMap.load(path) == label_map
    assert not [f for f in os.listdir(tmp_path / 'run') if f != 'labels.json']  # no tmp left

    with pytest.raises(DataError) as e:
        label_map.encode(['pos', 'a', 'b', 'a', 'c', 'd', 'e', 'f'], where='dev.tsv')
    message = str(e.value)
    assert message.startswith('dev.tsv')
    assert "['a', 'b', 'c', 'd', 'e'] (and 1 more)" in message
    assert "['neg', 'neutral', 'pos']" in message


def test_label_map_numeric_order_and_bad_fits(tmp_path):
    assert LabelMap.fit(['10', '2', '0', '1', '2']).classes == ['0', '1', '2', '10']
    assert LabelMap.fit(['b', '3', 'a', '-1']).classes == ['-1', '3', 'a', 'b']
    with pytest.raises(DataError, match='single label'):
        LabelMap.fit(['x', 'x'])
    with pytest.raises(DataError, match='empty label'):
        LabelMap.fit(['x', '', 'y'])
    write(tmp_path / 'bad.json', '{"classes": ["a"]}')
    with pytest.raises(DataError, match='not a label map'):
        LabelMap.load(str(tmp_path / 'bad.json'))
    with pytest.raises(DataError, match='not found'):
        LabelMap.load(str(tmp_path / 'missing.json'))


def test_regression_labels(tmp_path):
    label_map = LabelMap.fit(['0.5', '3', '-1e-1'], regression=True)
    assert label_map.num_classes == 1
    values = label_map.encode([' 2.25', '4'])
    assert values.dtype == np.float32 and values.tolist() == [2.25, 4.0]
    with pytest.raises(DataError, match=r"numeric labels, found \['high', 'nan'\]"):
        label_map.encode(['1', 'high', 'nan'], where='dev.tsv')
    label_map.save(str(tmp_path / 'labels.json'))
    assert LabelMap.load(str(tmp_path / 'labels.json')).regression


# --- select_train_examples ------------------------------------------------------------------

LABELS = np.repeat(np.arange(4), [50, 30, 8, 2])  # unbalanced classes
LABELS = LABELS[np.random.default_rng(0).permutation(len(LABELS))]


def per_class(indices: np.ndarray) -> list[int]:
    return np.bincount(LABELS[indices], minlength=4).tolist()


def test_select_counts_and_fractions():
    assert select_train_examples(LABELS, '', 0).tolist() == list(range(len(LABELS)))
    for spec in (None, 0, '0', 'all'):
        assert len(select_train_examples(LABELS, spec, 0)) == len(LABELS)
    for spec in (10, '10', ' 10 '):
        chosen = select_train_examples(LABELS, spec, 0)
        assert per_class(chosen) == [10, 10, 8, 2]  # all of a class that has fewer
        assert np.all(np.diff(chosen) > 0)  # sorted, unique
    assert per_class(select_train_examples(LABELS, 0.1, 0)) == [5, 3, 1, 1]  # >= 1 a class
    assert per_class(select_train_examples(LABELS, '0.5', 0)) == [25, 15, 4, 1]


def test_select_seeds_and_nesting():
    a = select_train_examples(LABELS, 5, seed=1)
    assert np.array_equal(a, select_train_examples(LABELS, '5', seed=1))
    assert not np.array_equal(a, select_train_examples(LABELS, 5, seed=2))
    for seed in (0, 1, 7):
        previous = np.zeros(0, np.int64)
        for k in (1, 2, 5, 10, 20, 100):
            chosen = select_train_examples(LABELS, k, seed)
            assert np.isin(previous, chosen).all(), (seed, k)
            previous = chosen
        small = select_train_examples(LABELS, 0.1, seed)
        assert np.isin(small, select_train_examples(LABELS, 0.4, seed)).all()
    whole = select_train_examples(np.zeros(50), 10, 0, per_class=False)
    assert len(whole) == 10


@pytest.mark.parametrize('spec', [-1, '-3', 1.5, '2.5', 1.0, 'abc', 'nan', True])
def test_select_bad_specs(spec):
    with pytest.raises(ConfigError, match='--config.train_examples'):
        select_train_examples(LABELS, spec, 0)


# --- embedded task ------------------------------------------------------------------------


def test_pydoc_topics_task():
    train, test = labelled.pydoc_topics_task('train'), labelled.pydoc_topics_task('test')
    n = len(train) + len(test)
    assert n == len(labelled.pydoc_topic_paragraphs()[0]) > 800
    assert 0.25 < len(test) / n < 0.35
    texts = [e['text'] for e in train + test]
    assert len(set(texts)) == n  # each paragraph once: disjoint splits, one label a text
    assert set(train[0]) == {'text', 'text_pair', 'label'}
    classes = {e['label'] for e in train}
    assert len(classes) >= 10 and {e['label'] for e in test} <= classes
    assert LabelMap.fit(e['label'] for e in train).encode(e['label'] for e in test).size
    assert test == labelled.pydoc_topics_task('test')  # the same split every run


# --- token classification ----------------------------------------------------------------

CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O


Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER

-DOCSTART- -X- -X- O

BRUSSELS NNP B-NP B-LOC
"""


def test_read_conll_and_jsonl(tmp_path):
    write(tmp_path / 'train.conll', CONLL)
    got = token_files.read_conll(str(tmp_path / 'train.conll'))
    assert got == [
        {'tokens': ['EU', 'rejects', 'German', 'call'], 'tags': ['B-ORG', 'O', 'B-MISC', 'O']},
        {'tokens': ['Peter', 'Blackburn'], 'tags': ['B-PER', 'I-PER']},
        {'tokens': ['BRUSSELS'], 'tags': ['B-LOC']},
    ]
    write(tmp_path / 'two.txt', 'Peter B-PER\nsaid O\n')
    assert token_files.read_token_files(str(tmp_path / 'two.txt'))[0]['tags'] == ['B-PER', 'O']
    write(tmp_path / 'bad.conll', 'Peter B-PER\nlonely\n')
    with pytest.raises(DataError, match='bad.conll line 2'):
        token_files.read_conll(str(tmp_path / 'bad.conll'))

    write(tmp_path / 'a.jsonl', json.dumps({'words': ['Hi', 'Bob'], 'ner': ['O', 'B-PER']}) + '\n')
    got = token_files.read_token_files(str(tmp_path / 'a.jsonl'), 'words', 'ner')
    assert got == [{'tokens': ['Hi', 'Bob'], 'tags': ['O', 'B-PER']}]
    write(tmp_path / 'b.jsonl', json.dumps({'words': ['Hi', 'Bob'], 'ner': ['O']}) + '\n')
    with pytest.raises(DataError, match='b.jsonl line 1: 2 tokens but 1 tags'):
        token_files.read_token_files(str(tmp_path / 'b.jsonl'), 'words', 'ner')


VOCAB = '[PAD] [UNK] [CLS] [SEP] [MASK] the play ##ing ##s new york un ##believ ##able'.split()


@pytest.fixture(scope='module')
def tiny_wordpiece(tmp_path_factory) -> WordPiece:
    path = tmp_path_factory.mktemp('vocab') / 'vocab.txt'
    write(path, '\n'.join(VOCAB) + '\n')
    return WordPiece(str(path))


def test_align_tags_first_pieces(tiny_wordpiece):
    ids = {t: i for i, t in enumerate(VOCAB)}
    tokens = ['The', 'Unbelievable', 'New', 'York', 'plays', 'xyz', '\x00']
    tags = [0, 1, 2, 3, 0, 4, 5]
    out = align_tags(tokens, tags, tiny_wordpiece, 16)
    expected_ids = [
        ids['[CLS]'], ids['the'], ids['un'], ids['##believ'], ids['##able'], ids['new'],
        ids['york'], ids['play'], ids['##s'], ids['[UNK]'], ids['[UNK]'], ids['[SEP]'],
    ]  # fmt: skip
    assert out['input_ids'].tolist() == expected_ids + [0] * 4
    assert out['input_mask'].tolist() == [1] * 12 + [0] * 4
    assert out['labels'].tolist() == [0, 0, 1, 0, 0, 2, 3, 0, 0, 4, 5, 0, 0, 0, 0, 0]
    assert out['label_weights'].tolist() == [0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1, 0, 0, 0, 0, 0]
    assert out['num_words'] == 7
    for key in ('input_ids', 'input_mask', 'labels'):
        assert out[key].dtype == np.int32 and out[key].shape == (16,)
    assert out['label_weights'].dtype == np.float32


def test_align_tags_truncates_whole_words(tiny_wordpiece):
    tokens, tags = ['The', 'Unbelievable', 'New', 'York', 'plays'], [0, 1, 2, 3, 0]
    out = align_tags(tokens, tags, tiny_wordpiece, 8)  # room for 6 pieces: 'plays' (2) cut
    assert out['num_words'] == 4
    assert out['input_ids'].tolist() == [2, 5, 11, 12, 13, 9, 10, 3]
    assert out['label_weights'].sum() == 4
    out = align_tags(tokens, tags, tiny_wordpiece, 7)  # 'York' no longer fits
    assert out['num_words'] == 3 and out['input_ids'].tolist() == [2, 5, 11, 12, 13, 9, 3]
    out = align_tags(tokens, tags, tiny_wordpiece, 4)  # 'Unbelievable' (3 pieces) cut whole
    assert out['num_words'] == 1 and out['input_ids'].tolist() == [2, 5, 3, 0]
    with pytest.raises(DataError, match='one tag per token'):
        align_tags(tokens, tags[:2], tiny_wordpiece, 8)


# --- finetune/metrics ----------------------------------------------------------------------


def test_entity_f1_hand_checked():
    true = [['B-PER', 'I-PER', 'O', 'B-LOC']]
    assert metrics.entity_f1(true, true)['f1'] == 1.0
    wrong_type = metrics.entity_f1(true, [['B-PER', 'I-PER', 'O', 'B-ORG']])
    assert (wrong_type['precision'], wrong_type['recall'], wrong_type['f1']) == (0.5, 0.5, 0.5)
    partial = metrics.entity_f1([['B-PER', 'I-PER', 'I-PER']], [['B-PER', 'I-PER', 'O']])
    assert partial['f1'] == 0.0 and partial['pred_entities'] == 1
    # I- after O starts a chunk, so it matches B- I- at the same span.
    ill_formed = metrics.entity_f1([['O', 'B-PER', 'I-PER', 'O']], [['O', 'I-PER', 'I-PER', 'O']])
    assert ill_formed['f1'] == 1.0
    assert metrics.entity_f1([[]], [[]])['f1'] == 0.0
    assert metrics.entity_chunks(['B-PER', 'I-LOC', 'I-LOC', 'B-LOC']) == [
        ('PER', 0, 1),
        ('LOC', 1, 3),
        ('LOC', 3, 4),
    ]
    assert metrics.entity_chunks(['S-PER', 'B-LOC', 'E-LOC', 'I-LOC', 'O', 'E-ORG']) == [
        ('PER', 0, 1),
        ('LOC', 1, 3),
        ('LOC', 3, 4),
        ('ORG', 5, 6),
    ]
    with pytest.raises(DataError, match="tag '3' is not an IOB2"):
        metrics.entity_f1([['3']], [['O']])
    with pytest.raises(DataError, match='sentence 0'):
        metrics.entity_f1([['O', 'O']], [['O']])


def test_entity_f1_two_sentences_by_hand():
    true = [
        ['B-PER', 'I-PER', 'O', 'B-LOC', 'O'],  # PER(0,2) LOC(3,4)
        ['B-ORG', 'O', 'B-MISC', 'I-MISC'],  # ORG(0,1) MISC(2,4)
    ]
    pred = [
        ['B-PER', 'I-PER', 'O', 'B-LOC', 'O'],  # both right
        ['B-ORG', 'I-LOC', 'B-MISC', 'O'],  # ORG right; LOC(1,2) spurious; MISC(2,3) too short
    ]
    got = metrics.entity_f1(true, pred)
    assert (got['true_entities'], got['pred_entities'], got['correct_entities']) == (4, 5, 3)
    assert got['precision'] == pytest.approx(3 / 5)
    assert got['recall'] == pytest.approx(3 / 4)
    assert got['f1'] == pytest.approx(2 / 3)


def test_classification_metrics_match_sklearn():
    sk = pytest.importorskip('sklearn.metrics')
    rng = np.random.default_rng(0)
    for trial in range(20):
        k = int(rng.integers(2, 7))
        n = int(rng.integers(5, 60))
        labels = rng.integers(0, k, n)
        # Mostly right predictions with noise; some trials leave a class out of both.
        predictions = np.where(rng.random(n) < 0.6, labels, rng.integers(0, k, n))
        got = metrics.classification_metrics(labels, predictions, num_classes=k + trial % 2)
        assert got['accuracy'] == pytest.approx(sk.accuracy_score(labels, predictions))
        assert got['macro_f1'] == pytest.approx(sk.f1_score(labels, predictions, average='macro'))
        assert got['matthews_corrcoef'] == pytest.approx(sk.matthews_corrcoef(labels, predictions))


def test_classification_metrics_degenerate_cases():
    one_class = metrics.classification_metrics([0, 1, 1, 2], [1, 1, 1, 1], 3)
    assert one_class['matthews_corrcoef'] == 0.0
    assert one_class['accuracy'] == 0.5
    perfect = metrics.classification_metrics([0, 1, 2], [0, 1, 2], 3)
    assert perfect == {'accuracy': 1.0, 'macro_f1': 1.0, 'matthews_corrcoef': 1.0}
    with pytest.raises(DataError, match='outside 0..2'):
        metrics.classification_metrics([0, 3], [0, 1], 3)
    with pytest.raises(DataError, match='empty'):
        metrics.classification_metrics([], [], 3)


def test_regression_metrics_match_reference():
    rng = np.random.default_rng(1)
    targets = rng.integers(0, 6, 40).astype(float)  # many ties
    predictions = targets + rng.normal(0, 2, 40).round(0)  # ties too
    got = metrics.regression_metrics(targets, predictions)
    assert got['mse'] == pytest.approx(np.mean((targets - predictions) ** 2))
    assert got['pearson'] == pytest.approx(np.corrcoef(targets, predictions)[0, 1])

    def ranks(x):  # average ranks by brute force
        return np.array([np.sum(x < v) + (np.sum(x == v) + 1) / 2 for v in x])

    expected = np.corrcoef(ranks(targets), ranks(predictions))[0, 1]
    assert got['spearman'] == pytest.approx(expected)

    constant = metrics.regression_metrics([0.1, 0.1, 0.1], [1.0, 2.0, 3.0])
    assert constant['pearson'] == 0.0 and constant['spearman'] == 0.0
    assert np.isnan(metrics.regression_metrics([1, 2], [np.nan, 1.0])['pearson'])


# Figures worked out by hand (and returned by the hand-written metrics before they used
# scikit-learn / scipy), pinned so that moving to the libraries keeps every figure.
CLASSIFICATION_CASES = [
    # labels, predictions, num_classes -> accuracy, macro_f1, matthews_corrcoef
    ([0, 1, 1, 2], [1, 1, 1, 1], 3, 1 / 2, (0 + 2 / 3 + 0) / 3, 0.0),  # one class predicted
    ([1, 1, 1, 1], [1, 0, 1, 2], 3, 1 / 2, (0 + 2 / 3 + 0) / 3, 0.0),  # one class in the labels
    ([0, 0, 0], [0, 0, 0], 2, 1.0, 1.0, 0.0),  # one class in both
    ([2], [2], 3, 1.0, 1.0, 0.0),  # one example
    ([0, 1, 0, 1], [0, 1, 1, 1], 4, 3 / 4, (2 / 3 + 4 / 5) / 2, 1 / 3**0.5),  # 2, 3 absent
    ([True, False, True], [True, True, True], 2, 2 / 3, (0 + 4 / 5) / 2, 0.0),  # bool ids
]


@pytest.mark.parametrize('labels, predictions, k, accuracy, macro_f1, mcc', CLASSIFICATION_CASES)
def test_classification_metrics_pinned(labels, predictions, k, accuracy, macro_f1, mcc):
    got = metrics.classification_metrics(np.array(labels), np.array(predictions), k)
    assert set(got) == {'accuracy', 'macro_f1', 'matthews_corrcoef'}
    assert all(type(v) is float for v in got.values())
    assert got['accuracy'] == pytest.approx(accuracy, rel=1e-12)
    assert got['macro_f1'] == pytest.approx(macro_f1, rel=1e-12)
    assert got['matthews_corrcoef'] == pytest.approx(mcc, rel=1e-12, abs=0)


def test_classification_metrics_refuse_bad_ids():
    with pytest.raises(DataError, match='expected integer class ids in labels'):
        metrics.classification_metrics([0.0, 1.0], [0, 1], 2)
    with pytest.raises(DataError, match='predictions hold class ids from -1 to 1'):
        metrics.classification_metrics([0, 1], [-1, 1], 2)
    with pytest.raises(DataError, match='expected as many predictions as labels, found 1 and 2'):
        metrics.classification_metrics([0, 1], [0], 2)
    with pytest.raises(DataError, match=r'shape \[N\], found shape \(1, 2\)'):
        metrics.classification_metrics([[0, 1]], [[0, 1]], 2)


REGRESSION_CASES = [
    # targets, predictions -> pearson, spearman, mse
    ([0.1, 0.1, 0.1], [1.0, 2.0, 3.0], 0.0, 0.0, ((0.9**2) + (1.9**2) + (2.9**2)) / 3),
    ([1, 2, 3], [5, 5, 5], 0.0, 0.0, (16 + 9 + 4) / 3),  # constant predictions, int inputs
    ([1.0], [2.0], 0.0, 0.0, 1.0),  # one example: constant on both sides
    ([1.0, 2.0], [3.0, 1.0], -1.0, -1.0, 2.5),
    ([1.0, 2.0, 3.0], [3.0, 2.0, 1.0], -1.0, -1.0, 8 / 3),
    # Ties: ranks [1, 2.5, 2.5, 4] and [1, 4, 2.5, 2.5]; centred values give 1 / (√2 √2).
    ([1.0, 2.0, 2.0, 3.0], [1.0, 3.0, 2.0, 2.0], 0.5, 0.5, 2 / 4),
]


@pytest.mark.parametrize('targets, predictions, pearson, spearman, mse', REGRESSION_CASES)
def test_regression_metrics_pinned(targets, predictions, pearson, spearman, mse):
    got = metrics.regression_metrics(np.array(targets), np.array(predictions))
    assert set(got) == {'pearson', 'spearman', 'mse'}
    assert all(type(v) is float for v in got.values())
    assert got['pearson'] == pytest.approx(pearson, rel=1e-12, abs=0)
    assert got['spearman'] == pytest.approx(spearman, rel=1e-12, abs=0)
    assert got['mse'] == pytest.approx(mse, rel=1e-12)


def test_regression_metrics_non_finite():
    diverged = metrics.regression_metrics([1.0, 2.0, 3.0], [1.0, np.inf, 2.0])
    assert np.isnan(diverged['pearson']) and np.isnan(diverged['spearman'])
    assert diverged['mse'] == np.inf
    with pytest.raises(DataError, match='1 regression targets are NaN or infinite'):
        metrics.regression_metrics([1.0, np.nan], [1.0, 2.0])
