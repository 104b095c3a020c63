"""`python -m study.main ARGS` is `python launch.py study ARGS` (launch.py)."""

import sys

import launch

sys.exit(launch.main(['study', *sys.argv[1:]]))
