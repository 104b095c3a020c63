"""SimCLR (Chen et al. 2020) as a pretraining task: two augmented views of every image,
a ViT + projection MLP, NT-Xent over the global batch; evaluated by k-NN and a linear
probe on the frozen backbone features of a labelled split."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from core import config as config_lib
from core import evaluators
from core import flops as flops_lib
from core.task import InitFrom, Runtime, Task, compute_dtype
from data import augment as augment_lib
from data import image_sources, image_splits, pipeline, shards
from models.contrastive import SimClrModel
from models.encoder import example_rows
from models.vit import VitConfig
from pretrain import contrastive


def check_config(config: ml_collections.ConfigDict) -> None:
    config_lib.check_vit(config.model)
    try:
        augment_lib.AugmentConfig.from_config(config.augment)
    except ValueError as e:
        raise config_lib.ConfigError(f'config.augment: {e}') from e


def projection_flops(hidden: int, proj_hidden: int, proj_dim: int, layers: int) -> float:
    dims = [hidden] + [proj_hidden] * (layers - 1) + [proj_dim]
    return float(sum(2 * a * b for a, b in zip(dims[:-1], dims[1:])))


def simclr_loss_fn(model: SimClrModel, aug: augment_lib.AugmentConfig, temperature: float, runtime):
    """loss_fn(params, batch, rng, train, rows): batch['image'] uint8 [batch, S, S, C]."""

    def local(z1, z2, axis_name):
        return contrastive.nt_xent(z1, z2, temperature, axis_name)

    loss = contrastive.global_loss(local, runtime, 2)

    def loss_fn(params, batch, rng, train: bool, rows=None):
        aug_rng, dropout_rng = jax.random.split(rng)
        images = batch['image'].astype(jnp.float32) / 255.0
        n = images.shape[0]
        rows = example_rows(rows, n)
        view1, view2 = augment_lib.two_views(aug_rng, images, aug, rows)
        z = model.apply(
            {'params': params},
            jnp.concatenate([view1, view2]),
            not train,
            contrastive.view_rows(rows),
            rngs={'dropout': dropout_rng},
        )  # [2 * batch, proj_dim]
        z = contrastive.l2_normalize(z)
        sums = loss(z[:n], z[n:])
        return sums['loss'], {'accuracy': sums['accuracy'], 'denominator': sums['count']}

    return loss_fn


def image_batches(source, runtime: Runtime) -> list[dict]:
    """One pass over an image source as this host's padded batches (image, label, valid)."""
    return evaluators.fixed_batches(
        lambda **kw: pipeline.image_dataset(source, **kw), len(source), runtime, full_only=False
    )


def image_inputs(config, runtime: Runtime):
    """(train source, eval source, the training stream) of an image pretraining."""
    m = config.model
    train_source, eval_source = image_splits.image_splits(config.data, m.image_size, m.channels)
    train_ds = shards.training_stream(
        functools.partial(pipeline.image_dataset, train_source, train=True), config, runtime
    )
    logging.info(
        'data: %d train / %d eval images of %dx%dx%d, %d classes',
        len(train_source),
        len(eval_source),
        m.image_size,
        m.image_size,
        m.channels,
        image_sources.num_classes(train_source),
    )
    return train_source, eval_source, train_ds


def image_evals(config, train_source, eval_source, apply, runtime: Runtime):
    """(held-out loss batches, FeatureProbe or None) of an image pretraining: k-NN and linear
    probes on the frozen `features` (apply(variables, images, method='features')), fitted
    on up to eval.probe_train_examples training images and scored on the eval split."""
    loss_batches = evaluators.fixed_batches(
        lambda **kw: pipeline.image_dataset(eval_source, **kw),
        len(eval_source),
        runtime,
        full_only=True,
    )[: config.eval_steps]
    if not loss_batches:
        logging.warning(
            'the eval split (%d images) is smaller than one batch of %d: the held-out '
            'loss is not computed (k-NN and linear probe still are)',
            len(eval_source),
            config.batch_size,
        )
    probe = None
    num_classes = image_sources.num_classes(train_source)
    if num_classes > 1:
        probe_train = image_sources.probe_subset(train_source, config.eval.probe_train_examples)
        probe = evaluators.FeatureProbe(
            lambda params, batch: apply(
                {'params': params}, batch['image'].astype(jnp.float32) / 255.0, method='features'
            ),
            image_batches(probe_train, runtime),
            image_batches(eval_source, runtime),
            num_classes=num_classes,
            knn_k=config.eval.knn_k,
            knn_temperature=config.eval.knn_temperature,
            probe_l2=config.eval.probe_l2 or None,
            few_shot=config.eval.few_shot,
        )
        logging.info(
            'probe: %d train / %d validation labelled images', len(probe_train), len(eval_source)
        )
    else:
        logging.warning('the images carry no labels: k-NN and linear probe are not computed')

    return loss_batches, probe


def build(config: ml_collections.ConfigDict, workdir: str, runtime: Runtime) -> Task:
    del workdir
    m = config.model
    vit = VitConfig.from_config(config.model, dtype=compute_dtype(config))
    train_source, eval_source, train_ds = image_inputs(config, runtime)
    model = SimClrModel(vit, m.proj_hidden, m.proj_dim, m.proj_layers)
    aug = augment_lib.AugmentConfig.from_config(config.augment)
    loss_fn = simclr_loss_fn(model, aug, config.loss.temperature, runtime)
    loss_batches, probe = image_evals(config, train_source, eval_source, model.apply, runtime)
    example = jnp.zeros((1, m.image_size, m.image_size, m.channels), jnp.float32)
    return Task(
        name='simclr',
        model=model,
        init_params=lambda rng: model.init(rng, example)['params'],
        loss_fn=loss_fn,
        train_iter=iter(train_ds),
        evaluate=evaluators.contrastive_evaluate(loss_batches, probe),
        metric='linear_probe_accuracy' if probe is not None else 'contrastive_accuracy',
        flops_per_step=flops_lib.vit_train_flops(
            vit,
            2 * config.batch_size,
            projection_flops(m.hidden_size, m.proj_hidden, m.proj_dim, m.proj_layers),
        ),
        init_from=InitFrom({'backbone': 'backbone'}),
    )
