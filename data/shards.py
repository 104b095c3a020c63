"""Training streams cut into a fixed number of data shards, so a run can change topology.

The global batch of every step is `num_shards` blocks of `batch_size / num_shards` rows;
block k comes from shard k's own pipeline (items k, k + num_shards, ... of the data, its
own seed) and from nowhere else. Host i of P owns shards [i V/P, (i+1) V/P) and feeds its
blocks, in shard order, as its slice of the global batch. So:

- the global batch of step s is the same on any number of processes that divides V (1, 2,
  4, ... for V = 8), and so are the losses;
- the checkpointed data state is one state per shard, not per process: a run saved by 2
  processes resumes in 1 (which then owns every shard) or in 4, each shard continuing where
  it stopped, so no example is skipped or seen twice within its epoch.

V is fixed when a run starts: `data.shards`, or (0) the number of processes of that first
start, so a single-process run reads its data exactly as it would without shards.
"""

from collections.abc import Callable, Sequence

import grain
import jax
import numpy as np

from core.errors import ConfigError

STATE_VERSION = 1


def shard_seed(seed: int, shard: int) -> int:
    """Shard 0 keeps `seed` (a one-shard run is the unsharded pipeline); the others get
    independent seeds, so their shuffles and masks are not copies of each other."""
    if shard == 0:
        return seed
    return int(np.random.SeedSequence([seed % 2**32, shard]).generate_state(1)[0])


class ShardedIterDataset(grain.IterDataset):
    """This host's shards, one batch block each per step, concatenated in shard order."""

    def __init__(self, shards: dict[int, grain.IterDataset], num_shards: int):
        super().__init__(list(shards.values()))
        self.shard_ids = list(shards)
        self.num_shards = num_shards

    def __iter__(self) -> grain.DatasetIterator:
        return _ShardedIterator(self)

    def __str__(self) -> str:
        return f'ShardedIterDataset(shards={self.shard_ids} of {self.num_shards})'


class _ShardedIterator(grain.DatasetIterator):
    def __init__(self, ds: ShardedIterDataset):
        super().__init__([iter(p) for p in ds.parents])
        self._ids = ds.shard_ids
        self._num_shards = ds.num_shards

    def __next__(self):
        blocks = [next(it) for it in self._parents]
        if len(blocks) == 1:
            return blocks[0]
        return jax.tree.map(lambda *xs: np.concatenate(xs), *blocks)

    def get_state(self) -> dict:
        return {
            'version': STATE_VERSION,
            'num_shards': self._num_shards,
            'shards': {str(k): it.get_state() for k, it in zip(self._ids, self._parents)},
        }

    def set_state(self, state: dict) -> None:
        if state.get('num_shards') != self._num_shards:
            raise ConfigError(
                f'the checkpointed data stream has {state.get("num_shards")} shards but this '
                f'run builds {self._num_shards}; keep data.shards as the run started'
            )
        missing = [k for k in self._ids if str(k) not in state['shards']]
        if missing:
            raise ConfigError(f'the checkpointed data state has no entry for shards {missing}')
        for k, it in zip(self._ids, self._parents):
            it.set_state(state['shards'][str(k)])


def training_stream(make_shard: Callable[..., grain.IterDataset], config, runtime):
    """`sharded_stream` of a run: its global batch, seed and prefetch (config), the data
    shards this process reads (runtime: core/task.py Runtime)."""
    return sharded_stream(
        make_shard,
        batch_size=config.batch_size,
        seed=config.seed,
        num_shards=runtime.data_shards,
        shards=runtime.data_shard_ids,
        prefetch=config.data.prefetch,
    )


def sharded_stream(
    make_shard: Callable[..., grain.IterDataset],
    *,
    batch_size: int,
    seed: int,
    num_shards: int,
    shards: Sequence[int],
    prefetch: int = 2,
) -> grain.IterDataset:
    """This host's part of the global training batches.

    `make_shard(shard_index=, shard_count=, batch_size=, seed=, prefetch=0)` builds one
    shard's pipeline (training mode: shuffled, repeated); `batch_size` is the global batch.
    """
    if batch_size % num_shards:
        raise ConfigError(
            f'batch_size {batch_size} is not divisible by the {num_shards} data shards; '
            'set --config.batch_size to a multiple of data.shards'
        )
    per_shard = batch_size // num_shards
    ds = ShardedIterDataset(
        {
            k: make_shard(
                shard_index=k,
                shard_count=num_shards,
                batch_size=per_shard,
                seed=shard_seed(seed, k),
                prefetch=0,
            )
            for k in shards
        },
        num_shards,
    )
    if prefetch:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return ds
