"""Pretraining: the objectives this stage knows, run by the shared trainer
(`core/trainer.py`)."""

import ml_collections

from core import trainer

# config.task -> the module that defines it (check_config, build).
TASKS = {
    'mlm': 'pretrain.mlm',
    'simclr': 'pretrain.simclr',
    'clip': 'pretrain.clip',
    'simcse': 'pretrain.simcse',
}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) pretraining of `config.task` in `workdir`; returns the summary."""
    return trainer.train_and_evaluate(config, workdir, TASKS, 'pretrain')
