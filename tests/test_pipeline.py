"""WordPiece tokenizer (data/tokenizer.py) and the Grain MLM pipeline (data/pipeline.py)."""

import collections
import os
import pickle
import subprocess
import sys

import grain
import ml_collections
import numpy as np
import pytest

from core.errors import DataError
from data import pipeline
from data.pipeline import masking_spec, mlm_dataset, most_frequent_token, pad_batch
from data.text import embedded_corpus
from data.tokenizer import SPECIAL_TOKENS, WordPiece, train_wordpiece

SEQ_LEN, MAX_PREDICTIONS, BATCH = 32, 5, 4
NUM_WORDS = 40


def data_config(**overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(
        {
            'seq_len': SEQ_LEN,
            'max_predictions': MAX_PREDICTIONS,
            'mask_prob': 0.15,
            'whole_word_masking': False,
        }
    )
    c.update(overrides)
    return c


@pytest.fixture(scope='module')
def pydoc():
    return embedded_corpus('pydoc')


@pytest.fixture(scope='module')
def trained(pydoc, tmp_path_factory):
    """A 500-token WordPiece vocabulary trained on the pydoc corpus."""
    path = str(tmp_path_factory.mktemp('vocab') / 'sub' / 'vocab.txt')
    return train_wordpiece(pydoc, 500, path), path


@pytest.fixture(scope='module')
def words(tmp_path_factory):
    """A hand-written vocabulary where every document 'wordI' is one token of its own."""
    path = tmp_path_factory.mktemp('words') / 'vocab.txt'
    tokens = [*SPECIAL_TOKENS, '[unused0]', *(f'word{i}' for i in range(NUM_WORDS)), '##s']
    path.write_text('\n'.join(tokens) + '\n', encoding='utf-8')
    tokenizer = WordPiece(str(path))
    docs = [f'word{i}' for i in range(NUM_WORDS)]
    return tokenizer, docs


def take(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def close(iterator):
    if hasattr(iterator, 'close'):
        iterator.close()


def assert_batches_equal(a: list[dict], b: list[dict]):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def unmasked_tokens(example_or_batch: dict) -> list[list[int]]:
    """The text tokens of each example before masking, without [CLS] and the final [SEP]."""
    ids = np.atleast_2d(example_or_batch['input_ids']).copy()
    positions = np.atleast_2d(example_or_batch['masked_positions'])
    targets = np.atleast_2d(example_or_batch['masked_ids'])
    weights = np.atleast_2d(example_or_batch['masked_weights'])
    lengths = np.atleast_2d(example_or_batch['input_mask']).sum(axis=1)
    out = []
    for row in range(len(ids)):
        real = weights[row] > 0
        ids[row, positions[row, real]] = targets[row, real]
        out.append(ids[row, 1 : lengths[row] - 1].tolist() if lengths[row] else [])
    return out


def word_ids(batches: list[dict], tokenizer: WordPiece) -> list[int]:
    """The word tokens of every example, in order ([SEP] between documents dropped)."""
    stream = [t for b in batches for example in unmasked_tokens(b) for t in example]
    return [t for t in stream if t != tokenizer.sep_id]


# --- tokenizer ----------------------------------------------------------------------------


def test_train_wordpiece_writes_a_loadable_vocabulary(trained):
    tokenizer, path = trained
    assert 100 < tokenizer.vocab_size <= 500
    loaded = WordPiece(path)
    assert loaded.vocab_size == tokenizer.vocab_size
    text = 'The return statement leaves the current function call.'
    ids = loaded.encode(text)
    assert ids.dtype == np.int32 and len(ids) > 3
    np.testing.assert_array_equal(ids, tokenizer.encode(text))
    assert loaded.decode(ids).replace(' ', '') == text.lower().replace(' ', '')


def test_a_trained_vocabulary_is_the_same_in_every_process(tmp_path):
    """`tokenizers` numbers the ##-continuations in hash-map order, random per process; two
    fresh interpreters must still write the same vocab.txt byte for byte."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        'import sys; from data.text import embedded_corpus; '
        'from data.tokenizer import train_wordpiece; '
        "train_wordpiece(embedded_corpus('pydoc'), 1024, sys.argv[1])"
    )
    paths = [tmp_path / f'{i}.txt' for i in range(2)]
    for path in paths:
        env = dict(os.environ, PYTHONPATH=root)
        subprocess.run([sys.executable, '-c', code, str(path)], check=True, cwd=root, env=env)
    first, second = (p.read_bytes() for p in paths)
    assert first == second
    assert len(first.splitlines()) == 1024


def test_continuation_tokens_are_plain_vocabulary_after_reload(trained):
    """The ##-tokens given to the trainer as special tokens are ordinary WordPieces in the
    saved vocabulary: a literal '##e' in text is punctuation and a letter, as in BERT."""
    tokenizer, path = trained
    loaded = WordPiece(path)
    assert loaded.encode('##e').tolist() == loaded.encode('# # e').tolist()
    assert loaded.is_special.sum() == len(SPECIAL_TOKENS)
    word = loaded.encode('generators')
    assert loaded.is_continuation[word[1:]].all() and not loaded.is_continuation[word[0]]


def test_special_ids_are_distinct_and_marked(trained):
    tokenizer, _ = trained
    specials = [
        tokenizer.pad_id,
        tokenizer.unk_id,
        tokenizer.cls_id,
        tokenizer.sep_id,
        tokenizer.mask_id,
    ]
    assert len(set(specials)) == 5
    assert tokenizer.is_special[specials].all()
    assert tokenizer.is_special.sum() == 5  # trained vocabularies hold no other [..] tokens
    assert tokenizer.is_continuation.any() and not tokenizer.is_continuation[specials].any()
    assert (tokenizer.encode('the') < tokenizer.vocab_size).all()


def test_bracketed_and_continuation_tokens_are_flagged(words):
    tokenizer, _ = words
    unused = SPECIAL_TOKENS.__len__()  # '[unused0]' follows the five special tokens
    assert tokenizer.is_special[unused]
    assert tokenizer.is_continuation[tokenizer.vocab_size - 1]  # '##s'
    assert not tokenizer.is_special[unused + 1 :].any()
    assert tokenizer.encode('word3 word17').tolist() == [unused + 4, unused + 18]
    assert tokenizer.encode('unknownthing').tolist() == [tokenizer.unk_id]


def test_tokenizer_pickles(trained):
    tokenizer, _ = trained
    clone = pickle.loads(pickle.dumps(tokenizer))
    text = 'Iterators and generators'
    np.testing.assert_array_equal(clone.encode(text), tokenizer.encode(text))
    assert clone.mask_id == tokenizer.mask_id


def test_vocab_without_special_tokens_is_a_data_error(tmp_path):
    path = tmp_path / 'vocab.txt'
    path.write_text('[PAD]\n[UNK]\nthe\nof\n##s\n', encoding='utf-8')
    with pytest.raises(DataError) as e:
        WordPiece(str(path))
    message = str(e.value)
    assert str(path) in message
    for missing in ('[CLS]', '[SEP]', '[MASK]'):
        assert missing in message


def test_missing_vocab_file_is_a_data_error(tmp_path):
    path = str(tmp_path / 'nowhere' / 'vocab.txt')
    with pytest.raises(DataError, match='not found') as e:
        WordPiece(path)
    assert path in str(e.value)


# --- MLM pipeline -------------------------------------------------------------------------


def test_batches_have_the_right_shapes_and_dtypes(pydoc, trained):
    tokenizer, _ = trained
    spec = masking_spec(tokenizer, data_config())
    it = iter(mlm_dataset(pydoc, tokenizer, spec, batch_size=BATCH, seed=0, prefetch=0))
    batch = next(it)
    expected = {
        'input_ids': ((BATCH, SEQ_LEN), np.int32),
        'input_mask': ((BATCH, SEQ_LEN), np.int32),
        'segment_ids': ((BATCH, SEQ_LEN), np.int32),
        'masked_positions': ((BATCH, MAX_PREDICTIONS), np.int32),
        'masked_ids': ((BATCH, MAX_PREDICTIONS), np.int32),
        'masked_weights': ((BATCH, MAX_PREDICTIONS), np.float32),
    }
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
    # Packed training chunks are full: [CLS] + seq_len - 2 tokens + [SEP].
    np.testing.assert_array_equal(batch['input_mask'], 1)
    np.testing.assert_array_equal(batch['input_ids'][:, 0], tokenizer.cls_id)
    np.testing.assert_array_equal(batch['input_ids'][:, -1], tokenizer.sep_id)
    np.testing.assert_array_equal(batch['masked_weights'].sum(axis=1), 4)  # round(30 * .15)
    assert (batch['input_ids'] < tokenizer.vocab_size).all()


def test_same_seed_same_batches_different_seed_different(pydoc, trained):
    tokenizer, _ = trained
    spec = masking_spec(tokenizer, data_config())

    def first_batches(seed):
        it = iter(mlm_dataset(pydoc, tokenizer, spec, batch_size=BATCH, seed=seed, prefetch=0))
        return take(it, 3)

    a, b, c = first_batches(1), first_batches(1), first_batches(2)
    assert_batches_equal(a, b)
    assert not np.array_equal(a[0]['input_ids'], c[0]['input_ids'])


def test_training_repeats_with_a_new_order_every_epoch(words):
    tokenizer, docs = words
    spec = masking_spec(tokenizer, data_config())
    it = iter(mlm_dataset(docs, tokenizer, spec, batch_size=BATCH, seed=0, prefetch=0))
    # Each document is 2 tokens (word, [SEP]): 3 epochs are 240 tokens, 8 chunks of 30.
    stream = word_ids(take(it, 3), tokenizer)
    assert len(stream) >= 3 * NUM_WORDS
    first, second = stream[:NUM_WORDS], stream[NUM_WORDS : 2 * NUM_WORDS]
    assert sorted(first) == sorted(second) == sorted(tokenizer.encode(' '.join(docs)).tolist())
    assert first != second  # reshuffled
    assert first != sorted(first)  # shuffled at all


@pytest.mark.parametrize('prefetch', [0, 2])
def test_resume_from_iterator_state_gives_the_same_batches(words, prefetch):
    tokenizer, docs = words
    spec = masking_spec(tokenizer, data_config())

    def dataset():
        return mlm_dataset(docs, tokenizer, spec, batch_size=BATCH, seed=3, prefetch=prefetch)

    k, m = 5, 4  # k batches cross two epochs of this small corpus
    uninterrupted = iter(dataset())
    expected = take(uninterrupted, k + m)
    close(uninterrupted)

    first = iter(dataset())
    take(first, k)
    state = first.get_state()
    take(first, 2)  # the saved state must not move with later reads
    close(first)

    resumed = iter(dataset())
    resumed.set_state(state)
    assert_batches_equal(take(resumed, m), expected[k:])
    close(resumed)


def test_resume_on_a_real_corpus(pydoc, trained):
    tokenizer, _ = trained
    spec = masking_spec(tokenizer, data_config())

    def dataset():
        return mlm_dataset(pydoc, tokenizer, spec, batch_size=BATCH, seed=0, prefetch=2)

    uninterrupted = iter(dataset())
    expected = take(uninterrupted, 10)
    close(uninterrupted)
    first = iter(dataset())
    take(first, 7)
    state = first.get_state()
    close(first)
    resumed = iter(dataset())
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 3), expected[7:])
    close(resumed)


def eval_examples(docs, tokenizer, spec, **kwargs) -> list[dict]:
    it = iter(mlm_dataset(docs, tokenizer, spec, batch_size=BATCH, seed=0, train=False, **kwargs))
    batches = list(it)
    close(it)
    return batches


def test_host_shards_read_disjoint_documents(words):
    tokenizer, docs = words
    spec = masking_spec(tokenizer, data_config())
    seen = []
    for shard in range(2):
        batches = eval_examples(docs, tokenizer, spec, shard_index=shard, shard_count=2, prefetch=0)
        seen.append(word_ids(batches, tokenizer))
    assert len(seen[0]) == len(set(seen[0])) == NUM_WORDS // 2
    assert len(seen[1]) == len(set(seen[1])) == NUM_WORDS // 2
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(tokenizer.encode(' '.join(docs)).tolist())


def test_host_shards_are_disjoint_in_training(words):
    tokenizer, docs = words
    spec = masking_spec(tokenizer, data_config())
    seen = []
    for shard in range(2):
        it = iter(
            mlm_dataset(
                docs, tokenizer, spec, batch_size=BATCH, seed=0, shard_index=shard, shard_count=2
            )
        )
        seen.append(set(word_ids(take(it, 3), tokenizer)))
        close(it)
    assert len(seen[0]) == len(seen[1]) == NUM_WORDS // 2
    assert not seen[0] & seen[1]


def test_eval_reads_every_document_once_and_ends(words):
    tokenizer, docs = words
    spec = masking_spec(tokenizer, data_config())
    batches = eval_examples(docs, tokenizer, spec, prefetch=2)
    # 40 documents of 2 tokens: 80 tokens in chunks of 30 -> 3 examples, one batch of 3.
    assert [len(b['input_ids']) for b in batches] == [3]
    assert word_ids(batches, tokenizer) == tokenizer.encode(' '.join(docs)).tolist()  # in order
    assert batches[0]['input_mask'].sum(axis=1).tolist() == [32, 32, 22]
    assert_batches_equal(batches, eval_examples(docs, tokenizer, spec, prefetch=0))


def test_pad_batch_pads_with_zero_weight_examples(words):
    tokenizer, docs = words
    spec = masking_spec(tokenizer, data_config())
    (short,) = eval_examples(docs, tokenizer, spec, prefetch=0)
    padded = pad_batch(short, BATCH)
    for key, value in padded.items():
        assert value.shape == (BATCH, *short[key].shape[1:]), key
        assert value.dtype == short[key].dtype, key
        np.testing.assert_array_equal(value[:3], short[key])
        np.testing.assert_array_equal(value[3:], 0)
    assert padded['masked_weights'][3:].sum() == 0
    assert pad_batch(padded, BATCH) is padded  # a full batch is left alone


def test_most_frequent_token_is_not_special(words):
    tokenizer, _ = words
    # Unknown words make [UNK] the most frequent id overall; 'word7' is the answer.
    docs = ['zzz yyy xxx word7 word7', 'qqq word7 word2 vvv', 'www [SEP] [SEP] [SEP] [SEP]']
    token = most_frequent_token(docs, tokenizer)
    assert token == tokenizer.encode('word7')[0]
    assert not tokenizer.is_special[token]


def test_most_frequent_token_on_pydoc(pydoc, trained):
    tokenizer, _ = trained
    token = most_frequent_token(pydoc, tokenizer)
    assert not tokenizer.is_special[token]
    counts = np.bincount(np.concatenate(tokenizer.encode_batch(pydoc[:300])), minlength=500)
    the = tokenizer.encode('the')[0]
    assert counts[token] >= counts[the] > 1000


@pytest.mark.parametrize('n', [12, 300])  # the NumPy path below SMALL_EPOCH, Grain's above
def test_shuffle_forever_reshuffles_every_epoch_deterministically(n):
    from data.pipeline import SMALL_EPOCH, shuffle_forever

    assert (n < SMALL_EPOCH) == (n == 12)
    ds = grain.MapDataset.range(n)
    a, b, c = shuffle_forever(ds, 3), shuffle_forever(ds, 3), shuffle_forever(ds, 4)
    epochs = [[a[e * n + i] for i in range(n)] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))  # every item once per epoch
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(n))
    assert [b[i] for i in range(3 * n)] == sum(epochs, [])  # the same for a seed
    assert [c[i] for i in range(n)] != epochs[0]


class CountingTokenizer:
    """The tokenizer, counting the documents it encodes."""

    def __init__(self, tokenizer: WordPiece):
        self.tokenizer, self.calls = tokenizer, collections.Counter()

    def encode(self, text: str) -> np.ndarray:
        self.calls[text] += 1
        return self.tokenizer.encode(text)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


KEPT_BYTES = pipeline.TOKEN_CACHE_BYTES


@pytest.mark.parametrize('cache_bytes', [20_000, KEPT_BYTES])
def test_documents_are_tokenized_once_and_the_batches_do_not_change(
    pydoc, trained, monkeypatch, cache_bytes
):
    """The pipeline keeps a document's ids for its next epochs (the embedded corpus is read
    25 times by the default run), up to TOKEN_CACHE_BYTES: the same batches as tokenizing
    every time, and past the bound the rest is tokenized each time, as before."""
    tokenizer, _ = trained
    docs = pydoc[:40]
    spec = masking_spec(tokenizer, data_config())
    tokens = sum(len(tokenizer.encode(d)) + 1 for d in docs)
    steps = 3 * tokens // (BATCH * (SEQ_LEN - 2)) + 1  # three epochs and a bit

    def batches(bytes_kept: int) -> tuple[list[dict], collections.Counter]:
        monkeypatch.setattr(pipeline, 'TOKEN_CACHE_BYTES', bytes_kept)
        counting = CountingTokenizer(tokenizer)
        ds = mlm_dataset(docs, counting, spec, batch_size=BATCH, seed=3, prefetch=0)
        return take(iter(ds), steps), counting.calls

    every_time, calls = batches(0)
    assert min(calls[d] for d in docs) >= 3
    kept, calls = batches(cache_bytes)
    assert_batches_equal(kept, every_time)
    if cache_bytes == KEPT_BYTES:
        assert set(calls) == set(docs) and set(calls.values()) == {1}
    else:  # room for some documents: those once, the rest each time
        assert 1 in calls.values() and max(calls.values()) >= 3
