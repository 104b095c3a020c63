r"""Masked image modelling (MAE, He et al. 2022) pretraining of a ViT.

Run (the default: the tiny ViT of configs/vit_simclr.py on the embedded scikit-learn
digits, 16x16 grayscale in 4x4 patches, the same 1408 training images and 302 held out
for the probes; the 389 test images are left to image_cls; 1.5 minutes on 2 CPU cores;
on the frozen backbone, linear probe 0.957 (0.884 at random init), 5-labels-per-class
probe 0.770 (0.545), 20-NN 0.897 (0.503); docs/techniques.md has the details and the
study against SimCLR):

  python launch.py pretrain --config configs/vit_mae.py:tiny --workdir runs/mae
  python launch.py finetune --config configs/image_cls.py:tiny --workdir runs/digits_mae \
      --config.init_from=runs/mae

The encoder is vit_simclr.py's (the same `model.*` keys), so image_cls fine-tunes an MAE
run as it does a SimCLR run. Presets: `tiny` (H128 L4) and the standard ViT sizes `ti`,
`s`, `b`, `l`; `configs/vit_mae.py:b,imagenet` is MAE's ImageNet recipe (224px, patch 16,
mask 75%, an 8-layer 512-wide decoder, batch 4096, AdamW lr 1.5e-4 x batch/256 with
b2 0.95, weight decay 0.05, 40 warmup epochs, cosine, random resized crop and flip only)
at 800 epochs. Data keys as vit_simclr.py.
"""

import ml_collections

from configs import common, vit_simclr


def get_config(arg: str = 'tiny') -> ml_collections.ConfigDict:
    preset, _, recipe = arg.partition(',')
    sizes = common.size(vit_simclr.SIZES, preset, 'vit_mae')
    if recipe not in ('', 'digits', 'imagenet'):
        raise ValueError(f'unknown recipe {recipe!r} for vit_mae; expected digits or imagenet')
    imagenet = recipe == 'imagenet'
    c = ml_collections.ConfigDict()
    c.stage = 'pretrain'
    c.task = 'mae'
    c.seed = 0

    # Input: as vit_simclr.py (labels feed the k-NN / linear-probe evals only).
    c.data = vit_simclr.images(imagenet)

    # Model: the ViT backbone that transfers (vit_simclr.py's keys) + the decoder below.
    c.model = vit_simclr.backbone(sizes, imagenet)
    c.decoder = ml_collections.ConfigDict()
    c.decoder.hidden_size = 512 if imagenet else 64
    c.decoder.num_layers = 8 if imagenet else 2
    c.decoder.num_heads = 16 if imagenet else 4
    c.decoder.mlp_dim = 2048 if imagenet else 256

    # The objective: which patches are hidden, and what the decoder predicts.
    c.mae = ml_collections.ConfigDict()
    # Of each image's patches, drawn per example on device. ImageNet: MAE's 75% of 196.
    # Digits have 16 patches, and hiding half was best on the probes' validation split
    # (700 steps, seed 0: linear probe 0.957 / 20-NN 0.897 / 5-shot 0.770 at 0.5; 0.940 /
    # 0.851 / 0.738 at 0.75; 0.957 / 0.868 / 0.725 at 0.25).
    c.mae.mask_ratio = 0.75 if imagenet else 0.5
    c.mae.norm_pix_loss = True  # each target patch normalised by its own mean and variance

    # Augmentation: random resized crop (and flip for ImageNet) only; MAE needs no colour
    # jitter. crop=False: none.
    c.augment = ml_collections.ConfigDict()
    c.augment.crop = True
    c.augment.crop_scale = (0.2, 1.0) if imagenet else (0.35, 1.0)
    c.augment.crop_ratio = (3 / 4, 4 / 3)
    c.augment.flip = imagenet
    c.augment.color_jitter_prob = 0.0
    c.augment.brightness = 0.0
    c.augment.contrast = 0.0
    c.augment.saturation = 0.0
    c.augment.hue = 0.0
    c.augment.grayscale_prob = 0.0
    c.augment.blur_prob = 0.0
    c.augment.blur_sigma = (0.1, 2.0)

    c.eval = vit_simclr.probes(imagenet)

    # Optimization. ImageNet: MAE's (800 epochs of 1.28M images at batch 4096). Digits
    # (CPU): the SimCLR budget of vit_simclr.py:tiny, 700 steps of 256.
    c.batch_size = 4096 if imagenet else 256
    c.total_steps = 250_000 if imagenet else 700
    c.warmup_steps = 12_500 if imagenet else 70
    c.learning_rate = 1.5e-4 * c.batch_size / 256 if imagenet else 1e-3
    c.grad_accum_steps = 1
    c.optimizer = common.optimizer(
        name='adamw',
        b2=0.95,
        weight_decay=0.05,
        grad_clip_norm=0.0 if imagenet else 1.0,
        schedule='cosine',
    )

    c.update(
        common.runtime(
            eval_every=12_500 if imagenet else 100,
            eval_steps=10,  # batches for the held-out reconstruction loss
            checkpoint_every=12_500 if imagenet else 350,
            keep_checkpoints=3,
        )
    )
    return c
