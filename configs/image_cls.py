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

from configs import vit_simclr


def get_config(arg: str = 'tiny') -> ml_collections.ConfigDict:
    c = vit_simclr.get_config(arg)  # the same encoder keys, so SimCLR checkpoints fit
    imagenet = 'imagenet' in arg
    c.stage = 'finetune'
    c.task = 'image_cls'
    for key in ('loss', 'augment', 'eval'):
        del c[key]
    for key in ('proj_hidden', 'proj_dim', 'proj_layers'):
        del c.model[key]
    c.model.head_dropout = 0.0
    c.model.zero_init_head = True

    c.transfer = ml_collections.ConfigDict()
    c.transfer.freeze_backbone = False  # linear probe
    c.transfer.freeze_layers = 0
    c.transfer.layer_decay = 1.0 if not imagenet else 0.75
    c.transfer.head_lr_scale = 1.0  # the new head's lr, times the encoder's
    # With init_from, learning_rate, warmup_steps, the schedule, head_lr_scale (and a text
    # start's pooling) follow the start (core/recipe.py, docs/recipe.md) unless given on
    # the command line; the run records what it took here. 'none': this file's values.
    c.transfer.start_defaults = ''

    c.init_from = ''
    c.init_subtree = 'backbone'  # image_backbone for a CLIP checkpoint
    c.train_examples = ''
    # Validation (eval rows, best checkpoint, early stopping): eval_files / eval_split, else
    # this part of each class of the training images, chosen by seed. Test, scored once at
    # the end on the checkpoint validation picked: an image folder / .npz or a TFDS split
    # (the digits ship their own 389 images).
    c.data.eval_fraction = 0.1
    c.data.test_files = ''
    c.data.test_split = ''

    c.eval = ml_collections.ConfigDict()
    c.eval.metric = ''  # '' = accuracy
    c.eval.evaluate_split = 'test'  # what `launch.py evaluate` scores: test | validation
    c.early_stopping_patience = 0

    c.batch_size = 64 if not imagenet else 512
    c.total_steps = 300 if not imagenet else 20_000
    c.warmup_steps = 30 if not imagenet else 2000
    c.learning_rate = 1e-3 if not imagenet else 1e-3
    c.optimizer.name = 'adamw'
    c.optimizer.b1 = 0.9
    c.optimizer.weight_decay = 0.05
    c.optimizer.grad_clip_norm = 1.0
    c.optimizer.schedule = 'cosine'
    c.log_every = 50
    c.eval_every = 50 if not imagenet else 2000
    c.checkpoint_every = c.eval_every
    c.keep_checkpoints = 2
    return c
