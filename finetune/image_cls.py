"""Image classification with a ViT encoder: the embedded digits, a TFDS image dataset, a
class-per-folder directory or an .npz (data/images.py). A checkpoint pretrained at another
image size restores with its position table resized to this model's patch grid."""

import functools
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from core import config as config_lib
from core import evaluators
from core import flops as flops_lib
from core.errors import DataError
from core.task import Runtime, Task
from data import images as images_lib
from data import shards
from data.labelled import LabelMap
from data.text import Subset
from finetune import classify
from models.classifier import ImageClassifier
from models.vit import VitConfig, interpolate_pos_embedding


def check_config(config: ml_collections.ConfigDict) -> None:
    m = config.model
    if m.image_size <= 0 or m.patch_size <= 0 or m.image_size % m.patch_size:
        raise config_lib.ConfigError(
            f'model.image_size {m.image_size} must be a positive multiple of model.patch_size '
            f'{m.patch_size}'
        )
    if m.pooling not in ('cls', 'gap'):
        raise config_lib.ConfigError(f'model.pooling={m.pooling!r}; expected cls or gap')


def source_labels(source) -> np.ndarray:
    """Every item's label, without decoding images where the source knows them."""
    if isinstance(source, Subset):
        return source_labels(source._docs)[source._indices]
    if getattr(source, 'labels', None) is not None:
        return np.asarray(source.labels, np.int32)
    return np.array([source[i]['label'] for i in range(len(source))], np.int32)


def position_table_adapter(vit: VitConfig):
    """restore_backbone's `adapt`: a saved position table of another grid is restored at
    its own shape, then resized (bicubic) to this model's grid."""
    has_cls = vit.pooling == 'cls'

    def adapt(saved, target):
        saved_shape = tuple(saved['pos_embedding'].shape)
        ours = target['pos_embedding']
        if saved_shape == tuple(ours.shape) or saved_shape[1:] != tuple(ours.shape[1:]):
            return target, None  # same grid, or another width: the shape check reports it
        old_grid = math.isqrt(saved_shape[0] - has_cls)
        if old_grid * old_grid != saved_shape[0] - has_cls:
            raise DataError(
                f'the saved position table has {saved_shape[0]} rows, not a square grid'
                f'{" plus a cls token" if has_cls else ""}; was it trained with another '
                'model.pooling?'
            )
        logging.info(
            'position embeddings: %dx%d patch grid resized to %dx%d',
            old_grid,
            old_grid,
            vit.grid,
            vit.grid,
        )
        shaped = jax.ShapeDtypeStruct(saved_shape, ours.dtype, sharding=ours.sharding)

        def fix(params):
            pos = np.asarray(multihost_utils.process_allgather(params['pos_embedding'], tiled=True))
            new = interpolate_pos_embedding(pos, old_grid, vit.grid, has_cls)
            array = jax.make_array_from_callback(new.shape, ours.sharding, lambda i: new[i])
            return dict(params, pos_embedding=array)

        return dict(target, pos_embedding=shaped), fix

    return adapt


def build(config: ml_collections.ConfigDict, workdir: str, runtime: Runtime) -> Task:
    m = config.model
    dtype = 'bfloat16' if config.precision == 'bfloat16' else 'float32'
    vit = VitConfig.from_config(m, dtype=dtype)
    train_source, eval_source = images_lib.image_splits(config.data, m.image_size, m.channels)
    num_classes = images_lib.num_classes(train_source)
    if num_classes < 2:
        raise DataError(
            f'the training images carry {num_classes} classes; image classification needs '
            'labels (class folders, an .npz `labels` array, or a TFDS label feature)'
        )
    names = getattr(train_source, 'classes', None) or [str(c) for c in range(num_classes)]
    label_map = LabelMap([str(c) for c in names])
    if runtime.process_index == 0:
        label_map.save(os.path.join(workdir, 'labels.json'))  # class id -> name
    train_labels = source_labels(train_source)
    eval_labels = source_labels(eval_source)
    if eval_labels.min() < 0 or eval_labels.max() >= num_classes:
        raise DataError(
            f'eval labels span [{eval_labels.min()}, {eval_labels.max()}] but the training '
            f'split has {num_classes} classes; every eval label must occur in training'
        )
    picked = classify.subset(train_labels, config, label_map)
    train_ds = shards.sharded_stream(
        functools.partial(images_lib.image_dataset, Subset(train_source, picked), train=True),
        batch_size=config.batch_size,
        seed=config.seed,
        num_shards=runtime.data_shards,
        shards=runtime.data_shard_ids,
        prefetch=config.data.prefetch,
    )
    logging.info(
        'data: %d train (of %d) / %d eval images, %d classes',
        len(picked),
        len(train_source),
        len(eval_source),
        num_classes,
    )
    model = ImageClassifier(vit, num_classes, m.head_dropout, m.zero_init_head)

    def inputs(batch):
        return batch['image'].astype(jnp.float32) / 255.0

    loss_fn = classify.loss_fn_for(model, False, config.transfer.freeze_backbone, inputs)
    predictor = classify.Predictor(model, inputs, evaluators.image_batches(eval_source, runtime))

    def evaluate(stepper, params) -> dict[str, float]:
        return classify.score(predictor.logits(stepper, params), eval_labels, label_map)

    def predict(stepper, params) -> list[dict]:
        logits = predictor.logits(stepper, params)
        return classify.prediction_rows(logits, eval_labels, label_map)

    example = jnp.zeros((1, m.image_size, m.image_size, m.channels), jnp.float32)
    return Task(
        name='image_cls',
        model=model,
        init_params=lambda rng: model.init(rng, example)['params'],
        loss_fn=loss_fn,
        train_iter=iter(train_ds),
        evaluate=evaluate,
        metric=classify.task_metric(label_map, config),
        flops_per_step=flops_lib.vit_train_flops(vit, config.batch_size),
        restore=classify.backbone_restore(config.init_subtree, position_table_adapter(vit)),
        predict=predict,
        summary_extras=lambda final: {'train_examples': len(picked)},
    )
