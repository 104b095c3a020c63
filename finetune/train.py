"""Fine-tuning: the tasks this stage knows, run by the shared trainer (`core/trainer.py`).

How a run starts is the trainer's: resume this workdir; else `init_from` (the pretrained
encoder into `backbone`, a new head); else from scratch, the baseline of every transfer
claim.
"""

import ml_collections

from core import trainer

TASKS = {
    'text_cls': 'finetune.text_cls',
    'image_cls': 'finetune.image_cls',
    'token_cls': 'finetune.token_cls',
}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) fine-tuning of `config.task` in `workdir`; returns the summary."""
    return trainer.train_and_evaluate(config, workdir, TASKS, 'finetune')
