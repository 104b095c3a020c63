"""Evaluation entrypoint: the checkpoint a fine-tuning run selected on its validation split,
scored on its test split.

python -m finetune.evaluate --config configs/text_cls.py:tiny --workdir DIR [--config.x=y]

The config is the run's (the same preset and overrides). --config.eval.evaluate_split=
validation scores the validation split instead (so does a task without a test split);
--config.data.test_files=FILE (or data.test_split) another test set. Writes
WORKDIR/evaluation.json (naming the split) and WORKDIR/predictions.jsonl.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from core import cli

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/text_cls.py:tiny'
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'The fine-tuning run to evaluate.')
flags.mark_flags_as_required(['config', 'workdir'])


def run(config, workdir: str) -> dict:
    from core import trainer
    from finetune.train import TASKS

    return trainer.evaluate_checkpoint(config, workdir, TASKS, 'finetune')


def main(argv):
    del argv
    cli.run_stage(run, _CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
    cli.check_config_overrides(sys.argv[1:])
    app.run(main)
