"""Transfer-study entrypoint.

python -m study.main --config configs/study.py:digits --workdir runs/study [--config.x=y]
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from core import cli

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/study.py:digits'
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory of the study and all its runs.')
flags.mark_flags_as_required(['config', 'workdir'])


def run(config, workdir: str) -> dict:
    from study import runner

    return runner.run_study(config, workdir)


def main(argv):
    del argv
    cli.run_stage(run, _CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
    cli.check_config_overrides(sys.argv[1:])
    app.run(main)
