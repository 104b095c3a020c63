r"""Transfer study: one pretraining, then fine-tuning at several label budgets and seeds,
from the pretrained encoder and from scratch, summarised as a table and a plot.

  python launch.py study --config configs/study.py:digits --workdir runs/study

The claim it makes, per label budget: at the same fine-tuning budget on every arm (steps,
batch, optimizer; for text also the pretraining's vocabulary), each arm at its own
learning rate, this is the test score of the checkpoint each run selects on its
validation split. The rate: by default each arm's start's (pretrained / imported: their
encoder's fine-tuning recipe, core/recipe.py; scratch: finetune.learning_rate; linear
probe: probe_learning_rate); with --config.learning_rates="(1e-4,3e-4,1e-3)" every arm
runs at each rate and the one validation prefers is reported. Validation: data.eval_fraction
of each class of the training examples, by seed (the same split for every budget of a
seed). Test: the task's own split, read once at the end of each run (digits: 389 images;
pydoc_topics: 268 paragraphs). Reported as a mean and a 95% interval (Student t) over
seeds per arm and budget, and the paired pretrained - scratch difference (same seeds) with
its 95% interval; steps-to-target count validation rows.

Presets:
  digits  SimCLR ViT on the embedded digits (configs/vit_simclr.py:tiny), then digits
          classification (configs/image_cls.py:tiny) at 1%..100% of the labels, 3 seeds,
          arms pretrained / scratch / linear_probe; 400 steps a fine-tuning. 40 minutes on
          2 CPU cores with a SimCLR run reused (docs/study.md has the table: pretraining +0.49
          test accuracy at 1 label per class, +0.05 with every label, paired intervals
          above zero at every budget).
  text    MLM BERT-tiny on the embedded CPython docs (configs/bert_mlm.py:tiny), then the
          pydoc_topics classification (configs/text_cls.py:tiny; the scratch arm gets the
          pretraining's vocabulary, so both arms tokenize alike); with
          --config.imported=DIR (a `launch.py import-hf` workdir) a third arm fine-tunes that
          imported checkpoint, with its own architecture and vocabulary. docs/study.md has the
          table (10% and all labels, 3 seeds: +0.270 and +0.215 test accuracy, paired
          intervals above zero).
  smoke   a minute-sized digits study for tests: 2 budgets, 1 seed, a few steps.

The nested `pretrain` and `finetune` blocks are whole stage configs, so every key of those
files can be overridden here: --config.finetune.total_steps=200,
--config.pretrain.model.num_layers=2. `pretrain_workdir` reuses a pretraining that already
exists (e.g. runs/simclr) instead of WORKDIR/pretrain.

Arms (`arms`, comma-separated):
  pretrained    fine-tune everything from the pretrained encoder
  scratch       the same model, configuration and data, from random init
  linear_probe  the pretrained encoder frozen, only the head trained (`probe_learning_rate`)
  imported      fine-tune the checkpoint in `imported` (needs --config.imported)
  distilled     (text studies, with `imported`) the finetune block's model from scratch,
                distilled (configs/distill.py, the `distill` keys) from the imported arm's
                run of the same budget and seed, on its labels and the budget's unlabelled
                rest; scratch then reads the teacher's vocabulary too (not with the
                pretrained or linear_probe arms)
  domain_adapted  (text studies, with `imported`) fine-tune, as the imported arm does, the
                imported encoder after domain-adaptive pretraining (`dapt`: configs/dapt.py,
                MLM continued on the task's training text less that seed's validation
                split; one run per seed in WORKDIR/dapt/seed<k>, its checkpoint chosen by
                held-out masked-token accuracy); reported against the imported arm too
  mae           (image studies) fine-tune everything from the study's MAE pretraining
                (`mae_pretrain`: configs/vit_mae.py:tiny, the same ViT and images as the
                SimCLR one, run in WORKDIR/mae_pretrain unless `mae_pretrain_workdir` names
                a finished one)
  mae_linear_probe  (image studies) the MAE encoder frozen, only the head trained

MAE against SimCLR against scratch on digits (docs/techniques.md has the table: MAE -
scratch +0.132 test accuracy with 62 labels, +0.035 with all; SimCLR +0.239, +0.047):
  python launch.py study --config configs/study.py:digits --workdir runs/study_mae \
      --config.arms=pretrained,mae,scratch,linear_probe,mae_linear_probe \
      --config.label_fractions="(0.05,1.0)"

Budgets: `label_fractions` (a fraction of each class, 1.0 = every label) or
`examples_per_class`; set exactly one. The labelled subsets are nested across budgets and
differ across seeds (data/labelled.py:select_train_examples); a seed also changes the head's
initialisation and the data order.
"""

import ml_collections

from configs import bert_mlm, dapt, distill, image_cls, text_cls, vit_mae, vit_simclr


def get_config(preset: str = 'digits') -> ml_collections.ConfigDict:
    if preset not in ('digits', 'text', 'smoke'):
        raise ValueError(f'unknown preset {preset!r} for study; expected digits, text or smoke')
    c = ml_collections.ConfigDict()
    c.stage = 'study'
    c.name = preset
    if preset == 'text':
        c.pretrain = bert_mlm.get_config('tiny')
        c.finetune = text_cls.get_config('tiny')
        c.finetune.total_steps = 400
        c.finetune.warmup_steps = 40
        c.finetune.eval_every = 50
        c.label_fractions = (0.05, 0.1, 0.25, 0.5, 1.0)
        c.target_accuracy = 0.5
        c.arms = 'pretrained,scratch'
        # The distilled arm: configs/distill.py's soft-target keys (T, alpha, unlabelled).
        c.distill = distill.get_config('tiny').distill
        # The domain_adapted arm's pretraining (configs/dapt.py), per seed, from `imported`;
        # its task keys (data.name, files, fields, eval_fraction) are the finetune block's.
        c.dapt = dapt.get_config('tiny')
    else:
        c.pretrain = vit_simclr.get_config('tiny')
        c.finetune = image_cls.get_config('tiny')
        c.finetune.total_steps = 400
        c.finetune.warmup_steps = 40
        c.finetune.eval_every = 50
        c.label_fractions = (0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
        c.target_accuracy = 0.9
        c.arms = 'pretrained,scratch,linear_probe'
        # The mae arms' start: MAE on the same images, at SimCLR's budget (700 steps of 256).
        c.mae_pretrain = vit_mae.get_config('tiny')
        c.mae_pretrain_workdir = ''  # '' = WORKDIR/mae_pretrain; or an MAE run to reuse
    # Every eval is a candidate: the checkpoint kept best on validation is the one tested.
    c.finetune.checkpoint_every = c.finetune.eval_every
    c.finetune.keep_checkpoints = 1  # the latest, plus the best on validation
    c.examples_per_class = ()
    c.seeds = (0, 1, 2)
    c.probe_learning_rate = 1e-2  # the linear_probe arm: a frozen encoder wants a larger rate
    # A grid, e.g. (1e-4, 3e-4, 1e-3): every arm, budget and seed runs at each rate, and the
    # rate whose selected checkpoint is best on validation is the one reported (with its
    # test figure). (): each arm at its own rate: the pretrained and imported arms their
    # encoder's fine-tuning recipe (core/recipe.py), scratch finetune.learning_rate, the
    # linear probe probe_learning_rate.
    c.learning_rates = ()
    c.pretrain_workdir = ''  # '' = WORKDIR/pretrain; or an existing pretraining to reuse
    c.imported = ''  # a `launch.py import-hf` workdir: the `imported` arm
    if preset == 'smoke':
        for pre in (c.pretrain, c.mae_pretrain):  # SimCLR's and MAE's
            pre.total_steps = 6
            pre.warmup_steps = 2
            pre.eval_every = 6
            pre.checkpoint_every = 6
            pre.log_every = 3
            pre.batch_size = 32
            pre.model.num_layers = 1
            pre.eval.few_shot = 0
            pre.eval.probe_train_examples = 200
            pre.eval_steps = 1
        c.mae_pretrain.decoder.num_layers = 1
        c.finetune.model.num_layers = 1
        c.finetune.total_steps = 8
        c.finetune.warmup_steps = 2
        c.finetune.eval_every = 4
        c.finetune.checkpoint_every = 4
        c.finetune.log_every = 4
        c.label_fractions = (0.05, 1.0)
        c.seeds = (0,)
        c.target_accuracy = 0.3
    return c
