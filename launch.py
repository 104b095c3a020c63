"""One command line for every stage, on one host or many.

  python launch.py pretrain --config configs/bert_mlm.py:tiny --workdir runs/mlm [--config.x=y]

Multi-host: on a TPU pod slice or under SLURM `jax.distributed` starts by itself; elsewhere
pass --coordinator_address HOST:PORT --num_processes N --process_id I on every host.
--local_processes N starts N processes on this machine (CPU, gloo collectives), to test
multi-host code without a cluster.
"""

import argparse
import os
import socket
import subprocess
import sys

# stage: (an example config, what --workdir is). pretrain and finetune run config.task
# from the registry (core/task.py TASKS); evaluate scores a fine-tuning run; study runs both.
STAGES = {
    'pretrain': ('configs/bert_mlm.py:tiny', 'Directory for checkpoints, metrics and logs.'),
    'finetune': ('configs/text_cls.py:tiny', 'Directory for checkpoints, metrics and logs.'),
    'evaluate': ('configs/text_cls.py:tiny', 'The fine-tuning run to evaluate.'),
    'study': ('configs/study.py:digits', 'Directory of the study and all its runs.'),
}
DRY_RUN = ('pretrain', 'finetune')  # the stages that take --dry_run
# Single-process tools with their own flags (--from, --to, --input, ...): interop/main.py.
TOOLS = ('import-hf', 'export-hf', 'embed')
# `launch.py plot --workdir RUN [RUN ...]`: runs' curves in one PNG (core/plots.py).
PLOT = 'plot'


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


def run_stage(stage: str, config, workdir: str, dry_run: bool) -> dict:
    """What a stage does with its config and workdir; returns its summary (or plan)."""
    from core import memory_plan, trainer
    from core.config import ConfigError

    wanted = 'finetune' if stage == 'evaluate' else stage  # evaluate reads a fine-tuning run
    if config.get('stage', wanted) != wanted:
        raise ConfigError(
            f'this is a {config.stage} config (config.stage={config.stage!r}) and `launch.py '
            f'{stage}` takes a {wanted} config (e.g. {STAGES[stage][0]}); run it with '
            f'`launch.py {config.stage}`'
        )
    if dry_run:  # compile the train step for the mesh, print the memory plan; no training
        return memory_plan.run(config, workdir, stage)
    if stage == 'evaluate':  # the validation-selected checkpoint, scored on the test split
        return trainer.evaluate_checkpoint(config, workdir, 'finetune')
    if stage == 'study':
        from study import runner

        return runner.run_study(config, workdir)
    return trainer.train_and_evaluate(config, workdir, stage)


def absl_main(stage: str, argv: list[str]) -> None:
    """Defines the stage's flags (--config, --workdir, --dry_run) and runs it under absl."""
    from absl import app, flags
    from ml_collections import config_flags

    from core import cli

    example, workdir_help = STAGES[stage]
    config = config_flags.DEFINE_config_file('config', None, f'Config file, e.g. {example}')
    workdir = flags.DEFINE_string('workdir', None, workdir_help)
    dry_run = None
    if stage in DRY_RUN:
        dry_run = flags.DEFINE_bool(
            'dry_run',
            False,
            'Compile the train step for the configured mesh without training; print the memory '
            'plan (parameters, optimizer state, activations per device; FLOPs) and write '
            'WORKDIR/memory_plan.json.',
        )
    flags.mark_flags_as_required(['config', 'workdir'])

    def main(unused_argv):
        planned = dry_run is not None and dry_run.value
        cli.run_stage(
            lambda c, w: run_stage(stage, c, w, planned), config.value, workdir.value, stage
        )

    app.run(main, argv=[f'launch.py {stage}', *argv])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog='launch.py', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument('stage', choices=[*sorted(STAGES), *TOOLS, PLOT])
    parser.add_argument('--local_processes', type=int, default=0)
    parser.add_argument('--coordinator_address', default=None)
    parser.add_argument('--num_processes', type=int, default=None)
    parser.add_argument('--process_id', type=int, default=None)
    if argv and argv[0] in TOOLS:  # their own flags (and --help)
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from interop import main as tools

        return tools.main(argv)
    if argv and argv[0] == PLOT:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from core import plots

        return plots.main(argv[1:])
    args, rest = parser.parse_known_args(argv)
    if args.local_processes > 1:
        return _spawn_local(args.stage, args.local_processes, rest)
    if args.coordinator_address and (args.num_processes is None or args.process_id is None):
        parser.error('--coordinator_address needs --num_processes and --process_id')

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from core import cli, distributed

    cli.check_config_overrides(rest)
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    absl_main(args.stage, rest)
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
