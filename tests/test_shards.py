"""Data shards (data/shards.py): the global batch is the same on any process count that divides
the shard count, and a data state saved by 2 processes resumes in 1 (and back) where the
global batch left off: no example skipped or seen twice within the epoch."""

import json

import jax
import ml_collections
import numpy as np
import pytest

from core import checkpoint as ckpt_lib
from core.errors import CheckpointError, ConfigError
from core.task import Runtime
from data import shards
from data.pipeline import masking_spec, mlm_dataset
from data.text import embedded_corpus
from data.tokenizer import WordPiece
from finetune import classify

NUM_SHARDS, BATCH, ITEMS = 4, 8, 64  # 16 items a shard, 2 rows of each per step: 8 steps


def runtime(process_index: int, process_count: int, num_shards: int = NUM_SHARDS) -> Runtime:
    mesh = jax.make_mesh((1, 1, 1), ('data', 'fsdp', 'tensor'))
    return Runtime(mesh, 'jit', BATCH // process_count, process_index, process_count, num_shards)


def item_stream(rt: Runtime, seed: int = 0):
    examples = [{'id': np.int32(i)} for i in range(ITEMS)]
    config = ml_collections.ConfigDict({'batch_size': BATCH, 'seed': seed, 'data': {'prefetch': 2}})
    return iter(classify.train_dataset(examples, config, rt))


def global_batches(iterators: list, steps: int) -> list[np.ndarray]:
    """`steps` global batches of ids: the hosts' slices in process order."""
    return [np.concatenate([next(it)['id'] for it in iterators]) for _ in range(steps)]


def save(iterators: list, directory) -> None:
    """What the checkpoint handler writes: one file per process."""
    directory.mkdir(exist_ok=True)
    n = len(iterators)
    for i, it in enumerate(iterators):
        (directory / f'process_{i}-of-{n}.json').write_text(json.dumps(it.get_state()))


def restore(iterators: list, directory) -> None:
    for it in iterators:
        it.set_state(ckpt_lib.merged_data_state(str(directory)))


def test_global_batch_is_the_same_on_1_2_and_4_processes():
    one = global_batches([item_stream(runtime(0, 1))], 10)
    for count in (2, 4):
        many = global_batches([item_stream(runtime(i, count)) for i in range(count)], 10)
        for a, b in zip(one, many):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('before,after', [(2, 1), (1, 2), (2, 4)])
def test_resume_on_another_process_count_continues_the_epoch(tmp_path, before, after):
    first = [item_stream(runtime(i, before)) for i in range(before)]
    seen = global_batches(first, 3)
    save(first, tmp_path / 'data')
    second = [item_stream(runtime(i, after)) for i in range(after)]
    restore(second, tmp_path / 'data')
    seen += global_batches(second, 5)  # the epoch: 8 steps of 8 items
    ids = np.concatenate(seen)
    assert sorted(ids.tolist()) == list(range(ITEMS)), 'an item skipped or seen twice'
    # And it is the very stream an uninterrupted run reads.
    straight = global_batches([item_stream(runtime(0, 1))], 8)
    np.testing.assert_array_equal(np.concatenate(straight), ids)


def test_shards_hold_disjoint_items_with_their_own_order():
    rt = runtime(0, 1)
    batches = global_batches([item_stream(rt)], 8)
    blocks = np.stack(batches).reshape(8, NUM_SHARDS, BATCH // NUM_SHARDS)
    for k in range(NUM_SHARDS):
        assert set(blocks[:, k].ravel() % NUM_SHARDS) == {k}  # shard k: items k, k+4, ...
    # Shards are shuffled with different seeds: their orders are not copies.
    orders = [blocks[:, k].ravel() // NUM_SHARDS for k in range(NUM_SHARDS)]
    assert any(not np.array_equal(orders[0], o) for o in orders[1:])


def test_one_shard_is_the_unsharded_pipeline(tmp_path):
    """A one-process run without data.shards reads exactly what it read before shards."""
    docs = embedded_corpus('pydoc')[:200]
    tokens = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', *sorted(set(' '.join(docs).split()))]
    (tmp_path / 'vocab.txt').write_text('\n'.join(tokens[:3000]) + '\n')
    tokenizer = WordPiece(str(tmp_path / 'vocab.txt'))
    spec = masking_spec(
        tokenizer,
        ml_collections.ConfigDict(
            {'seq_len': 32, 'max_predictions': 5, 'mask_prob': 0.15, 'whole_word_masking': False}
        ),
    )
    plain = iter(mlm_dataset(docs, tokenizer, spec, batch_size=BATCH, seed=3))
    sharded = iter(
        shards.sharded_stream(
            lambda **kw: mlm_dataset(docs, tokenizer, spec, **kw),
            batch_size=BATCH,
            seed=3,
            num_shards=1,
            shards=range(1),
        )
    )
    for _ in range(5):
        a, b = next(plain), next(sharded)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])

    # Packed MLM examples resume across process counts too (2 -> 1).
    def mlm_stream(i, n):
        return iter(
            shards.sharded_stream(
                lambda **kw: mlm_dataset(docs, tokenizer, spec, **kw),
                batch_size=BATCH,
                seed=3,
                num_shards=2,
                shards=runtime(i, n, 2).data_shard_ids,
            )
        )

    def ids(iterators, steps):
        return [np.concatenate([next(it)['input_ids'] for it in iterators]) for _ in range(steps)]

    straight = ids([mlm_stream(0, 1)], 6)
    two = [mlm_stream(0, 2), mlm_stream(1, 2)]
    got = ids(two, 2)
    save(two, tmp_path / 'data')
    one = [mlm_stream(0, 1)]
    restore(one, tmp_path / 'data')
    got += ids(one, 4)
    for a, b in zip(straight, got):
        np.testing.assert_array_equal(a, b)


def test_bad_layouts_are_refused(tmp_path):
    with pytest.raises(ConfigError, match='batch_size 8 is not divisible by the 3 data shards'):
        item_stream(runtime(0, 1, num_shards=3))
    first = [item_stream(runtime(i, 2, num_shards=2)) for i in range(2)]
    global_batches(first, 1)
    save(first[:1], tmp_path / 'partial')  # process 1's file is missing
    (tmp_path / 'partial' / 'process_0-of-1.json').rename(
        tmp_path / 'partial' / 'process_0-of-2.json'
    )
    with pytest.raises(CheckpointError, match='not one complete set of processes'):
        ckpt_lib.merged_data_state(str(tmp_path / 'partial'))
    save(first, tmp_path / 'data')
    other = item_stream(runtime(0, 1, num_shards=4))
    with pytest.raises(ConfigError, match='has 2 shards but this run builds 4'):
        restore([other], tmp_path / 'data')
