"""Command line of the Hugging Face tools (launch.py dispatches here; one process each):

  python launch.py import-hf --from DIR_OR_PACKAGE --to WORKDIR [--overwrite]
  python launch.py export-hf --from WORKDIR --to DIR [--subtree backbone] [--step N]
  python launch.py embed --workdir WORKDIR --input FILE --output OUT.npy
      [--features last_hidden|pooled|mean] [--seq_len N] [--batch_size N]

Nothing is downloaded: --from is a local directory, an installed package or the id of a
model already in the local Hugging Face cache (org/name; `hf download org/name` puts it
there).
"""

import argparse
import os
import sys

from absl import flags, logging

from core import cli

COMMANDS = ('import-hf', 'export-hf', 'embed')


def _parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f'launch.py {command}',
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if command == 'import-hf':
        p.add_argument(
            '--from', dest='source', required=True, help='HF model dir, package or cached org/name'
        )
        p.add_argument('--to', dest='workdir', required=True, help='the pretrax workdir to write')
        p.add_argument('--overwrite', action='store_true', help='replace a non-empty --to')
    elif command == 'export-hf':
        p.add_argument('--from', dest='workdir', required=True, help='a pretrax workdir')
        p.add_argument('--to', dest='out', required=True, help='the HF model dir to write')
        p.add_argument('--subtree', default='backbone', help='image_backbone / text_backbone: CLIP')
        p.add_argument('--step', type=int, default=None, help='a checkpoint step (default latest)')
        p.add_argument('--overwrite', action='store_true', help='replace a non-empty --to')
    else:
        p.add_argument('--workdir', required=True)
        p.add_argument(
            '--input', required=True, help='text file (one example a line), image folder or .npz'
        )
        p.add_argument('--output', required=True, help='the .npy file to write (this exact path)')
        p.add_argument('--features', default='pooled', choices=('last_hidden', 'pooled', 'mean'))
        p.add_argument('--seq_len', type=int, default=None, help='text: default data.seq_len')
        p.add_argument('--batch_size', type=int, default=64)
        p.add_argument('--subtree', default='backbone', help='image_backbone / text_backbone: CLIP')
        p.add_argument('--step', type=int, default=None, help='a checkpoint step (default latest)')
    return p


def run(command: str, args: argparse.Namespace) -> None:
    if command == 'import-hf':
        from interop import hf

        info = hf.import_hf(args.source, args.workdir, args.overwrite)
        heads, source = '', info['source']
        if info['requested'] != info['source']:  # a package or a cached model id
            source = f'{info["requested"]} ({source})'
        if info['initialised']:
            heads = f'; initialised at import: {", ".join(info["initialised"])}'
        print(
            f'imported {"/".join(info["architectures"]) or info["model_type"]} from '
            f'{source} ({info["num_params"]:,} params{heads}) into {args.workdir}\n'
            f'Start a stage from it with --config.init_from={args.workdir} (the run takes its '
            'architecture and vocabulary from there; a fine-tuning, its learning rate, warmup '
            f'and pooling{" (" + info["pooling"] + ")" if info["pooling"] else ""}: '
            'docs/recipe.md)'
        )
    elif command == 'export-hf':
        from interop import hf

        config = hf.export_hf(args.workdir, args.out, args.subtree, args.step, args.overwrite)
        print(f'exported {config["architectures"][0]} to {os.path.abspath(args.out)}')
    else:
        from interop import embed

        result = embed.embed(
            args.workdir,
            args.input,
            args.output,
            args.features,
            args.seq_len,
            args.batch_size,
            args.subtree,
            args.step,
        )
        print(f'{args.features} features {result.shape} written to {os.path.abspath(args.output)}')


def main(argv: list[str]) -> int:
    """argv: [command, flags...]. Returns the exit code (1: an error naming its fix)."""
    if not argv or argv[0] not in COMMANDS:
        sys.stderr.write(f'usage: python -m interop.main {{{",".join(COMMANDS)}}} ...\n')
        return 2
    command = argv[0]
    args = _parser(command).parse_args(argv[1:])
    flags.FLAGS.mark_as_parsed()  # absl logging without absl flags: these tools use argparse
    logging.use_absl_handler()
    cli.setup_logging()
    try:
        run(command, args)
    except KeyboardInterrupt:
        return cli.interrupted(f'{command} stopped; nothing it was writing was left half-done')
    except Exception as e:  # a user's error exits 1 with its message; a bug re-raises
        return cli.fail_with(e)
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
