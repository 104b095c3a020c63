"""Grain input pipelines: deterministic for a seed, sharded by process, checkpointable.

MLM: documents -> (host shard) -> shuffle + repeat (train) -> WordPiece ids + [SEP] ->
concatenate and split into `seq_len - 2` chunks -> [CLS] chunk [SEP] with BERT masking ->
per-host batches. Every random choice comes from Grain's per-element generators, so the
iterator state saved in a checkpoint is enough to continue with the same examples.

SimCSE: sentences -> fixed-length token ids (`sentence_dataset`). Images and image-text
pairs: a source of data/image_sources.py or data/pair_sources.py -> per-host batches of
uint8 images (and caption token ids) (`image_dataset`, `pair_dataset`).
"""

import sys
import threading
from collections.abc import Callable, Sequence

import grain
import numpy as np

from core.errors import ConfigError, DataError
from data.masking import MaskingSpec, mask_tokens
from data.tokenizer import FixedLengthEncoder, WordPiece


class _EpochShuffled:
    """An endless sequence: epoch e is `items` in the order of a permutation drawn from
    (seed, e), so every epoch holds every item once, in a new order. Permutations are cached
    for the current and the previous epoch."""

    def __init__(self, items, seed: int):
        self._items, self._seed, self._n = items, seed, len(items)
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return sys.maxsize

    def _perm(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._perms.get(epoch)
            if perm is None:
                rng = np.random.default_rng([_EPOCH_SALT, self._seed % 2**32, epoch])
                perm = rng.permutation(self._n)
                self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}
                self._perms[epoch] = perm
            return perm

    def __getitem__(self, index: int):
        epoch, i = divmod(int(index), self._n)
        return self._items[int(self._perm(epoch)[i])]


_EPOCH_SALT = 0x5EED

# Grain's `shuffle().repeat()` draws each epoch's order with an index shuffle that costs
# ~30 ms per epoch whatever its length: nothing at thousands of items, but ~2 ms an item at
# 12 (a 1-label-per-class fine-tune ran twice as slow as a full one). Below this many items
# the epoch order is a NumPy permutation instead (microseconds).
SMALL_EPOCH = 256


def shuffle_forever(ds: grain.MapDataset, seed: int) -> grain.MapDataset:
    """`ds` shuffled with `seed`, reshuffled every epoch and repeated forever; deterministic
    in the element index, so Grain's iterator state resumes it exactly."""
    if len(ds) >= SMALL_EPOCH:
        return ds.shuffle(seed=seed).repeat()
    if len(ds) == 0:
        return ds
    return grain.MapDataset.source(_EpochShuffled(ds, seed))


def read_options(threads: int) -> grain.ReadOptions:
    """How `to_iter_dataset` reads (and maps) items: with `threads` worker threads, each a
    few items ahead, or in the consumer's own thread with 0.

    Grain's default (16 threads, 500 items ahead) is for sources that wait on I/O or decode
    outside the GIL. Pure-Python work (tokenization) and in-memory arrays hold the GIL, so
    threads only add hand-offs there: reading them in one thread was 1.5x (text) to 4-6x
    (in-memory images) faster on a 2-core host (`benchmarks/input_pipeline.py`,
    BENCHMARKS.md). The order of the items, and so the iterator's checkpointed state, is
    the same either way."""
    if threads < 0:
        raise ValueError(f'read threads must be >= 0, found {threads}')
    return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4 * threads)


# Token ids a pipeline keeps of the documents it has tokenized, at most this many bytes of
# ids and text: a corpus that fits (the embedded one: 1.6 MB of text, 0.4M tokens) is
# tokenized once, not once per epoch, which was half the host's work per batch (the default
# MLM run reads its corpus 25 times; benchmarks/overhead.py); beyond the bound documents are
# tokenized each time they come. Per pipeline: a host reading several data shards keeps
# at most that many times this (and never more than its shards' documents).
TOKEN_CACHE_BYTES = 64 * 2**20


class Tokenize(grain.transforms.Map):
    """A document -> {'tokens': its ids followed by [SEP]}, kept (read-only) for the
    document's next epoch while TOKEN_CACHE_BYTES allow."""

    def __init__(self, tokenizer: WordPiece):
        self.tokenizer = tokenizer
        self._kept: dict[str, np.ndarray] = {}
        self._room = TOKEN_CACHE_BYTES

    def map(self, text: str) -> dict[str, np.ndarray]:
        tokens = self._kept.get(text)
        if tokens is None:
            tokens = np.append(self.tokenizer.encode(text), np.int32(self.tokenizer.sep_id))
            tokens.setflags(write=False)  # shared by every epoch: nothing may change it
            cost = tokens.nbytes + sys.getsizeof(text)
            if cost <= self._room:
                self._kept[text] = tokens
                self._room -= cost
        return {'tokens': tokens}


class Mask(grain.transforms.RandomMap):
    """A packed chunk -> a masked MLM example (see data/masking.py)."""

    def __init__(self, spec: MaskingSpec):
        self.spec = spec

    def random_map(self, chunk: dict[str, np.ndarray], rng: np.random.Generator) -> dict:
        length = int(np.count_nonzero(chunk['tokens_segment_ids']))
        return mask_tokens(chunk['tokens'][:length], rng, self.spec)


def masking_spec(tokenizer: WordPiece, data_config) -> MaskingSpec:
    return MaskingSpec(
        seq_len=data_config.seq_len,
        max_predictions=data_config.max_predictions,
        mask_id=tokenizer.mask_id,
        cls_id=tokenizer.cls_id,
        sep_id=tokenizer.sep_id,
        pad_id=tokenizer.pad_id,
        is_special=tokenizer.is_special,
        is_continuation=tokenizer.is_continuation,
        mask_prob=data_config.mask_prob,
        whole_word=data_config.whole_word_masking,
    )


def mlm_dataset(
    docs: Sequence[str],
    tokenizer: WordPiece,
    spec: MaskingSpec,
    *,
    batch_size: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    train: bool = True,
    prefetch: int = 2,
) -> grain.IterDataset:
    """Batches of MLM examples for this host (`batch_size` is the per-host batch).

    Training data is shuffled with `seed`, reshuffled every epoch and repeated forever;
    eval data is read once, in order, and its last batch may be short.
    """
    ds = grain.MapDataset.source(docs)[shard_index::shard_count]
    if train:
        ds = shuffle_forever(ds, seed)
    ds = ds.map(Tokenize(tokenizer)).to_iter_dataset(read_options(0))  # pure Python: GIL-bound
    ds = grain.experimental.ConcatThenSplitIterDataset(
        ds, length_struct={'tokens': spec.seq_len - 2}
    )
    ds = ds.random_map(Mask(spec), seed=seed)
    ds = ds.batch(batch_size, drop_remainder=train)
    if prefetch:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return ds


def pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """Pads a short (last) eval batch with all-zero examples, which carry zero weight."""
    n = len(next(iter(batch.values())))
    if n == batch_size:
        return batch
    return {
        k: np.concatenate([v, np.zeros((batch_size - n, *v.shape[1:]), v.dtype)])
        for k, v in batch.items()
    }


def most_frequent_token(docs: Sequence[str], tokenizer: WordPiece, limit: int = 5000) -> int:
    """The most frequent non-special token id among (up to `limit`) training documents:
    the "always predict the most frequent token" MLM baseline."""
    counts = np.zeros(tokenizer.vocab_size, np.int64)
    n = min(len(docs), limit)
    for ids in tokenizer.encode_batch([docs[i] for i in range(n)]):
        counts += np.bincount(ids, minlength=tokenizer.vocab_size)
    counts[tokenizer.is_special] = 0
    return int(np.argmax(counts))


def sentence_dataset(
    texts: Sequence[str],
    tokenize,
    *,
    batch_size: int,
    seed: int,
    train: bool = True,
    shard_index: int = 0,
    shard_count: int = 1,
    prefetch: int = 2,
) -> grain.IterDataset:
    """Batches of single sentences, {'input_ids', 'input_mask': int32 [batch, seq_len]}, with
    `tokenize` a `FixedLengthEncoder`. Shuffled and repeated for training; one in-order
    pass (short last batch) otherwise."""
    ds = grain.MapDataset.source(texts)[shard_index::shard_count]
    if train:
        ds = shuffle_forever(ds, seed)

    def encode(text: str) -> dict[str, np.ndarray]:
        ids = tokenize(text)
        return {'input_ids': ids, 'input_mask': (ids != 0).astype(np.int32)}

    ds = ds.map(encode).to_iter_dataset(read_options(0))  # pure Python: GIL-bound
    ds = ds.batch(batch_size, drop_remainder=train)
    if prefetch:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return ds


# --- images and image-text pairs -----------------------------------------------------------


class ImageExample(grain.transforms.Map):
    """A source item -> {'image': uint8 [S, S, C], 'label': int32}."""

    def map(self, item: dict) -> dict[str, np.ndarray]:
        return {
            'image': np.asarray(item['image'], np.uint8),
            'label': np.int32(item.get('label', -1)),
        }


class PairExample(grain.transforms.Map):
    """A pair {'image', 'caption'} -> {'image', 'input_ids', 'input_mask'}."""

    def __init__(self, tokenize: Callable[[str], np.ndarray]):
        self.tokenize = tokenize

    def map(self, item: dict) -> dict[str, np.ndarray]:
        ids = np.asarray(self.tokenize(item['caption']), np.int32)
        if ids.ndim != 1:
            raise DataError(
                f'the caption tokenizer returned shape {ids.shape} for {item["caption"]!r}; '
                'expected [seq_len] token ids (see caption_tokenizer)'
            )
        return {
            'image': np.asarray(item['image'], np.uint8),
            'input_ids': ids,
            'input_mask': (ids != 0).astype(np.int32),
        }


def _batches(
    source: Sequence,
    example: grain.transforms.Map,
    batch_size: int,
    seed: int,
    train: bool,
    shard_index: int,
    shard_count: int,
    prefetch: int,
) -> grain.IterDataset:
    if batch_size < 1:
        raise ConfigError(f'batch_size must be at least 1, found {batch_size}')
    if not 0 <= shard_index < shard_count:
        raise ConfigError(
            f'shard_index must lie in [0, shard_count={shard_count}), found {shard_index}'
        )
    ds = grain.MapDataset.source(source)[shard_index::shard_count]
    if train:
        if len(ds) == 0:
            raise DataError(
                f'process {shard_index} of {shard_count} gets no training items: the data has '
                f'only {len(source)}; give more data or run on fewer processes'
            )
        ds = shuffle_forever(ds, seed)  # a new order every epoch
    threads = getattr(source, 'read_threads', 0)  # a plain sequence: in memory
    ds = ds.map(example).to_iter_dataset(read_options(threads))
    ds = ds.batch(batch_size, drop_remainder=train)
    if prefetch:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return ds


def image_dataset(
    source: Sequence,
    *,
    batch_size: int,
    seed: int,
    train: bool,
    shard_index: int = 0,
    shard_count: int = 1,
    prefetch: int = 2,
) -> grain.IterDataset:
    """Batches {'image': uint8 [B, S, S, C], 'label': int32 [B]} for this process
    (`batch_size` is the per-process batch; `source` yields items of one size, as the
    sources of data/image_sources.py do).

    Training data is this process's shard, shuffled with `seed`, reshuffled every epoch and
    repeated forever; eval data is read once, in order, and its last batch may be short
    (pad it with data.pipeline.pad_batch). The iterator's state (get_state / set_state)
    is what a checkpoint saves to resume with the same batches."""
    return _batches(
        source, ImageExample(), batch_size, seed, train, shard_index, shard_count, prefetch
    )


def pair_dataset(
    source: Sequence,
    tokenize: Callable[[str], np.ndarray],
    *,
    batch_size: int,
    seed: int,
    train: bool,
    shard_index: int = 0,
    shard_count: int = 1,
    prefetch: int = 2,
) -> grain.IterDataset:
    """Batches {'image': uint8 [B, S, S, C], 'input_ids': int32 [B, L], 'input_mask': int32
    [B, L]} of image-text pairs; `tokenize` maps a caption to L token ids padded with 0
    (see caption_tokenizer). Order, sharding and checkpointing as in image_dataset."""
    return _batches(
        source, PairExample(tokenize), batch_size, seed, train, shard_index, shard_count, prefetch
    )


def caption_tokenizer(wordpiece: WordPiece, seq_len: int) -> FixedLengthEncoder:
    """The `tokenize` of pair_dataset: [CLS] ids [SEP], truncated, padded with 0."""
    return FixedLengthEncoder(wordpiece, seq_len)
