r"""Image classification by fine-tuning a ViT encoder.

Run (the default: the embedded digits, 10 classes at 16x16; 1797 images: 1408 for
training, of which a tenth of each class (140) is held out for validation by seed, and a
fixed test split of 389), from a SimCLR run and from scratch with the same budget (under
a minute each on 2 CPU cores; test accuracy 0.987 from SimCLR, 0.882 from scratch; see
docs/results.md):

  python launch.py pretrain --config configs/vit_simclr.py:tiny --workdir runs/simclr
  python launch.py finetune --config configs/image_cls.py:tiny --workdir runs/digits \
      --config.init_from=runs/simclr
  python launch.py finetune --config configs/image_cls.py:tiny --workdir runs/digits_scratch

The eval rows score the validation split, which picks the best checkpoint; the run ends
by scoring that checkpoint once on the test split, which SimCLR pretraining on digits
never reads. Your own images: --config.data.files=DIR (or FILE.npz)
--config.data.test_files=TEST_DIR (and --config.data.eval_files=VAL_DIR, else
data.eval_fraction of each class validates); a TFDS dataset: data.eval_split,
data.test_split.

A checkpoint pretrained at another image size restores with its position table resized
(bicubic) to this run's patch grid: --config.model.image_size=32 with the 16px SimCLR run
above. From a CLIP run: --config.init_subtree=image_backbone. Presets as vit_simclr.py:
tiny, ti, s, b, l. Data keys as vit_simclr.py (TFDS name, a class-per-folder directory,
an .npz). Low labels: --config.train_examples=5 (per class). Linear probe:
--config.transfer.freeze_backbone=true.
"""

import ml_collections

from configs import common, vit_simclr


def get_config(arg: str = 'tiny') -> ml_collections.ConfigDict:
    preset, _, recipe = arg.partition(',')
    sizes = common.size(vit_simclr.SIZES, preset, 'image_cls')  # SimCLR's: its runs fit
    if recipe not in ('', 'digits', 'imagenet'):
        raise ValueError(f'unknown recipe {recipe!r} for image_cls; expected digits or imagenet')
    imagenet = recipe == 'imagenet'
    eval_every = 2000 if imagenet else 50
    c = ml_collections.ConfigDict()
    c.stage = 'finetune'
    c.task = 'image_cls'
    c.seed = 0

    # Validation (eval rows, best checkpoint, early stopping): eval_files / eval_split, else
    # this part of each class of the training images, chosen by seed. Test, scored once at
    # the end on the checkpoint validation picked: an image folder / .npz or a TFDS split
    # (the digits ship their own 389 images).
    c.data = common.data(
        'imagenet2012' if imagenet else 'digits',
        eval_fraction=0.1,
        eval_split='validation' if imagenet else '',
    )
    c.data.image_field = 'image'  # the TFDS feature / table column of the images
    c.data.label_field = 'label'
    c.data.resize = True  # resize every image to model.image_size (False: sizes must match)
    c.data.test_files = ''
    c.data.test_split = ''

    # Model: vit_simclr's backbone (the same keys, so SimCLR checkpoints fit) + a new head.
    c.model = vit_simclr.backbone(sizes, imagenet)
    c.model.head_dropout = 0.0
    c.model.zero_init_head = True

    # transfer, init_subtree, eval.metric (configs/common.py)
    c.update(common.finetune(layer_decay=0.75 if imagenet else 1.0))

    c.batch_size = 512 if imagenet else 64
    c.total_steps = 20_000 if imagenet else 300
    c.warmup_steps = 2000 if imagenet else 30
    c.learning_rate = 1e-3
    c.grad_accum_steps = 1
    c.optimizer = common.optimizer(weight_decay=0.05, schedule='cosine')
    c.optimizer.trust_coefficient = 0.001  # with --config.optimizer.name=lars
    c.update(
        common.runtime(
            eval_every=eval_every,
            eval_steps=10,
            checkpoint_every=eval_every,  # every eval's step is kept if it is the best
            keep_checkpoints=2,
        )
    )
    return c
