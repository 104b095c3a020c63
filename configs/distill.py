r"""Knowledge distillation of a fine-tuned text classifier into a student (finetune/distill.py).

The teacher is any finished text_cls run (e.g. an imported MiniLM fine-tuned on the task);
the student is this file's model (a size preset of text_cls.py, from scratch or from
--config.init_from), trained on the teacher's soft targets and the labels, and with
distill.unlabelled on the training examples the label budget left out too (soft targets
only). The student tokenizes with the teacher's vocabulary (taken from the teacher's
workdir), and its validation picks its checkpoint as any text_cls run's does:

  python launch.py finetune --config configs/text_cls.py:tiny --workdir runs/teacher \
      --config.init_from=runs/mlm
  python launch.py finetune --config configs/distill.py:tiny --workdir runs/student \
      --config.teacher=runs/teacher

Presets: the BERT sizes of text_cls.py (the student's). Every key of text_cls.py applies.

MLM distillation (pretraining a small encoder from a larger one): the presets mlm_tiny,
mlm_small, mlm_base, mlm_large are configs/bert_mlm.py's student sizes with a teacher, an
MLM run or an import-hf workdir, whose vocabulary the student takes:

  python launch.py pretrain --config configs/distill.py:mlm_tiny --workdir runs/mlm_student \
      --config.teacher=runs/mlm_teacher [--config.distill.hidden_weight=1] \
      [--config.init_from=START]

With init_from the student starts from START's params (an MLM run of the teacher's
vocabulary, or a distilled run's student) and takes its architecture.

A teacher imported without an MLM head (a sentence-transformers MiniLM) has nothing to say
at the masked positions: distil its hidden states alone (--config.distill.alpha=0
--config.distill.hidden_weight=1).
"""

import ml_collections

from configs import bert_mlm, text_cls


def get_config(preset: str = 'tiny') -> ml_collections.ConfigDict:
    if preset.startswith('mlm_'):
        return mlm(preset.removeprefix('mlm_'))
    c = text_cls.get_config(preset)
    c.teacher = ''  # the workdir of a finished text_cls run: the teacher (required)
    c.distill = ml_collections.ConfigDict()
    c.distill.temperature = 2.0  # T: both logits are divided by it in the soft term
    c.distill.alpha = 0.5  # the soft term's weight; the labels' is 1 - alpha
    # Also train on the training examples that train_examples leaves unlabelled (the
    # embedded tasks' remainder of the training split): soft targets only.
    c.distill.unlabelled = True
    # Hidden-state matching (TinyBERT-style): this weight times the mean squared error
    # between each student layer's output and its matched teacher layer's (layers spread
    # evenly, the last with the last), through a learned projection when the widths
    # differ. 0: off (logits only).
    c.distill.hidden_weight = 0.0
    # Compute the teacher's logits of every training example once (WORKDIR/
    # teacher_logits.npz) instead of running the teacher in every step: a cheaper step, and
    # no teacher in memory. Logits only (not with hidden_weight).
    c.distill.cache_teacher = False
    # More unlabelled text of the task (a glob of .txt/.jsonl/.tsv/.csv; data.text_field),
    # soft targets only; any validation or test text in it is dropped.
    c.data.unlabelled_files = ''
    return c


def mlm(size: str) -> ml_collections.ConfigDict:
    """MLM distillation: configs/bert_mlm.py's pretraining of the `size` student, learning
    from the teacher's predictions at the masked positions (and, with hidden_weight, its
    layers' states) as well as the masked tokens."""
    c = bert_mlm.get_config(size)
    c.teacher = ''  # a finished MLM run, or an import-hf workdir (required)
    c.distill = ml_collections.ConfigDict()
    c.distill.temperature = 2.0
    c.distill.alpha = 0.5  # the teacher's predictions; the masked tokens get 1 - alpha
    c.distill.hidden_weight = 0.0  # hidden-state matching (TinyBERT's general distillation)
    return c
