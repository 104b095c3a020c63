"""BERT masking, done in the input pipeline with NumPy (deterministic for a generator).

Of the maskable tokens (never [CLS], [SEP], [PAD] or any other bracketed special token),
`mask_prob` (15%) are chosen as prediction targets, at most `max_predictions`; of those
80% become [MASK], 10% a random non-special token and 10% stay as they are. With
`whole_word`, a word's WordPiece continuations ("##ing") are chosen together.
"""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class MaskingSpec:
    seq_len: int
    max_predictions: int
    mask_id: int
    cls_id: int
    sep_id: int
    pad_id: int
    is_special: np.ndarray  # [vocab] bool
    is_continuation: np.ndarray  # [vocab] bool
    mask_prob: float = 0.15
    whole_word: bool = False

    def __post_init__(self):
        object.__setattr__(self, 'random_ids', np.flatnonzero(~self.is_special).astype(np.int32))


def _word_groups(ids: np.ndarray, candidates: np.ndarray, spec: MaskingSpec) -> list[np.ndarray]:
    """Candidate positions grouped into whole words (a token and its ## continuations)."""
    groups, current = [], []
    for pos in candidates:
        if current and spec.is_continuation[ids[pos]] and pos == current[-1] + 1:
            current.append(pos)
        else:
            if current:
                groups.append(np.asarray(current))
            current = [pos]
    if current:
        groups.append(np.asarray(current))
    return groups


def mask_tokens(tokens: np.ndarray, rng: np.random.Generator, spec: MaskingSpec) -> dict:
    """tokens: up to seq_len - 2 ids (no [CLS]/[SEP]) -> one MLM example.

    Returns input_ids, input_mask, segment_ids [seq_len] int32 and masked_positions,
    masked_ids [max_predictions] int32, masked_weights [max_predictions] float32.
    """
    tokens = np.asarray(tokens, np.int32)[: spec.seq_len - 2]
    n = len(tokens) + 2
    ids = np.full(spec.seq_len, spec.pad_id, np.int32)
    ids[0], ids[1 : n - 1], ids[n - 1] = spec.cls_id, tokens, spec.sep_id

    candidates = np.flatnonzero(~spec.is_special[ids[:n]])
    num_predict = min(spec.max_predictions, max(1, int(round(len(candidates) * spec.mask_prob))))
    chosen: list[int] = []
    if len(candidates) and not spec.whole_word:
        # Groups of one token: the first num_predict of the same permutation, at once.
        chosen = candidates[rng.permutation(len(candidates))[:num_predict]].tolist()
    elif len(candidates):
        groups = _word_groups(ids, candidates, spec)
        for g in rng.permutation(len(groups)):
            if len(chosen) >= num_predict:
                break
            if len(chosen) + len(groups[g]) > num_predict:
                continue  # a whole word that does not fit is skipped, as in BERT
            chosen.extend(groups[g].tolist())
    positions = np.sort(np.asarray(chosen, np.int32))
    targets = ids[positions].copy()

    inputs = ids.copy()
    r = rng.random(len(positions))
    replace_mask = r < 0.8
    replace_random = (r >= 0.8) & (r < 0.9)
    inputs[positions[replace_mask]] = spec.mask_id
    inputs[positions[replace_random]] = rng.choice(spec.random_ids, int(replace_random.sum()))

    k = len(positions)
    out_positions = np.zeros(spec.max_predictions, np.int32)
    out_ids = np.zeros(spec.max_predictions, np.int32)
    out_weights = np.zeros(spec.max_predictions, np.float32)
    out_positions[:k], out_ids[:k], out_weights[:k] = positions, targets, 1.0
    input_mask = np.zeros(spec.seq_len, np.int32)
    input_mask[:n] = 1
    return {
        'input_ids': inputs,
        'input_mask': input_mask,
        'segment_ids': np.zeros(spec.seq_len, np.int32),
        'masked_positions': out_positions,
        'masked_ids': out_ids,
        'masked_weights': out_weights,
    }
