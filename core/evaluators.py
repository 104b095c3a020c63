"""Evaluators shared by the contrastive tasks: held-out contrastive loss, and k-NN / linear
probe accuracy on frozen features of a labelled split.

These are a pretraining's eval rows, which pick its checkpoints: they read training and
validation data only, never a downstream test split."""

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from core import probe
from core.task import Runtime


def pad_rows(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Pads every array to `size` rows and adds `valid` [size] (1 = a real row)."""
    n = len(next(iter(batch.values())))
    out = {
        k: np.concatenate([v, np.zeros((size - n, *v.shape[1:]), v.dtype)])
        for k, v in batch.items()
    }
    out['valid'] = (np.arange(size) < n).astype(np.int32)
    return out


def fixed_batches(
    dataset_fn: Callable[..., Any], num_examples: int, runtime: Runtime, *, full_only: bool
) -> list[dict]:
    """One in-order pass over a split as this host's list of batches, the same number on
    every host. `full_only`: only complete global batches (contrastive losses need whole
    batches of negatives); otherwise the last ones are padded, with `valid` marking rows."""
    per_host = runtime.per_host_batch
    per_shard = math.ceil(num_examples / runtime.process_count)
    if full_only:
        count = (num_examples // runtime.process_count) // per_host
    else:
        count = math.ceil(per_shard / per_host)
    ds = dataset_fn(
        batch_size=per_host,
        seed=0,
        train=False,
        shard_index=runtime.process_index,
        shard_count=runtime.process_count,
        prefetch=0,
    )
    batches, seen = [], 0
    for batch in ds:
        if len(batches) == count:
            break
        rows = len(next(iter(batch.values())))
        if full_only and rows < per_host:
            break
        # Global position of each row: the host's shard is items [process_index::count].
        batch = dict(
            batch, index=runtime.process_index + runtime.process_count * (seen + np.arange(rows))
        )
        seen += rows
        batches.append(pad_rows(batch, per_host))
    while len(batches) < count:  # a shorter shard: empty batches keep the hosts in step
        empty = {k: v[:0] for k, v in batches[-1].items() if k != 'valid'}
        batches.append(pad_rows(empty, per_host))
    return batches


def summed_loss(stepper, params, batches: Sequence[dict]) -> dict[str, float]:
    """The task's loss and metrics over `batches` via the eval step (sums / denominator)."""
    totals = None
    for batch in batches:
        sums = stepper.evaluate(params, stepper.put_batch(batch))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:
        return {}
    totals = jax.device_get(totals)
    denominator = max(float(totals.pop('denominator')), 1e-8)
    return {k: float(v) / denominator for k, v in totals.items()}


def contrastive_evaluate(
    loss_batches: Sequence[dict],
    figures: Callable[[Any, Any], dict[str, float]] | None,
    name: str = 'contrastive',
) -> Callable[[Any, Any], dict[str, float]]:
    """A self-supervised task's `evaluate(stepper, params)`: the held-out `<name>_loss` (and
    `<name>_accuracy` where the loss reports `accuracy`) over `loss_batches`, none when the
    split is smaller than a batch; then `figures(stepper, params)` (a probe, retrieval)."""

    def evaluate(stepper, params) -> dict[str, float]:
        result = {}
        if loss_batches:
            sums = summed_loss(stepper, params, loss_batches)
            result[f'{name}_loss'] = sums['loss']
            if 'accuracy' in sums:
                result[f'{name}_accuracy'] = sums['accuracy']
        if figures is not None:
            result.update(figures(stepper, params))
        return result

    return evaluate


def array_batches(arrays: dict[str, np.ndarray], runtime: Runtime) -> list[dict]:
    """Host-side arrays (all rows, every host) -> this host's padded batches of its rows
    (rows i with i % process_count == process_index), the same count on every host."""
    n = len(next(iter(arrays.values())))
    arrays = dict(arrays, index=np.arange(n))
    mine = {k: v[runtime.process_index :: runtime.process_count] for k, v in arrays.items()}
    per_host = runtime.per_host_batch
    count = math.ceil(math.ceil(n / runtime.process_count) / per_host)
    return [
        pad_rows({k: v[i * per_host : (i + 1) * per_host] for k, v in mine.items()}, per_host)
        for i in range(count)
    ]


class EvalOutputs:
    """`fn(params, batch) -> {name: [batch, ...]}` over fixed eval batches (`fixed_batches`,
    `array_batches`), run sharded like a step: each output's real rows (padding dropped),
    gathered to every host in dataset order, whatever the host count."""

    def __init__(self, fn: Callable[[Any, dict], dict[str, jax.Array]]):
        def with_rows(params, batch):
            return dict(fn(params, batch), index=batch['index'], valid=batch['valid'])

        self._fn, self._run = with_rows, None

    def __call__(self, stepper, params, batches: Sequence[dict]) -> dict[str, np.ndarray]:
        if self._run is None:
            self._run = stepper.map_batch(self._fn)
        outs = [self._run(params, stepper.put_batch(b)) for b in batches]
        cat = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
        valid = cat.pop('valid').astype(bool)
        order = np.argsort(cat.pop('index')[valid], kind='stable')
        return {k: v[valid][order] for k, v in cat.items()}


class FeatureProbe:
    """k-NN and linear-probe accuracy of frozen features: a labelled train split fits the
    probe, a labelled validation split scores it. Both must be training or validation data
    of the pretraining, never a downstream test split: the figures pick checkpoints (SimCLR
    on digits: the digits' training split; SimCSE: the pydoc_topics task's training
    paragraphs). `features_fn(params, batch) -> [batch, dim]` runs sharded like a step; the
    features are gathered to every host, and every host computes the same figures."""

    def __init__(
        self,
        features_fn: Callable[[Any, dict], jax.Array],
        train_batches: list[dict],
        val_batches: list[dict],
        *,
        num_classes: int,
        knn_k: int = 20,
        knn_temperature: float = 0.07,
        probe_l2: float | None = None,
        few_shot: int = 0,
        few_shot_draws: int = 5,
    ):
        self.train_batches, self.val_batches = train_batches, val_batches
        self.num_classes = num_classes
        self.few_shot, self.few_shot_draws = few_shot, few_shot_draws
        self.knn_k, self.knn_temperature, self.probe_l2 = knn_k, knn_temperature, probe_l2

        self._outputs = EvalOutputs(
            lambda params, batch: {
                'features': features_fn(params, batch),
                'label': batch['label'],
            }
        )

    def features(self, stepper, params, batches) -> tuple[np.ndarray, np.ndarray]:
        """[examples, dim] features and [examples] labels, in dataset order."""
        out = self._outputs(stepper, params, batches)
        return out['features'], out['label']

    def __call__(self, stepper, params) -> dict[str, float]:
        train_x, train_y = self.features(stepper, params, self.train_batches)
        test_x, test_y = self.features(stepper, params, self.val_batches)
        result = {
            'knn_accuracy': probe.knn_accuracy(
                train_x,
                train_y,
                test_x,
                test_y,
                num_classes=self.num_classes,
                k=self.knn_k,
                temperature=self.knn_temperature,
            ),
            'linear_probe_accuracy': probe.linear_probe_accuracy(
                train_x, train_y, test_x, test_y, num_classes=self.num_classes, l2=self.probe_l2
            ),
        }
        if self.few_shot:
            result[f'linear_probe_{self.few_shot}shot_accuracy'] = self.few_shot_probe(
                train_x, train_y, test_x, test_y
            )
        return result

    def few_shot_probe(self, train_x, train_y, test_x, test_y) -> float:
        """The linear probe fitted on `few_shot` labelled examples per class, averaged over
        `few_shot_draws` fixed draws: the low-label regime, where a representation's
        quality shows even when every representation is linearly separable with all the
        labels."""
        scores = []
        for draw in range(self.few_shot_draws):
            rng = np.random.default_rng(draw)
            picks = np.concatenate(
                [
                    rng.permutation(np.flatnonzero(train_y == c))[: self.few_shot]
                    for c in range(self.num_classes)
                ]
            )
            scores.append(
                probe.linear_probe_accuracy(
                    train_x[picks],
                    train_y[picks],
                    test_x,
                    test_y,
                    num_classes=self.num_classes,
                    l2=self.probe_l2 or 1e-2,
                )
            )
        return float(np.mean(scores))
