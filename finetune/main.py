"""`python -m finetune.main ARGS` is `python launch.py finetune ARGS` (launch.py)."""

import sys

import launch

sys.exit(launch.main(['finetune', *sys.argv[1:]]))
