"""One command line for every stage, on one host or many.

  python launch.py pretrain --config configs/bert_mlm.py:tiny --workdir runs/mlm [--config.x=y]

Multi-host: on a TPU pod slice or under SLURM `jax.distributed` starts by itself; elsewhere
pass --coordinator_address HOST:PORT --num_processes N --process_id I on every host.
--local_processes N starts N processes on this machine (CPU, gloo collectives), to test
multi-host code without a cluster.
"""

import argparse
import importlib
import os
import socket
import subprocess
import sys

STAGES = {
    'pretrain': 'pretrain.main',
    'finetune': 'finetune.main',
    'evaluate': 'finetune.evaluate',
    'study': 'study.main',
}
# Single-process tools with their own flags (--from, --to, --input, ...): interop/main.py.
TOOLS = ('import-hf', 'export-hf', 'embed')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _spawn_local(stage: str, n: int, rest: list[str]) -> int:
    """Runs the stage in `n` local processes; returns the first non-zero exit code."""
    address = f'127.0.0.1:{_free_port()}'
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                os.path.abspath(__file__),
                stage,
                *rest,
                '--coordinator_address',
                address,
                '--num_processes',
                str(n),
                '--process_id',
                str(i),
            ],
            env=env,
        )
        for i in range(n)
    ]
    codes = [p.wait() for p in procs]
    return next((c for c in codes if c), 0)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog='launch.py', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument('stage', choices=[*sorted(STAGES), *TOOLS])
    parser.add_argument('--local_processes', type=int, default=0)
    parser.add_argument('--coordinator_address', default=None)
    parser.add_argument('--num_processes', type=int, default=None)
    parser.add_argument('--process_id', type=int, default=None)
    if argv and argv[0] in TOOLS:  # their own flags (and --help)
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from interop import main as tools

        return tools.main(argv)
    args, rest = parser.parse_known_args(argv)
    if args.local_processes > 1:
        return _spawn_local(args.stage, args.local_processes, rest)
    if args.coordinator_address and (args.num_processes is None or args.process_id is None):
        parser.error('--coordinator_address needs --num_processes and --process_id')

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from absl import app

    from core import cli, distributed

    cli.check_config_overrides(rest)
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    module = importlib.import_module(STAGES[args.stage])
    app.run(module.main, argv=[f'launch.py {args.stage}', *rest])
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
