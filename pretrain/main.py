"""`python -m pretrain.main ARGS` is `python launch.py pretrain ARGS` (launch.py)."""

import sys

import launch

sys.exit(launch.main(['pretrain', *sys.argv[1:]]))
