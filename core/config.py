"""Config checks that run at start-up, before anything is compiled, and the workdir's
`config.json` (written once, compared on every restart)."""

import json
import os
import shutil

import ml_collections

from core.errors import ConfigError

# Keys that may change between restarts of the same run without making it another run:
# how often things happen, and the device layout (a run may resume on another topology).
RESTART_SAFE_KEYS = (
    'log_every',
    'eval_every',
    'eval_steps',
    'checkpoint_every',
    'keep_checkpoints',
    'watchdog_secs',
    'skip_nonfinite_steps',
    'overwrite',
    'parallelism',
    'mesh',
    'peak_tflops',
    'data.prefetch',
    'init_from',
    'early_stopping_patience',
    'eval.evaluate_split',  # what the evaluate stage scores; training never reads it
)

CHOICES = {
    'precision': ('float32', 'bfloat16'),
    'parallelism': ('jit', 'pmap'),
    'optimizer.name': ('adamw', 'lamb', 'lars'),
    'optimizer.schedule': ('linear', 'cosine', 'constant'),
    'model.layer_norm': ('post', 'pre'),
    'model.activation': ('gelu', 'gelu_tanh', 'relu'),
    'model.remat': ('none', 'dots', 'full'),
    'model.attention_impl': ('auto', 'xla', 'cudnn'),
    'model.text.attention_impl': ('auto', 'xla', 'cudnn'),
    'task_type': ('classification', 'regression'),
    'eval.evaluate_split': ('test', 'validation'),
}

POSITIVE = (
    'total_steps',
    'batch_size',
    'log_every',
    'eval_every',
    'eval_steps',
    'checkpoint_every',
    'keep_checkpoints',
    'grad_accum_steps',
)


def get(config, dotted: str):
    """config['a.b.c'] for a dotted key."""
    value = config
    for part in dotted.split('.'):
        value = value[part]
    return value


def check_common(config: ml_collections.ConfigDict) -> None:
    """Checks the keys every stage shares; raises ConfigError naming the first problem."""
    for key, allowed in CHOICES.items():
        try:
            value = get(config, key)
        except KeyError:
            continue
        if value not in allowed:
            raise ConfigError(f'--config.{key}={value!r} is not one of {list(allowed)}')
    for key in POSITIVE:
        if key in config and get(config, key) <= 0:
            raise ConfigError(f'--config.{key}={get(config, key)} must be positive')
    mesh = config.get('mesh')
    if mesh is not None and config.get('parallelism') == 'pmap' and mesh.get('dcn_fsdp', 1) != 1:
        raise ConfigError(
            f'--config.mesh.dcn_fsdp={mesh.dcn_fsdp}: parallelism=pmap is data parallel only; '
            'set mesh.dcn_fsdp=1, or use parallelism=jit for fsdp across slices'
        )
    data = config.get('data') or {}
    if data.get('test_files') and data.get('test_split'):
        raise ConfigError(
            f'--config.data.test_files={data.test_files!r} and --config.data.test_split='
            f'{data.test_split!r} both name a test split; give one (test_files for local '
            'files, test_split for a TFDS dataset)'
        )
    if config.warmup_steps < 0:
        raise ConfigError(f'--config.warmup_steps={config.warmup_steps} must be >= 0')
    if config.learning_rate < 0:
        raise ConfigError(f'--config.learning_rate={config.learning_rate} must be >= 0')
    if config.batch_size % config.grad_accum_steps:
        raise ConfigError(
            f'batch_size {config.batch_size} is not divisible by grad_accum_steps '
            f'{config.grad_accum_steps}; each micro-batch must be a whole number of examples'
        )
    m = config.model
    scanned = m.get('scan_layers') or m.get('text', {}).get('scan_layers')
    optimizer = config.get('optimizer', {}).get('name')
    if scanned and optimizer in ('lamb', 'lars'):
        raise ConfigError(
            f'optimizer.name={optimizer} takes a trust ratio per parameter array, '
            'and with model.scan_layers=true one array holds every layer (the ratio would be '
            'shared across layers); set --config.model.scan_layers=false'
        )
    if m.hidden_size % m.num_heads:
        raise ConfigError(
            f'model.hidden_size {m.hidden_size} is not divisible by model.num_heads '
            f'{m.num_heads}; pick a head count that divides the width'
        )


def check_batch_layout(config, num_devices: int, batch_shards: int, process_count: int) -> None:
    """The global batch must split evenly over the batch-sharded devices and the hosts."""
    per_micro = config.batch_size // config.grad_accum_steps
    if per_micro % batch_shards:
        raise ConfigError(
            f'batch_size {config.batch_size} (micro-batch {per_micro}) is not divisible by '
            f'{batch_shards}, the devices the batch is split over (mesh data x fsdp of '
            f'{num_devices} devices); use a multiple of {batch_shards}'
        )
    if config.batch_size % process_count:
        raise ConfigError(
            f'batch_size {config.batch_size} is not divisible by {process_count} processes'
        )


def flatten(config: ml_collections.ConfigDict | dict, prefix: str = '') -> dict:
    items = config.items() if isinstance(config, dict) else config.to_dict().items()
    flat = {}
    for k, v in items:
        if isinstance(v, dict):
            flat.update(flatten(v, f'{prefix}{k}.'))
        else:
            flat[f'{prefix}{k}'] = v
    return flat


def _restart_safe(key: str) -> bool:
    return any(key == k or key.startswith(k + '.') for k in RESTART_SAFE_KEYS)


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str, is_main: bool) -> None:
    """Creates the workdir, or checks that it holds a run of this same config.

    A workdir with a different config is refused (a resume must continue the same run);
    `overwrite=True` clears it and starts over. A new text run's `init_from` vocabulary is
    checked first (`init_from_vocab`), so a refused start leaves nothing behind.
    """
    if not os.path.isfile(os.path.join(workdir, 'vocab.txt')):
        init_from_vocab(config)
    path = os.path.join(workdir, 'config.json')
    if os.path.isfile(path):
        with open(path) as f:
            old = flatten(json.load(f))
        new = flatten(json.loads(config.to_json()))
        # A key the old config lacks came with a newer pretrax, whose default keeps the
        # behaviour of before: not a difference.
        differing = sorted(
            k for k in old if not _restart_safe(k) and k in new and old[k] != new[k]
        ) + sorted(k for k in old if k not in new and not _restart_safe(k))
        if differing and not config.overwrite:
            shown = ', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in differing[:8])
            raise ConfigError(
                f'workdir {workdir} holds a run with a different config ({shown}). Use a new '
                '--workdir, restore the old values, or pass --config.overwrite=true to delete '
                'that run and start over'
            )
        if config.overwrite and is_main:
            for name in os.listdir(workdir):
                target = os.path.join(workdir, name)
                if os.path.isdir(target):
                    shutil.rmtree(target)
                else:
                    os.remove(target)
    if is_main:
        os.makedirs(workdir, exist_ok=True)
        tmp = path + '.tmp'
        with open(tmp, 'w') as f:
            f.write(config.to_json(indent=2))
        os.replace(tmp, path)


# Model keys that fix the shapes or the function of an encoder's parameters. A run that
# starts from another (`init_from`) takes them from that run's config.json, so a fine-tune
# of an imported MiniLM or a 2-layer MLM run needs no architecture flags. Not among them:
# image_size (a ViT restores at another resolution, its position table resized), a text
# model's pooling, dropout and the other keys a fine-tuning run chooses for itself.
ARCHITECTURE_KEYS = (
    'vocab_size',
    'hidden_size',
    'num_layers',
    'num_heads',
    'mlp_dim',
    'max_len',
    'type_vocab_size',
    'patch_size',
    'channels',
    'activation',
    'layer_norm',
    'layer_norm_eps',
    'pooler',
)


# The config keys set on this process's command line (--config.x=y), recorded by
# core/cli.py: an architecture key given there is the user's choice and is not adopted
# (a mismatch with the init_from checkpoint is then reported, not papered over).
COMMAND_LINE_KEYS: set[str] = set()


def run_directory(path: str) -> str | None:
    """The workdir of the run that `path` names (an `init_from`): the workdir itself, its
    checkpoints/ directory or one checkpoints/<step> directory, as an absolute path; None
    when no config.json marks one (a bare checkpoint). Where the run's config.json and
    vocab.txt are found, whichever of the three forms `init_from` gives."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    candidates = [path]
    if name == 'checkpoints':
        candidates.append(parent)
    elif name.isdigit() and os.path.basename(parent) == 'checkpoints':
        candidates.append(os.path.dirname(parent))
    for candidate in candidates:
        if os.path.isfile(os.path.join(candidate, 'config.json')):
            return candidate
    return None


def saved_run_config(path: str) -> dict:
    """The config.json of the run whose workdir, checkpoints/ or checkpoints/<step> is
    `path`; {} when there is none (a bare checkpoint)."""
    run = run_directory(path)
    if run is None:
        return {}
    with open(os.path.join(run, 'config.json')) as f:
        return json.load(f)


def _tokens(vocab_file: str) -> list[str]:
    with open(vocab_file, encoding='utf-8') as f:
        return f.read().splitlines()


def init_from_vocab(config: ml_collections.ConfigDict) -> str | None:
    """The vocab.txt of the `init_from` run of a text config (one with `data.vocab_file`),
    from any form `run_directory` reads; None without one. The restored token embeddings
    are rows of that vocabulary, so this refuses (ConfigError) a text run whose init_from
    has no vocabulary unless `data.vocab_file` gives it, and a differing `data.vocab_file`.
    An init_from that holds no checkpoint raises CheckpointError."""
    if not config.get('init_from') or 'vocab_file' not in config.get('data', {}):
        return None
    from core.checkpoint import resolve_checkpoint  # (orbax: not loaded for every config check)

    resolve_checkpoint(config.init_from)  # a path that holds no checkpoint: say so
    run = run_directory(config.init_from)
    vocab = os.path.join(run, 'vocab.txt') if run else None
    given = config.data.vocab_file
    if not (vocab and os.path.isfile(vocab)):
        if given:
            return None  # the user's word for the vocabulary of a run that does not keep one
        where = f'no {vocab}' if run else 'a bare checkpoint, no run directory with config.json'
        raise ConfigError(
            f'init_from {config.init_from} has no vocabulary ({where}), and the token '
            'embeddings it holds are read by token id: give the vocabulary that run was '
            'trained with, --config.data.vocab_file=PATH/vocab.txt'
        )
    if given and os.path.isfile(given) and _tokens(given) != _tokens(vocab):
        raise ConfigError(
            f'--config.data.vocab_file={given} differs from {vocab}, the vocabulary of the '
            f'init_from run {config.init_from}, whose token embeddings this run restores; '
            "drop --config.data.vocab_file to use that run's"
        )
    return vocab


def _encoder_kind(model) -> str | None:
    if model.get('patch_size'):
        return 'image'
    return 'text' if model.get('vocab_size') else None


def adopt_architecture(
    config: ml_collections.ConfigDict, source: dict, subtree: str = 'backbone'
) -> list[str]:
    """Sets config.model's ARCHITECTURE_KEYS (and data.lowercase, which the vocabulary goes
    with) to those of `source`, a saved run config whose params/<subtree> this run starts
    from; returns the changes as 'key: old -> new'. A CLIP run's text tower keeps its
    architecture under model.text. Keys given on the command line are left as given."""
    model = source.get('model', {})
    if subtree == 'text_backbone':
        model = model.get('text', {})
    if _encoder_kind(model) != _encoder_kind(config.model):
        return []  # e.g. a text run given to an image task: the restore names the mismatch
    keys = ARCHITECTURE_KEYS
    if _encoder_kind(model) == 'image':
        keys += ('pooling',)  # a ViT's cls token exists only with pooling=cls
    pairs = [(f'model.{k}', model[k]) for k in keys if k in model]
    lowercase = source.get('data', {}).get('lowercase')
    if lowercase is not None and subtree != 'image_backbone':
        pairs.append(('data.lowercase', lowercase))
    changed = []
    for dotted, value in pairs:
        parent_key, _, key = dotted.rpartition('.')
        parent = get(config, parent_key)
        if key not in parent or parent[key] == value or value is None:
            continue
        if dotted in COMMAND_LINE_KEYS:
            continue  # given explicitly: kept, and the restore names any mismatch
        changed.append(f'{dotted}: {parent[key]!r} -> {value!r}')
        parent[key] = type(parent[key])(value)
    return changed
