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
"""

import ml_collections

from configs import text_cls


def get_config(preset: str = 'tiny') -> ml_collections.ConfigDict:
    c = text_cls.get_config(preset)
    c.teacher = ''  # the workdir of a finished text_cls run: the teacher (required)
    c.distill = ml_collections.ConfigDict()
    c.distill.temperature = 2.0  # T: both logits are divided by it in the soft term
    c.distill.alpha = 0.5  # the soft term's weight; the labels' is 1 - alpha
    # Also train on the training examples that train_examples leaves unlabelled (the
    # embedded tasks' remainder of the training split): soft targets only.
    c.distill.unlabelled = True
    return c
