"""What text and image classification share: the loss, the evaluator, the start from a
pretrained encoder and the labelled-example subset (the validation split: data/labelled.py
carve_validation).

Train batches carry `label` ([batch] int32 classes, or float32 targets for regression);
eval batches also `valid` and `index` (evaluators.fixed_batches / array_batches).
"""

import os
from collections.abc import Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from core import evaluators
from core import flops as flops_lib
from core.errors import CheckpointError, UserError
from core.task import Runtime, Scorer
from data import shards
from data.labelled import select_train_examples
from data.labels import LabelMap
from data.pipeline import read_options, shuffle_forever
from finetune import metrics as metrics_lib


def loss_fn_for(model, regression: bool, freeze_backbone: bool, inputs: Callable[[dict], object]):
    """loss_fn(params, batch, rng, train, rows): softmax cross-entropy (or squared error) summed
    over the batch; `accuracy` for classification. With `freeze_backbone` (linear probe)
    no gradient flows into the encoder at all."""

    def loss_fn(params, batch, rng, train: bool, rows=None):
        if freeze_backbone:
            params = dict(params, backbone=jax.lax.stop_gradient(params['backbone']))
        logits = model.apply(
            {'params': params}, inputs(batch), not train, rows, rngs={'dropout': rng}
        )
        count = jnp.asarray(batch['label'].shape[0], jnp.float32)
        if regression:
            error = logits[:, 0] - batch['label'].astype(jnp.float32)
            return jnp.sum(error * error), {'denominator': count}
        labels = batch['label'].astype(jnp.int32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        # argmax, as the evaluator scores: a tie (a zero-initialised head) is not correct.
        correct = (jnp.argmax(logits, axis=1) == labels).astype(jnp.float32)
        return jnp.sum(loss), {'accuracy': jnp.sum(correct), 'denominator': count}

    return loss_fn


class Predictor:
    """Logits of every example of fixed eval batches, gathered to every host in dataset
    order; `evaluate` turns them into the task's metrics."""

    def __init__(self, model, inputs: Callable[[dict], object], batches: list[dict]):
        self.batches = batches
        self._outputs = evaluators.EvalOutputs(
            lambda params, batch: {'logits': model.apply({'params': params}, inputs(batch))}
        )

    def logits(self, stepper, params) -> np.ndarray:
        """[examples, classes] in dataset order."""
        return self._outputs(stepper, params, self.batches)['logits']


def score(logits: np.ndarray, labels: np.ndarray, label_map: LabelMap) -> dict[str, float]:
    """The task metrics: accuracy / macro F1 / Matthews and the number of distinct
    predicted classes for classification, Pearson / Spearman / MSE for regression; plus
    the loss."""
    if label_map.regression:
        result = metrics_lib.regression_metrics(labels, logits[:, 0])
        result['loss'] = result['mse']
        return result
    predicted = np.argmax(logits, axis=1)
    result = metrics_lib.classification_metrics(labels, predicted, label_map.num_classes)
    # How many classes the model predicts at all: 1 is a collapse (core/trainer.py warns).
    result['predicted_classes'] = float(len(np.unique(predicted)))
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    result['loss'] = float(-np.mean(log_probs[np.arange(len(labels)), labels]))
    return result


def prediction_rows(logits: np.ndarray, labels: np.ndarray, label_map: LabelMap) -> list[dict]:
    """One row per eval example, in dataset order: the true and predicted label (and the
    predicted class's probability), for WORKDIR/predictions.jsonl."""
    if label_map.regression:
        return [
            {'index': i, 'label': float(y), 'prediction': float(p)}
            for i, (y, p) in enumerate(zip(labels, logits[:, 0]))
        ]
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    predicted = np.argmax(logits, axis=1)
    names, truth = label_map.decode(predicted), label_map.decode(labels)
    return [
        {
            'index': i,
            'label': truth[i],
            'prediction': names[i],
            'probability': float(probs[i, predicted[i]]),
        }
        for i in range(len(labels))
    ]


def task_metric(label_map: LabelMap, config) -> str:
    """The eval metric that picks the best checkpoint."""
    if config.eval.metric:
        return config.eval.metric
    return 'pearson' if label_map.regression else 'accuracy'


def fit_label_map(workdir: str, train_labels, regression: bool, runtime: Runtime) -> LabelMap:
    """The label map of the training labels, saved as WORKDIR/labels.json; a resumed run
    reads it back (and must find the same)."""
    path = os.path.join(workdir, 'labels.json')
    label_map = LabelMap.fit(train_labels, regression=regression)
    if os.path.isfile(path):
        saved = LabelMap.load(path)
        if saved != label_map:
            raise CheckpointError(
                f'{path} holds other labels ({saved}) than the training data ({label_map}); '
                'the data changed under this workdir: use a new --workdir'
            )
    elif runtime.process_index == 0:
        label_map.save(path)
    return label_map


def scorer(predictor: 'Predictor', labels: np.ndarray, label_map: LabelMap) -> Scorer:
    """The metrics (`score`) and prediction rows of one labelled split."""

    def evaluate(stepper, params) -> dict[str, float]:
        return score(predictor.logits(stepper, params), labels, label_map)

    def predict(stepper, params) -> list[dict]:
        return prediction_rows(predictor.logits(stepper, params), labels, label_map)

    return Scorer(evaluate, predict)


def subset(labels: np.ndarray, config, label_map: LabelMap) -> np.ndarray:
    """Indices of the labelled training examples this run uses (`train_examples`)."""
    picked = select_train_examples(
        labels, config.train_examples, config.seed, per_class=not label_map.regression
    )
    if len(picked) < len(labels):
        logging.info(
            'train_examples=%r: %d of %d labelled examples (seed %d)',
            config.train_examples,
            len(picked),
            len(labels),
            config.seed,
        )
    return picked


def train_dataset(examples: list[dict], config, runtime: Runtime):
    """Shuffled, repeated batches of in-memory encoded examples: this host's data shards of
    the global batch (config.batch_size, config.seed; data/shards.training_stream)."""

    def make_shard(shard_index, shard_count, batch_size, seed, prefetch):
        del prefetch  # in memory: the stream's prefetch is enough
        ds = grain.MapDataset.source(examples)[shard_index::shard_count]
        if len(ds) == 0:
            raise UserError(
                f'data shard {shard_index} of {shard_count} has no training examples (of '
                f'{len(examples)}); use fewer data shards or processes, or more train_examples'
            )
        ds = shuffle_forever(ds, seed).to_iter_dataset(read_options(0))  # in memory
        return ds.batch(batch_size, drop_remainder=True)

    return shards.training_stream(make_shard, config, runtime)


def encoder_train_flops(config, seq: int) -> float:
    """FLOPs of a train step of a text encoder of config.model (forward + backward: 3x)."""
    m = config.model
    forward = flops_lib.encoder_forward_flops(
        config.batch_size, seq, m.hidden_size, m.num_layers, m.mlp_dim
    )
    return 3.0 * forward


def eval_batches(arrays: dict[str, np.ndarray], runtime: Runtime) -> list[dict]:
    return evaluators.array_batches(arrays, runtime)


def text_example(seq_len: int) -> dict[str, jax.Array]:
    """A one-example text batch to initialise a model with."""
    example = {k: jnp.zeros((1, seq_len), jnp.int32) for k in ('input_ids', 'segment_ids')}
    example['input_mask'] = jnp.ones((1, seq_len), jnp.int32)
    return example
