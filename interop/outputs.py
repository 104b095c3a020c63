"""What `import-hf` and `export-hf` write into --to, and only that: a --to apart from
--from, holding nothing but an earlier output of the same tool before --overwrite replaces
it, and no half-written output after a failure."""

import contextlib
import os
import shutil

from core.errors import ConfigError
from interop import workdir as wd
from interop.hf_files import WEIGHTS

# What each tool writes into --to: an overwrite replaces these and nothing else, so a --to
# that holds anything more (a user's files, a training run) is refused.
IMPORT_OUTPUTS = ('config.json', 'checkpoints', 'vocab.txt', wd.IMPORT_INFO)


EXPORT_OUTPUTS = (
    'config.json',
    WEIGHTS,
    'vocab.txt',
    'tokenizer.json',
    'tokenizer_config.json',
    'special_tokens_map.json',
    'preprocessor_config.json',
)


def _inside(path: str, parent: str) -> bool:
    return path != parent and os.path.commonpath([path, parent]) == parent


def check_apart(source: str, target: str) -> None:
    """Refuses a --to that is --from, inside it or contains it (real paths: symlinks
    resolved), before anything is written."""
    a, b = os.path.realpath(source), os.path.realpath(target)
    relation = (
        'is' if a == b else 'is inside' if _inside(b, a) else 'contains' if _inside(a, b) else ''
    )
    if relation:
        raise ConfigError(
            f'--to {target} {relation} --from {source}; give --to a directory of its own, '
            'outside --from'
        )


def check_target(target: str, overwrite: bool, outputs: tuple, tool: str) -> None:
    """A --to that exists and is not empty must be an earlier output of `tool` (only files
    it writes; an import also its import.json and checkpoint 0), and --overwrite given."""
    if not (os.path.isdir(target) and os.listdir(target)):
        if os.path.exists(target) and not os.path.isdir(target):
            raise ConfigError(f'--to {target} is a file; give --to a directory')
        return
    if not overwrite:
        raise ConfigError(
            f'{target} exists and is not empty; give a new --to, or --overwrite to replace it'
        )
    names = set(os.listdir(target))
    foreign = sorted(names - set(outputs))
    checkpoints = os.path.join(target, 'checkpoints')
    if 'checkpoints' in outputs and os.path.isdir(checkpoints):
        foreign += [f'checkpoints/{n}' for n in sorted(os.listdir(checkpoints)) if n != '0']
    if 'checkpoints' in outputs and names - {wd.IMPORT_INFO} and wd.IMPORT_INFO not in names:
        foreign.append(f'no {wd.IMPORT_INFO}: a run import-hf did not write')
    if foreign:
        raise ConfigError(
            f'--to {target} holds what {tool} did not write ({", ".join(foreign[:8])}); '
            f'--overwrite replaces only an earlier {tool} output. Give a new --to'
        )


def _remove_outputs(target: str, outputs: tuple) -> None:
    """Removes what this tool writes in `target` (check_target vetted it: nothing else)."""
    for name in outputs:
        path = os.path.join(target, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


@contextlib.contextmanager
def _writing(target: str, outputs: tuple):
    """Replaces the earlier output (when there is one) once every check has passed; an
    import or export that fails midway then leaves no half-written output: what it wrote is
    removed, and `target` too when it made it (nothing else is there)."""
    existed = os.path.isdir(target)
    _remove_outputs(target, outputs)  # an earlier output, when --overwrite allowed it
    os.makedirs(target, exist_ok=True)
    try:
        yield
    except BaseException:
        _remove_outputs(target, outputs)
        if not existed:
            os.rmdir(target)
        raise
