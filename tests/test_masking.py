"""BERT masking (data/masking.py): what is chosen, what replaces it, and what comes out."""

import numpy as np
import pytest

from data.masking import MaskingSpec, mask_tokens

# A hand-made vocabulary of 100 ids:
#   0 [PAD], 1 [UNK], 2 [CLS], 3 [SEP], 4 [MASK], 5..9 [unused*] (bracketed: special too),
#   10..59 word starts, 60..99 "##" continuations.
VOCAB = 100
PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIAL = np.arange(VOCAB) < 10
CONTINUATION = np.arange(VOCAB) >= 60
WORD_STARTS = np.arange(10, 60)
PIECES = np.arange(60, VOCAB)


def make_spec(seq_len: int = 64, max_predictions: int = 20, **kwargs) -> MaskingSpec:
    return MaskingSpec(
        seq_len=seq_len,
        max_predictions=max_predictions,
        mask_id=MASK,
        cls_id=CLS,
        sep_id=SEP,
        pad_id=PAD,
        is_special=SPECIAL,
        is_continuation=CONTINUATION,
        **kwargs,
    )


def random_tokens(rng: np.random.Generator, n: int, low: int = 10, high: int = VOCAB):
    return rng.integers(low, high, n).astype(np.int32)


def original_ids(tokens: np.ndarray, spec: MaskingSpec) -> np.ndarray:
    """[CLS] tokens [SEP] [PAD]... as mask_tokens lays them out before masking."""
    tokens = np.asarray(tokens, np.int32)[: spec.seq_len - 2]
    ids = np.full(spec.seq_len, PAD, np.int32)
    ids[0], ids[1 : len(tokens) + 1], ids[len(tokens) + 1] = CLS, tokens, SEP
    return ids


def chosen(example: dict) -> np.ndarray:
    return example['masked_positions'][example['masked_weights'] > 0]


def test_output_shapes_and_dtypes():
    spec = make_spec(seq_len=32, max_predictions=5)
    out = mask_tokens(random_tokens(np.random.default_rng(0), 10), np.random.default_rng(1), spec)
    expected = {
        'input_ids': ((32,), np.int32),
        'input_mask': ((32,), np.int32),
        'segment_ids': ((32,), np.int32),
        'masked_positions': ((5,), np.int32),
        'masked_ids': ((5,), np.int32),
        'masked_weights': ((5,), np.float32),
    }
    assert set(out) == set(expected)
    for key, (shape, dtype) in expected.items():
        assert out[key].shape == shape, key
        assert out[key].dtype == dtype, key
    assert not out['segment_ids'].any()


@pytest.mark.parametrize(
    'num_tokens, max_predictions, expected',
    [
        (1, 20, 1),  # 0.15 rounds to 0, but at least one token is predicted
        (3, 20, 1),  # 0.45 -> 0 -> at least 1
        (7, 20, 1),  # 1.05 -> 1
        (10, 20, 2),  # 1.5 -> 2
        (20, 20, 3),  # 3.0
        (27, 20, 4),  # 4.05 -> 4
        (40, 20, 6),  # 6.0
        (60, 20, 9),  # 9.0
        (60, 5, 5),  # capped by max_predictions
        (126, 20, 19),  # 18.9 -> 19
    ],
)
def test_number_of_predictions_is_rounded_15_percent_capped(num_tokens, max_predictions, expected):
    spec = make_spec(seq_len=128, max_predictions=max_predictions)
    for seed in range(5):
        tokens = random_tokens(np.random.default_rng(seed), num_tokens)
        out = mask_tokens(tokens, np.random.default_rng(100 + seed), spec)
        assert out['masked_weights'].sum() == expected
        assert len(set(chosen(out).tolist())) == expected  # distinct positions


def test_specials_in_the_text_do_not_count_as_maskable():
    spec = make_spec(seq_len=64)
    # 20 ordinary tokens among 20 special ones: 15% of 20 = 3 predictions, not 15% of 40.
    tokens = np.array([11, SEP, 12, UNK, 13, 5, 14, 9] * 5, np.int32)
    out = mask_tokens(tokens, np.random.default_rng(0), spec)
    assert out['masked_weights'].sum() == 3


def test_about_15_percent_over_many_examples():
    spec = make_spec(seq_len=128, max_predictions=128)
    rng = np.random.default_rng(0)
    chosen_total = maskable_total = 0
    for _ in range(200):
        tokens = random_tokens(rng, int(rng.integers(20, 126)))
        out = mask_tokens(tokens, rng, spec)
        chosen_total += out['masked_weights'].sum()
        maskable_total += len(tokens)
    assert 0.14 < chosen_total / maskable_total < 0.16


def test_80_10_10_replacement():
    spec = make_spec(seq_len=128, max_predictions=20)
    rng = np.random.default_rng(1234)
    counts = {'mask': 0, 'same': 0, 'random': 0}
    for _ in range(600):
        # Tokens drawn from a narrow range, so random replacements are easy to tell apart.
        tokens = random_tokens(rng, 120, 10, 20)
        out = mask_tokens(tokens, rng, spec)
        positions = chosen(out)
        original = original_ids(tokens, spec)[positions]
        new = out['input_ids'][positions]
        counts['mask'] += int((new == MASK).sum())
        counts['same'] += int((new == original).sum())
        counts['random'] += int(((new != MASK) & (new != original)).sum())
    total = sum(counts.values())
    assert total == 600 * 18  # round(120 * 0.15) = 18 per example
    assert 0.77 < counts['mask'] / total < 0.83
    assert 0.08 < counts['same'] / total < 0.12
    assert 0.08 < counts['random'] / total < 0.12


def test_random_replacements_come_from_the_whole_non_special_vocab():
    spec = make_spec(seq_len=128, max_predictions=20)
    rng = np.random.default_rng(7)
    drawn = []
    for _ in range(400):
        tokens = random_tokens(rng, 120, 10, 12)  # the text only holds ids 10 and 11
        out = mask_tokens(tokens, rng, spec)
        new = out['input_ids'][chosen(out)]
        drawn.extend(new[(new != MASK) & (new >= 12)].tolist())
    drawn = np.asarray(drawn)
    assert len(drawn) > 300
    assert not SPECIAL[drawn].any()  # never [PAD], [UNK], [CLS], [SEP], [MASK], [unused*]
    assert len(np.unique(drawn)) > 70  # spread over the 90 non-special ids


def test_special_tokens_are_never_chosen_and_never_drawn():
    # A vocabulary where most ids are special, so a slip would show quickly.
    is_special = np.ones(VOCAB, bool)
    is_special[[20, 30, 40]] = False
    spec = MaskingSpec(
        seq_len=64,
        max_predictions=20,
        mask_id=MASK,
        cls_id=CLS,
        sep_id=SEP,
        pad_id=PAD,
        is_special=is_special,
        is_continuation=np.zeros(VOCAB, bool),
    )
    rng = np.random.default_rng(3)
    for _ in range(300):
        tokens = rng.choice([20, 30, 40, UNK, SEP, 5, 50, 77], 40).astype(np.int32)
        out = mask_tokens(tokens, rng, spec)
        original = original_ids(tokens, spec)
        positions = chosen(out)
        assert not is_special[original[positions]].any()
        assert 0 not in positions  # [CLS]
        new = out['input_ids'][positions]
        assert set(new.tolist()) <= {MASK, 20, 30, 40}
        # Everything not chosen is left exactly as it was.
        others = np.setdiff1d(np.arange(spec.seq_len), positions)
        np.testing.assert_array_equal(out['input_ids'][others], original[others])


def test_masked_ids_are_the_original_tokens_and_weights_mark_real_predictions():
    spec = make_spec(seq_len=64, max_predictions=12)
    rng = np.random.default_rng(5)
    for n in (2, 15, 40, 62):
        tokens = random_tokens(rng, n)
        out = mask_tokens(tokens, rng, spec)
        k = int(out['masked_weights'].sum())
        assert k == min(12, max(1, round(n * 0.15)))
        np.testing.assert_array_equal(out['masked_weights'][:k], 1.0)
        np.testing.assert_array_equal(out['masked_weights'][k:], 0.0)
        positions = out['masked_positions'][:k]
        assert (np.diff(positions) > 0).all()  # sorted, distinct
        assert ((positions >= 1) & (positions <= n)).all()  # inside the text
        np.testing.assert_array_equal(out['masked_ids'][:k], original_ids(tokens, spec)[positions])
        np.testing.assert_array_equal(out['masked_positions'][k:], 0)
        np.testing.assert_array_equal(out['masked_ids'][k:], 0)


def test_input_mask_marks_real_tokens():
    spec = make_spec(seq_len=32)
    tokens = random_tokens(np.random.default_rng(0), 9)
    out = mask_tokens(tokens, np.random.default_rng(0), spec)
    np.testing.assert_array_equal(out['input_mask'], [1] * 11 + [0] * 21)
    assert out['input_ids'][0] == CLS and out['input_ids'][10] == SEP
    np.testing.assert_array_equal(out['input_ids'][11:], PAD)


def test_long_input_is_truncated_to_seq_len_minus_2():
    spec = make_spec(seq_len=16, max_predictions=4)
    tokens = random_tokens(np.random.default_rng(0), 40)
    out = mask_tokens(tokens, np.random.default_rng(0), spec)
    assert out['input_ids'].shape == (16,)
    np.testing.assert_array_equal(out['input_mask'], 1)
    assert out['input_ids'][0] == CLS and out['input_ids'][-1] == SEP
    unmasked = np.setdiff1d(np.arange(1, 15), chosen(out))
    np.testing.assert_array_equal(out['input_ids'][unmasked], tokens[unmasked - 1])
    assert chosen(out).max() <= 14  # never the truncated-away tail nor the final [SEP]
    assert out['masked_weights'].sum() == 2  # round(14 * 0.15)


def test_empty_input_predicts_nothing():
    spec = make_spec(seq_len=16, max_predictions=4)
    out = mask_tokens(np.zeros(0, np.int32), np.random.default_rng(0), spec)
    np.testing.assert_array_equal(out['input_ids'][:2], [CLS, SEP])
    assert out['input_mask'].sum() == 2
    assert out['masked_weights'].sum() == 0


def test_same_seed_same_output_different_seed_different():
    spec = make_spec(seq_len=64)
    tokens = random_tokens(np.random.default_rng(0), 60)
    a = mask_tokens(tokens, np.random.default_rng(42), spec)
    b = mask_tokens(tokens, np.random.default_rng(42), spec)
    c = mask_tokens(tokens, np.random.default_rng(43), spec)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert any(not np.array_equal(a[key], c[key]) for key in a)


def make_words(rng: np.random.Generator, num_words: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of `num_words` words of 1-3 pieces, and the word index of each token."""
    tokens, word_of = [], []
    for w in range(num_words):
        pieces = int(rng.integers(1, 4))
        tokens.append(rng.choice(WORD_STARTS))
        tokens.extend(rng.choice(PIECES, pieces - 1))
        word_of.extend([w] * pieces)
    return np.asarray(tokens, np.int32), np.asarray(word_of)


def words_split(whole_word: bool, examples: int = 100) -> tuple[int, int]:
    """(words partly chosen, predictions beyond the cap) over many examples."""
    spec = make_spec(seq_len=128, max_predictions=20, whole_word=whole_word)
    rng = np.random.default_rng(11)
    split = over = 0
    for _ in range(examples):
        tokens, word_of = make_words(rng, 40)
        tokens, word_of = tokens[:126], word_of[:126]
        out = mask_tokens(tokens, rng, spec)
        positions = chosen(out)
        over += len(positions) > min(20, round(len(tokens) * 0.15))
        picked_words = set(word_of[positions - 1].tolist())
        for w in picked_words:
            members = np.flatnonzero(word_of == w) + 1
            split += not set(members.tolist()) <= set(positions.tolist())
    return split, over


def test_whole_word_masking_chooses_all_pieces_of_a_word():
    split, over = words_split(whole_word=True)
    assert split == 0
    assert over == 0  # a whole word never pushes the count past the budget


def test_without_whole_word_masking_words_are_split():
    split, _ = words_split(whole_word=False)
    assert split > 50


def test_token_masking_draws_what_the_word_loop_drew():
    """Without whole-word masking every candidate is a group of one, and the positions are
    taken at once from the same permutation the per-group loop (whole-word masking's, and
    every spec's before) walks: with no ## pieces in the text both give the same example and
    leave the generator at the same point, so a run's data is what it was."""
    by_token, by_word = (
        make_spec(max_predictions=10),
        make_spec(max_predictions=10, whole_word=True),
    )
    data = np.random.default_rng(5)
    for seed in range(200):
        n = int(data.integers(0, 70))
        tokens = random_tokens(data, n, low=0, high=60)  # specials and word starts, no pieces
        fast_rng, loop_rng = np.random.default_rng(seed), np.random.default_rng(seed)
        fast, loop = mask_tokens(tokens, fast_rng, by_token), mask_tokens(tokens, loop_rng, by_word)
        for key in fast:
            np.testing.assert_array_equal(fast[key], loop[key], err_msg=f'{key}, seed {seed}')
        assert fast_rng.bit_generator.state == loop_rng.bit_generator.state
