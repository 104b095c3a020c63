"""Fine-tuning entrypoint.

python -m finetune.main --config configs/text_cls.py:tiny --workdir DIR [--config.x=y]
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from core import cli

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/text_cls.py:tiny'
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and logs.')
flags.mark_flags_as_required(['config', 'workdir'])


def run(config, workdir: str) -> dict:
    """Runs the fine-tuning task the config names (config.task)."""
    from finetune import train

    return train.train_and_evaluate(config, workdir)


def main(argv):
    del argv
    cli.run_stage(run, _CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
    cli.check_config_overrides(sys.argv[1:])
    app.run(main)
