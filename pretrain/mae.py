"""Masked image modelling (MAE, He et al. 2022) as a pretraining task: each image loses a
random `mae.mask_ratio` of its patches (drawn on device, per example), the ViT encodes the
visible ones only, a light decoder predicts the masked ones' pixels, and the loss is the
mean squared error on the masked patches (against per-patch normalised pixels with
`mae.norm_pix_loss`). Evaluated as SimCLR is: the held-out reconstruction loss, and k-NN
and linear probes on the frozen backbone features (every patch visible) of a labelled
split. The backbone is saved under `backbone`, so fine-tuning restores it like SimCLR's."""

import jax
import jax.numpy as jnp
import ml_collections

from core import config as config_lib
from core import evaluators
from core import flops as flops_lib
from core.task import InitFrom, Runtime, Task, compute_dtype
from data import augment as augment_lib
from models import mae as mae_lib
from models.encoder import example_rows
from models.vit import VitConfig
from pretrain import simclr


def check_config(config: ml_collections.ConfigDict) -> None:
    simclr.check_config(config)
    patches = (config.model.image_size // config.model.patch_size) ** 2
    try:
        mae_lib.num_kept(patches, config.mae.mask_ratio)
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from e
    if patches < 2:
        raise config_lib.ConfigError(
            f'a {patches}-patch image has nothing to mask and something to keep: give '
            'model.patch_size a value that cuts model.image_size into several patches'
        )
    d = config.decoder
    if d.hidden_size % d.num_heads:
        raise config_lib.ConfigError(
            f'decoder.hidden_size {d.hidden_size} is not a multiple of decoder.num_heads '
            f'{d.num_heads}'
        )


def mae_loss_fn(model: mae_lib.MaeModel, aug, mask_ratio: float, norm_pix: bool):
    """loss_fn(params, batch, rng, train, rows): batch['image'] uint8 [batch, S, S, C].
    Training images are augmented (`aug`, None: not); evaluation draws its masks from a
    fixed key, so the held-out loss of two evals compares the same masked patches."""
    vit = model.vit
    patches = vit.grid**2
    kept = mae_lib.num_kept(patches, mask_ratio)

    def loss_fn(params, batch, rng, train: bool, rows=None):
        aug_rng, mask_rng, dropout_rng = jax.random.split(rng, 3)
        images = batch['image'].astype(jnp.float32) / 255.0
        rows = example_rows(rows, images.shape[0])
        if train and aug is not None:
            images = augment_lib.augment(aug_rng, images, aug, rows)
        keep, restore = mae_lib.random_masking(mask_rng, rows, patches, mask_ratio)
        pred = model.apply(
            {'params': params},
            images,
            keep,
            restore,
            not train,
            rows,
            rngs={'dropout': dropout_rng},
        )
        loss, count = mae_lib.reconstruction_loss(
            pred, images, restore, kept, vit.patch_size, norm_pix
        )
        return loss, {'denominator': count}

    return loss_fn


def train_flops(vit: VitConfig, dec: mae_lib.DecoderConfig, images: int, kept: int) -> float:
    """Forward x 3 matmul FLOPs of an MAE step: patch embedding of every patch, the encoder
    over (cls +) the kept patches, the decoder over every token, the pixel head."""
    tokens = vit.num_tokens
    encoded = tokens - vit.grid**2 + kept
    patch_pixels = vit.patch_size**2 * vit.channels
    patch = 2 * images * vit.grid**2 * patch_pixels * vit.hidden_size
    encoder = flops_lib.encoder_forward_flops(
        images, encoded, vit.hidden_size, vit.num_layers, vit.mlp_dim
    )
    embed = 2 * images * encoded * vit.hidden_size * dec.hidden_size
    decoder = flops_lib.encoder_forward_flops(
        images, tokens, dec.hidden_size, dec.num_layers, dec.mlp_dim
    )
    pred = 2 * images * vit.grid**2 * dec.hidden_size * patch_pixels
    return 3.0 * (patch + encoder + embed + decoder + pred)


def negated_loss(evaluate):
    """evaluate, plus `neg_reconstruction_loss` (higher is better, as selection wants)."""

    def with_negated(stepper, params):
        result = evaluate(stepper, params)
        if 'reconstruction_loss' in result:
            result['neg_reconstruction_loss'] = -result['reconstruction_loss']
        return result

    return with_negated


def build(config: ml_collections.ConfigDict, workdir: str, runtime: Runtime) -> Task:
    del workdir
    m = config.model
    vit = VitConfig.from_config(config.model, dtype=compute_dtype(config))
    dec = mae_lib.DecoderConfig.from_config(config.decoder)
    train_source, eval_source, train_ds = simclr.image_inputs(config, runtime)
    model = mae_lib.MaeModel(vit, dec)
    aug = augment_lib.AugmentConfig.from_config(config.augment) if config.augment.crop else None
    mask_ratio = config.mae.mask_ratio
    loss_fn = mae_loss_fn(model, aug, mask_ratio, config.mae.norm_pix_loss)
    loss_batches, probe = simclr.image_evals(
        config, train_source, eval_source, model.apply, runtime
    )

    patches = vit.grid**2
    kept = mae_lib.num_kept(patches, mask_ratio)
    example = jnp.zeros((1, m.image_size, m.image_size, m.channels), jnp.float32)
    keep, restore = mae_lib.random_masking(
        jax.random.key(0), jnp.zeros(1, jnp.int32), patches, mask_ratio
    )
    evaluate = evaluators.contrastive_evaluate(loss_batches, probe, name='reconstruction')
    metric = 'linear_probe_accuracy'
    if probe is None:  # unlabelled images: the best checkpoint is the lowest held-out loss
        metric, evaluate = 'neg_reconstruction_loss', negated_loss(evaluate)
    return Task(
        name='mae',
        model=model,
        init_params=lambda rng: model.init(rng, example, keep, restore)['params'],
        loss_fn=loss_fn,
        train_iter=iter(train_ds),
        evaluate=evaluate,
        metric=metric,
        flops_per_step=train_flops(vit, dec, config.batch_size, kept),
        init_from=InitFrom({'backbone': 'backbone'}),
    )
