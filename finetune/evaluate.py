"""`python -m finetune.evaluate ARGS` is `python launch.py evaluate ARGS` (launch.py)."""

import sys

import launch

sys.exit(launch.main(['evaluate', *sys.argv[1:]]))
