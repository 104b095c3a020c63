"""Image classification with a ViT encoder: the embedded digits, a TFDS image dataset, a
class-per-folder directory or an .npz (data/image_sources.py, data/image_splits.py).

Three splits: training; validation (`data.eval_files` / `data.eval_split`, else
`data.eval_fraction` of each class of the training images, by seed), which the eval rows
score; test (`data.test_files` / `data.test_split`; the digits ship a fixed 389 of their
1797 images), read and scored once, after training, on the checkpoint validation selected.

A checkpoint pretrained at another image size restores with its position table resized to
this model's patch grid."""

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
from core.task import InitFrom, Runtime, Scorer, Task, compute_dtype
from data import digits, image_sources, image_splits, labelled, pipeline, shards
from data.labels import LabelMap
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
    d = config.data
    if d.get('test_files') or d.get('test_split'):
        if not d.files and d.name in digits.EMBEDDED_IMAGES:
            raise config_lib.ConfigError(
                f'data.name={d.name!r} ships its own test split; leave data.test_files and '
                'data.test_split empty, or give your own images with --config.data.files'
            )
        if d.files and d.get('test_split'):
            raise config_lib.ConfigError(
                f'data.test_split={d.test_split!r} names a TFDS split, and this run reads '
                'local images; give the test images as --config.data.test_files'
            )
    if d.get('test_files') and not os.path.exists(d.test_files):  # read at the end only
        raise DataError(
            f'{d.test_files} does not exist; --config.data.test_files must be an image folder '
            'or an .npz file'
        )


def source_labels(source) -> np.ndarray:
    """Every item's label, without decoding images where the source knows them."""
    if isinstance(source, Subset):
        return source_labels(source._docs)[source._indices]
    if getattr(source, 'labels', None) is not None:
        return np.asarray(source.labels, np.int32)
    return np.array([source[i]['label'] for i in range(len(source))], np.int32)


def position_table_adapter(vit: VitConfig):
    """InitFrom's `adapt`: a saved position table of another grid is restored at
    its own shape, then resized (bicubic) to this model's grid."""
    has_cls = vit.pooling == 'cls'

    def adapt(saved, target):
        if 'pos_embedding' not in saved:  # not a ViT: the restore lists what differs
            return target, None
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
    vit = VitConfig.from_config(m, dtype=compute_dtype(config))
    train_source, eval_source, open_test = image_splits.labelled_image_splits(
        config.data, m.image_size, m.channels
    )
    num_classes = image_sources.num_classes(train_source)
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
    if eval_source is None:
        train_idx, val_idx = labelled.carve_validation(
            train_labels, config, True, 'the training images'
        )
        eval_source = image_sources.labelled_subset(train_source, val_idx)
        train_source = image_sources.labelled_subset(train_source, train_idx)
        train_labels = train_labels[train_idx]
    picked = classify.subset(train_labels, config, label_map)
    train_ds = shards.training_stream(
        functools.partial(pipeline.image_dataset, Subset(train_source, picked), train=True),
        config,
        runtime,
    )
    logging.info(
        'data: %d train (of %d) / %d validation images, %d classes; %s',
        len(picked),
        len(train_source),
        len(eval_source),
        num_classes,
        'a test split scored at the end' if open_test else 'no test split',
    )
    model = ImageClassifier(vit, num_classes, m.head_dropout, m.zero_init_head)

    def inputs(batch):
        return batch['image'].astype(jnp.float32) / 255.0

    loss_fn = classify.loss_fn_for(model, False, config.transfer.freeze_backbone, inputs)

    def scorer(source) -> Scorer:
        labels = source_labels(source)
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise DataError(
                f'labels span [{labels.min()}, {labels.max()}] but the training images have '
                f'{num_classes} classes; every label must occur in training'
            )
        batches = evaluators.fixed_batches(
            lambda **kw: pipeline.image_dataset(source, **kw), len(source), runtime, full_only=False
        )
        predictor = classify.Predictor(model, inputs, batches)
        return classify.scorer(predictor, labels, label_map)

    def test() -> Scorer:
        source = open_test()
        logging.info('test: %d images', len(source))
        return scorer(source)

    val = scorer(eval_source)
    example = jnp.zeros((1, m.image_size, m.image_size, m.channels), jnp.float32)
    return Task(
        name='image_cls',
        model=model,
        init_params=lambda rng: model.init(rng, example)['params'],
        loss_fn=loss_fn,
        train_iter=iter(train_ds),
        evaluate=val.evaluate,
        metric=classify.task_metric(label_map, config),
        flops_per_step=flops_lib.vit_train_flops(vit, config.batch_size),
        init_from=InitFrom({'backbone': config.init_subtree}, position_table_adapter(vit)),
        predict=val.predict,
        test=test if open_test is not None else None,
        summary_extras=lambda final: {'train_examples': len(picked)},
    )
