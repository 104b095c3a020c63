"""One command line for every stage, on one host or many.

  python launch.py pretrain --config configs/bert_mlm.py:tiny --workdir runs/mlm [--config.x=y]

Multi-host: on a TPU pod slice or under SLURM `jax.distributed` starts by itself; elsewhere
pass --coordinator_address HOST:PORT --num_processes N --process_id I on every host.
--local_processes N starts N processes on this machine (CPU, gloo collectives), to test
multi-host code without a cluster.

  python launch.py list                                   every config and preset, one line each
  python launch.py config configs/bert_mlm.py:tiny [--config.x=y]   its keys, values, meanings
  python launch.py config runs/mlm                        a run's config.json, the same way
  python launch.py pretrain --help --config configs/bert_mlm.py:tiny   the stage's flags, the
                                                          config's docstring and presets
"""

import argparse
import difflib
import os
import socket
import subprocess
import sys
import textwrap
import time

STARTED = time.time()  # the start-up profile's origin (core/startup.py)

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
# Commands that print what the configs are (core/reference.py); nothing runs.
INFO = ('config', 'list')
# `launch.py plot --workdir RUN [RUN ...]`: runs' curves in one PNG (core/plots.py).
PLOT = 'plot'
ROOT = os.path.dirname(os.path.abspath(__file__))


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


def define_flags(stage: str, saved=None) -> tuple:
    """Defines the stage's absl flags (--config, --workdir, --dry_run where it has one);
    returns their holders (dry_run None for a stage without it). `saved`: evaluate's
    default config, the run's own (`--config.KEY=VALUE` then overrides its keys)."""
    from absl import flags
    from ml_collections import config_flags

    example, workdir_help = STAGES[stage]
    config_help = f'Config file and preset, e.g. {example}'
    if stage == 'evaluate':
        config_help += (
            "; default: the run's own WORKDIR/config.json. Only data and eval keys may "
            'differ from it (core/rundir.py EVALUATE_KEYS)'
        )
    if saved is None:
        config = config_flags.DEFINE_config_file('config', None, config_help)
    else:
        config = config_flags.DEFINE_config_dict('config', saved, config_help)
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
    return config, workdir, dry_run


def absl_main(stage: str, argv: list[str], saved=None) -> None:
    """Defines the stage's flags and runs it under absl (`saved`: see define_flags)."""
    from absl import app, flags

    from core import cli

    config, workdir, dry_run = define_flags(stage, saved)
    flags.mark_flags_as_required(['workdir'] if saved is not None else ['config', 'workdir'])

    def main(unused_argv):
        planned = dry_run is not None and dry_run.value
        cli.run_stage(
            lambda c, w: run_stage(stage, c, w, planned), config.value, workdir.value, stage
        )

    app.run(main, argv=[f'launch.py {stage}', *argv])


def stage_help(stage: str, parser: argparse.ArgumentParser, argv: list[str]) -> str:
    """`launch.py STAGE --help`: the stage's flags, the launcher's, and with --config the
    config file's docstring and presets (else the configs written for this stage)."""
    from absl import flags

    from core import cli, reference

    holders = [h for h in define_flags(stage) if h is not None]
    lines = [
        f'usage: launch.py {stage} '
        + ('[--config FILE[:PRESET]]' if stage == 'evaluate' else '--config FILE[:PRESET]')
        + ' --workdir DIR [--config.KEY=VALUE ...]'
        + (' [--dry_run]' if stage in DRY_RUN else ''),
        '',
        'stage flags:',
    ]
    for holder in holders:
        flag = flags.FLAGS[holder.name]
        lines += textwrap.wrap(
            flag.help, 100, initial_indent=f'  --{flag.name:<22}', subsequent_indent=' ' * 26
        )
    lines += [
        '  --config.KEY=VALUE      Override a config key (every key, value and meaning:',
        f'                          launch.py config {STAGES[stage][0]})',
    ]
    launcher = parser.format_help().split('options:', 1)[-1].rstrip().splitlines()
    lines += ['', 'launcher flags (one host or many):', *launcher[1:]]
    spec = cli.argv_value(argv, '--config')
    lines.append('')
    if spec:
        cli.check_config_overrides(['--config', spec])  # a missing file or preset: one line
        path, _, preset = spec.partition(':')
        module = reference.load_file(path)
        name = os.path.splitext(os.path.basename(path))[0]
        lines += [f'{path}:', '', (module.__doc__ or '(no docstring)').strip(), '']
        ours = os.path.realpath(path) == os.path.join(reference.ROOT, 'configs', f'{name}.py')
        listed = reference.presets(name) if ours and name in reference.PRESETS else []
        lines += ['presets:', *listed] if listed else []
    else:
        wanted = 'finetune' if stage == 'evaluate' else stage
        names = [n for n in reference.config_names() if reference.stage_of(n) == wanted]
        lines += [
            f'configs for {stage}: ' + ', '.join(f'configs/{n}.py' for n in names),
            'Add --config FILE[:PRESET] to --help for its docstring and presets; '
            '`launch.py list` lists every preset.',
        ]
    return '\n'.join(lines) + '\n'


def info(command: str, argv: list[str]) -> int:
    """`launch.py list`, and `launch.py config CONFIG[:PRESET]|RUN [--config.KEY=VALUE ...]`:
    the config resolved as a run resolves it (absl's config flag, overrides applied); a
    run's workdir gives its config.json, as `evaluate` reads it."""
    from absl import flags
    from ml_collections import config_flags

    from core import cli, reference, rundir

    if command == 'list':
        sys.stdout.write(reference.listing())
        return 0
    if not argv or argv[0].startswith('-'):
        sys.stderr.write(
            'usage: launch.py config CONFIG[:PRESET] | RUN_WORKDIR [--config.KEY=VALUE ...]\n'
        )
        return 2
    spec, overrides = argv[0], argv[1:]
    if os.path.isdir(spec):
        try:
            saved = rundir.run_config(spec)
        except cli.UserError as e:
            sys.stderr.write(f'error: {e}\n')
            return 1
        cli.check_config_overrides(overrides, saved)
        config = config_flags.DEFINE_config_dict('config', saved, "The run's config")
        spec = os.path.join(spec, 'config.json')
    else:
        overrides = ['--config', spec, *overrides]
        cli.check_config_overrides(overrides)
        config = config_flags.DEFINE_config_file('config', None, 'Config file and preset')
    try:
        flags.FLAGS(['launch.py config', *overrides])
    except flags.Error as e:
        sys.stderr.write(f'error: {e}\n')
        return 1
    sys.stdout.write(reference.explain(config.value, spec))
    return 0


def unknown_command(command: str) -> int:
    """A mistyped command: one line with the closest ones; exit code 2 (as argparse's)."""
    known = [*STAGES, *INFO, PLOT, *TOOLS]
    close = difflib.get_close_matches(command, known, n=2)
    hint = f'did you mean {" or ".join(close)}? ' if close else ''
    sys.stderr.write(
        f'error: launch.py has no command {command!r}; {hint}(commands: {", ".join(known)})\n'
    )
    return 2


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog='launch.py',
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,  # --help after a stage is the stage's (stage_help)
    )
    parser.add_argument('stage', metavar='{' + ','.join([*STAGES, *INFO, PLOT, *TOOLS]) + '}')
    parser.add_argument('-h', '--help', action='store_true', help='show this help and exit')
    parser.add_argument(
        '--local_processes', type=int, default=0, metavar='N', help='N processes on this machine'
    )
    parser.add_argument(
        '--coordinator_address', default=None, metavar='HOST:PORT', help="process 0's address"
    )
    parser.add_argument('--num_processes', type=int, default=None, metavar='N')
    parser.add_argument('--process_id', type=int, default=None, metavar='I', help='0 .. N-1')
    sys.path.insert(0, ROOT)
    if argv and argv[0] in TOOLS:  # their own flags (and --help)
        from interop import main as tools

        return tools.main(argv)
    if argv and argv[0] in INFO:
        return info(argv[0], argv[1:])
    if argv and argv[0] == PLOT:
        from core import plots

        return plots.main(argv[1:])
    if not argv or argv[0] in ('-h', '--help'):
        parser.print_help(sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    args, rest = parser.parse_known_args(argv)
    if args.stage not in STAGES:
        return unknown_command(args.stage)
    if args.help:
        sys.stdout.write(stage_help(args.stage, parser, rest))
        return 0
    if args.local_processes > 1:
        return _spawn_local(args.stage, args.local_processes, rest)
    if args.coordinator_address and (args.num_processes is None or args.process_id is None):
        parser.error('--coordinator_address needs --num_processes and --process_id')

    from core import cli, compile_cache, distributed, rundir, startup

    saved = None
    if args.stage == 'evaluate' and not cli.argv_value(rest, '--config'):
        try:  # no --config: the run's own
            saved = rundir.run_config(cli.argv_value(rest, '--workdir'))
        except cli.UserError as e:  # (before absl's logging is set up: one line)
            sys.stderr.write(f'error: {e}\n')
            return 1
    cli.check_config_overrides(rest, saved)
    compile_cache.enable()  # before anything compiles
    startup.PROCESS_STARTED = STARTED
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    absl_main(args.stage, rest, saved)
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
