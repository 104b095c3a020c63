"""Pretraining entrypoint.

python -m pretrain.main [--dry_run] --config configs/bert_mlm.py:tiny --workdir DIR [--config.x=y]
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from core import cli

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/bert_mlm.py:tiny'
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and logs.')
_DRY_RUN = flags.DEFINE_bool(
    'dry_run',
    False,
    'Compile the train step for the configured mesh without training; print the memory plan '
    '(parameters, optimizer state, activations per device; FLOPs) and write '
    'WORKDIR/memory_plan.json.',
)
flags.mark_flags_as_required(['config', 'workdir'])


def run(config, workdir: str) -> dict:
    """Runs the pretraining task the config names (config.task)."""
    from pretrain import train

    return train.train_and_evaluate(config, workdir)


def plan(config, workdir: str) -> dict:
    """The memory plan of the run the config describes (--dry_run): compiled, not run."""
    from core import memory_plan
    from pretrain import train

    return memory_plan.run(config, workdir, train.TASKS, 'pretrain')


def main(argv):
    del argv
    cli.run_stage(plan if _DRY_RUN.value else run, _CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
    cli.check_config_overrides(sys.argv[1:])
    app.run(main)
