r"""SimCLR pretraining of a ViT.

Run (the default: a small ViT on the embedded scikit-learn digits, 8x8 grayscale images
resized to 16x16: the 1408 images of their training split, 302 of them held out to score
the probes; the 389 test images are left to image_cls; 6.5 to 8.5 minutes on 2 CPU cores;
on the frozen backbone, linear probe 0.964 (0.884 for the same probe at random init),
5-labels-per-class probe 0.901 (0.545), 20-NN 0.983 (0.503); docs/results.md has the details):

  python launch.py pretrain --config configs/vit_simclr.py:tiny --workdir runs/simclr

Presets: `tiny` (H128 L4, for a CPU), and the standard ViT sizes `ti`, `s`, `b`, `l`
(widths, depths and heads of Dosovitskiy et al. / DeiT). Every preset trains on digits
unless the recipe says otherwise: `configs/vit_simclr.py:b,imagenet` is SimCLR's ImageNet
recipe (224px RGB, patch 16, batch 4096, LARS at 0.3 x batch/256, temperature 0.1, the
full augmentation set) on TFDS `imagenet2012` prepared in --config.data.data_dir.
Other data: --config.data.name=TFDS_NAME, or --config.data.files=DIR (one folder per
class) or FILE.npz (arrays `images` [N, H, W(, C)] and optional `labels`).
"""

import ml_collections

from configs import common

SIZES = {'tiny': (128, 4, 4, 256), **common.VIT_SIZES}


def get_config(arg: str = 'tiny') -> ml_collections.ConfigDict:
    preset, _, recipe = arg.partition(',')
    sizes = common.size(SIZES, preset, 'vit_simclr')
    if recipe not in ('', 'digits', 'imagenet'):
        raise ValueError(f'unknown recipe {recipe!r} for vit_simclr; expected digits or imagenet')
    imagenet = recipe == 'imagenet'
    c = ml_collections.ConfigDict()
    c.stage = 'pretrain'
    c.task = 'simclr'
    c.seed = 0

    c.data = images(imagenet)

    # Model: ViT backbone (what transfers) + projection MLP (dropped after pretraining).
    c.model = backbone(sizes, imagenet)
    c.model.proj_hidden = 2048 if imagenet else 512
    c.model.proj_dim = 128
    c.model.proj_layers = 3 if imagenet else 2  # SimCLR v2: a deeper head helps

    # Loss: NT-Xent over the global batch (negatives from every device and host).
    c.loss = ml_collections.ConfigDict()
    c.loss.temperature = 0.1 if imagenet else 0.2

    # Augmentations, on device per example. Digits: no flip (it changes the digit) and no
    # colour (grayscale); brightness/contrast jitter and blur still apply.
    c.augment = ml_collections.ConfigDict()
    c.augment.crop = True
    c.augment.crop_scale = (0.08, 1.0) if imagenet else (0.35, 1.0)
    c.augment.crop_ratio = (3 / 4, 4 / 3)
    c.augment.flip = imagenet
    c.augment.color_jitter_prob = 0.8
    c.augment.brightness = 0.8 if imagenet else 0.4  # SimCLR's strength-1.0 jitter
    c.augment.contrast = 0.8 if imagenet else 0.4
    c.augment.saturation = 0.8
    c.augment.hue = 0.2
    c.augment.grayscale_prob = 0.2
    c.augment.blur_prob = 0.5 if imagenet else 0.0
    c.augment.blur_sigma = (0.1, 2.0)

    c.eval = probes(imagenet)

    # Optimization. ImageNet: LARS, lr 0.3 x batch/256 (linear scaling rule), wd 1e-6,
    # 10 warmup epochs, cosine. Digits (CPU): AdamW, which needs no large batch.
    c.batch_size = 4096 if imagenet else 256
    c.total_steps = 31_200 if imagenet else 700  # 100 epochs of ImageNet; ~125 of digits
    c.warmup_steps = 3120 if imagenet else 70
    c.learning_rate = 0.3 * c.batch_size / 256 if imagenet else 1e-3
    c.grad_accum_steps = 1  # note: micro-batches see only their own negatives
    c.optimizer = common.optimizer(
        name='lars' if imagenet else 'adamw',
        weight_decay=1e-6 if imagenet else 0.05,
        grad_clip_norm=0.0 if imagenet else 1.0,
        schedule='cosine',
    )
    c.optimizer.trust_coefficient = 0.001

    # Runtime (configs/common.py); init_from: a run whose `backbone` initialises this one's.
    c.update(
        common.runtime(
            eval_every=3120 if imagenet else 100,
            eval_steps=10,  # batches for the held-out contrastive loss
            checkpoint_every=3120 if imagenet else 350,
            keep_checkpoints=3,
        )
    )
    return c


def images(imagenet: bool) -> ml_collections.ConfigDict:
    """data.* of image pretraining (configs/vit_mae.py's too). Labels are not used for
    training, only by the k-NN / linear-probe evals. digits: embedded; pretraining reads
    its 1408-image training split, never the 389 test images that image_cls scores at the
    end. data.files: a class-per-folder directory or an .npz. Held out (the probes score
    it) when there is no eval split: eval_fraction."""
    d = common.data(
        'imagenet2012' if imagenet else 'digits',
        eval_fraction=0.2,
        eval_split='validation' if imagenet else '',
    )
    d.image_field = 'image'  # the TFDS feature / table column of the images
    d.label_field = 'label'
    d.resize = True  # resize every image to model.image_size (False: sizes must match)
    return d


def probes(imagenet: bool) -> ml_collections.ConfigDict:
    """eval.*: online evaluation of frozen backbone features on the labelled splits (also
    configs/vit_mae.py's)."""
    # Fitted on the training split, scored on the held-out one (never a downstream test
    # split).
    e = ml_collections.ConfigDict()
    e.knn_k = 20
    e.knn_temperature = 0.07
    e.probe_train_examples = 10_000  # labelled train images the probes fit on
    e.probe_l2 = 0.0  # 0: chosen on a held-out part of the probe's train split
    # Also a probe on this many labels per class (0: off), written as
    # linear_probe_<k>shot_accuracy: with every label, even random features of digits are
    # nearly linearly separable; with few, the representation decides.
    e.few_shot = 0 if imagenet else 5
    return e


def backbone(sizes: tuple[int, int, int, int], imagenet: bool) -> ml_collections.ConfigDict:
    """model.* of the ViT that transfers (configs/image_cls.py builds its encoder here too,
    so SimCLR checkpoints fit): 224px RGB patch 16 for ImageNet, else the 16px digits."""
    m = common.vit_encoder(
        sizes,
        image_size=224 if imagenet else 16,
        patch_size=16 if imagenet else 4,
        channels=3 if imagenet else 1,
    )
    m.pooler = False  # Dense + tanh on the cls token (backbone/pooler): imported HF ViTs
    return m
