"""Config checks that run at start-up, before anything is compiled, and the workdir:
what a start finds there (`check_workdir`, which writes nothing), and what it writes once
every check has passed (`start_run`, `record_resume`)."""

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable

import ml_collections
from absl import logging

from core.errors import ConfigError, DataError
from core.files import atomic_write

# Keys that may change between restarts of the same run without making it another run:
# its length (a finished run continues to a larger total_steps; the learning-rate schedule
# is a function of it, see schedule_change), how often things happen, and the device layout
# (a run may resume on another topology). Every other key is refused on resume.
RESTART_SAFE_KEYS = (
    'total_steps',
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

# Everything a run writes into its workdir, in one place. A new run moves these (and nothing
# else) into WORKDIR/previous/<time>/: the old run's with `overwrite`, or what a run left
# without its config.json. A user's own files stay where they are; so does a dry run's
# memory_plan.json (it describes the config it was given, not a run).
RUN_OUTPUTS = (
    'config.json',
    'config_history.jsonl',
    'vocab.txt',
    'labels.json',
    'metrics.jsonl',
    'summary.json',
    'tensorboard',
    'checkpoints',
    'evaluation.json',
    'predictions.jsonl',
    'import.json',
    'log.txt',
    'run.json',
    'curves.png',
)
PREVIOUS = 'previous'  # WORKDIR/previous/<time>/: the runs an overwrite moved aside
# What a new run derives from its data (vocab.txt, labels.json) is built here and moved into
# the workdir only when the start has passed every check.
STAGING = '.pretrax-starting'
HISTORY = 'config_history.jsonl'

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


@dataclasses.dataclass(frozen=True)
class Range:
    """What a numeric config value must be: `text` says it in an error message,
    `example` is a value that is."""

    text: str
    ok: Callable[[float], bool]
    example: str


PROBABILITY = Range('a probability in [0, 1)', lambda v: 0 <= v < 1, '0.1')
CHANCE = Range('a probability in [0, 1]', lambda v: 0 <= v <= 1, '0.5')
RATE = Range('finite and positive', lambda v: v > 0, '1e-3')
NON_NEGATIVE = Range('finite and >= 0', lambda v: v >= 0, '0')
# 0 is a run that leaves the parameters as they are (an eval-only sanity check).
LEARNING_RATE = Range('finite and >= 0', lambda v: v >= 0, '1e-3')
COUNT = Range('a positive integer', lambda v: v >= 1, '1')
AT_LEAST_ZERO = Range('an integer >= 0 (0: off or unused)', lambda v: v >= 0, '0')

# The range of every numeric config key, by its last name, so that one row serves each
# place the name occurs (model.dropout_rate and model.text.dropout_rate; a study's
# finetune.learning_rate). Checked at start-up, before anything is built or compiled;
# every float must also be finite (nan and inf are refused for any key). Relations
# between keys (hidden_size % num_heads, seq_len <= max_len, image_size % patch_size) are
# checked beside them: check_common and the stages' check_config.
RANGES = {
    # probabilities
    'dropout_rate': PROBABILITY,
    'attention_dropout_rate': PROBABILITY,
    'head_dropout': PROBABILITY,
    'mask_prob': PROBABILITY,
    'eval_fraction': PROBABILITY,
    'b1': PROBABILITY,  # Adam's moment decays
    'b2': PROBABILITY,
    'target_accuracy': CHANCE,
    # rates and scales
    'learning_rate': LEARNING_RATE,
    'probe_learning_rate': RATE,
    'temperature': RATE,
    'knn_temperature': RATE,
    'layer_norm_eps': RATE,
    'eps': RATE,
    'init_scale': RATE,
    'max_logit_scale': RATE,
    'layer_decay': RATE,
    'head_lr_scale': RATE,
    'end_learning_rate': NON_NEGATIVE,
    'weight_decay': NON_NEGATIVE,
    'grad_clip_norm': NON_NEGATIVE,  # 0: no clipping
    'trust_coefficient': NON_NEGATIVE,
    'probe_l2': NON_NEGATIVE,
    'peak_tflops': NON_NEGATIVE,
    'max_abs_logit_bias': NON_NEGATIVE,
    'watchdog_secs': NON_NEGATIVE,
    # sizes and counts
    'total_steps': COUNT,
    'batch_size': COUNT,
    'grad_accum_steps': COUNT,
    'log_every': COUNT,
    'eval_every': COUNT,
    'eval_steps': COUNT,
    'checkpoint_every': COUNT,
    'keep_checkpoints': COUNT,
    'hidden_size': COUNT,
    'num_layers': COUNT,
    'num_heads': COUNT,
    'mlp_dim': COUNT,
    'seq_len': COUNT,
    'max_predictions': COUNT,
    'embed_dim': COUNT,
    'proj_dim': COUNT,
    'proj_hidden': COUNT,
    'proj_layers': COUNT,
    'knn_k': COUNT,
    'max_pairs': COUNT,
    'warmup_steps': AT_LEAST_ZERO,
    'skip_nonfinite_steps': AT_LEAST_ZERO,
    'early_stopping_patience': AT_LEAST_ZERO,
    'freeze_layers': AT_LEAST_ZERO,
    'shards': AT_LEAST_ZERO,
    'prefetch': AT_LEAST_ZERO,
    'few_shot': AT_LEAST_ZERO,
    'probe_train_examples': AT_LEAST_ZERO,
    # 0 where the model has none (a text model's image_size); the stages require them
    'vocab_size': AT_LEAST_ZERO,
    'max_len': AT_LEAST_ZERO,
    'type_vocab_size': AT_LEAST_ZERO,
    'image_size': AT_LEAST_ZERO,
    'patch_size': AT_LEAST_ZERO,
}


def _numbers(value) -> list[float]:
    """The numbers in a config value (a tuple such as augment.blur_sigma holds several)."""
    values = value if isinstance(value, list | tuple) else [value]
    return [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]


def check_ranges(config: ml_collections.ConfigDict) -> None:
    """Every numeric key in its range (RANGES) and every float finite; raises ConfigError
    naming the key, the value, the range and a value that is in it."""
    for key, value in flatten(config).items():
        for number in _numbers(value):
            if isinstance(number, float) and not math.isfinite(number):
                raise ConfigError(
                    f'--config.{key}={number} is not a finite number; give a finite value'
                )
        allowed = RANGES.get(key.rpartition('.')[2])
        if allowed is not None and not all(allowed.ok(v) for v in _numbers(value)):
            raise ConfigError(
                f'--config.{key}={value!r} is out of range: expected {allowed.text} '
                f'(e.g. {allowed.example})'
            )


def get(config, dotted: str):
    """config['a.b.c'] for a dotted key."""
    value = config
    for part in dotted.split('.'):
        value = value[part]
    return value


def check_common(config: ml_collections.ConfigDict) -> None:
    """Checks the keys every stage shares, and the range of every numeric key
    (`check_ranges`); raises ConfigError naming the first problem."""
    check_ranges(config)
    for key, allowed in CHOICES.items():
        try:
            value = get(config, key)
        except KeyError:
            continue
        if value not in allowed:
            raise ConfigError(f'--config.{key}={value!r} is not one of {list(allowed)}')
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
    for name, section in (('model', m), ('model.text', m.get('text'))):
        if section and section.get('hidden_size') and section.hidden_size % section.num_heads:
            raise ConfigError(
                f'{name}.hidden_size {section.hidden_size} is not divisible by {name}.num_heads '
                f'{section.num_heads}; pick a head count that divides the width'
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


def _inside(path: str, parent: str) -> bool:
    return os.path.commonpath([path, parent]) == parent


@dataclasses.dataclass(frozen=True)
class WorkdirPlan:
    """What a start found in its workdir (`check_workdir`)."""

    workdir: str
    fresh: bool  # a new run: the workdir holds none, or overwrite moves it aside
    move_aside: tuple[str, ...]  # RUN_OUTPUTS present that go to previous/<time>/ at start
    changed: dict  # on resume, restart-safe keys that changed: {key: [old, new]}
    created: str | None  # the outermost directory this start creates (None: none)

    @property
    def staging(self) -> str:
        return os.path.join(self.workdir, STAGING)


def read_json(path: str):
    """A JSON file; one that cannot be read (cut short, not UTF-8) is a DataError naming it."""
    try:
        with open(path, encoding='utf-8-sig') as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise DataError(
            f'{path} cannot be read as JSON ({e}); the file is damaged or incomplete: restore '
            'or copy it again'
        ) from e


def _saved_config(path: str) -> dict:
    try:
        with open(path) as f:
            saved = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(
            f'{path} cannot be read ({e}); restore it from the config saved with each '
            'checkpoint (checkpoints/<step>/config/metadata), or give a new --workdir'
        ) from e
    if not (isinstance(saved, dict) and {'seed', 'total_steps', 'model'} <= set(saved)):
        raise ConfigError(
            f'{path} is not the config of a pretrax run (no seed, total_steps, model); '
            'give the run a --workdir of its own'
        )
    return saved


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> WorkdirPlan:
    """What this start will do with `workdir`; reads, writes nothing.

    A workdir holding a run of this config resumes it (restart-safe keys may differ); one
    of another config is refused, unless `overwrite`, which moves the old run aside once the
    new one has passed its checks (`start_run`). A new run's `init_from` must hold a
    checkpoint, and a text run's its vocabulary (`init_from_vocab`).
    """
    workdir = os.path.abspath(workdir)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f'--workdir {workdir} is a file; give a directory')
    existed = os.path.isdir(workdir)
    present = tuple(n for n in RUN_OUTPUTS if existed and os.path.lexists(f'{workdir}/{n}'))
    created = None
    if not existed:
        created = workdir
        while not os.path.exists(os.path.dirname(created)):
            created = os.path.dirname(created)
    path = os.path.join(workdir, 'config.json')
    changed = {}
    if os.path.isfile(path):
        old = flatten(_saved_config(path))
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
                '--workdir, restore the old values, or pass --config.overwrite=true to start '
                f'over (the old run is moved to {PREVIOUS}/). Only total_steps, the '
                'how-often keys and the layout may change on resume (RESTART_SAFE_KEYS)'
            )
        changed = {
            k: [old[k], new[k]]
            for k in sorted(old)
            if k in new and old[k] != new[k] and k != 'overwrite'
        }
    fresh = bool(config.overwrite) or not os.path.isfile(path)
    if not fresh:
        return WorkdirPlan(workdir, False, (), changed, created)
    if config.get('init_from'):
        from core.checkpoint import resolve_checkpoint  # (orbax: not loaded for every check)

        resolve_checkpoint(config.init_from)  # a path that holds no checkpoint: say so
        source = os.path.realpath(config.init_from)
        real = os.path.realpath(workdir)
        if present and _inside(source, real) and not _inside(source, f'{real}/{PREVIOUS}'):
            raise ConfigError(
                f'init_from {config.init_from} is the run in {workdir}, which overwrite '
                'moves aside; copy that run elsewhere and give --config.init_from its new path'
            )
    init_from_vocab(config)
    return WorkdirPlan(workdir, True, present, {}, created)


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """WORKDIR/config.json, written atomically. overwrite is saved false: the config is
    what reruns (resumes) this run."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.overwrite = False
    with atomic_write(os.path.join(workdir, 'config.json')) as f:
        f.write(config.to_json(indent=2))


def _previous_dir(workdir: str) -> str:
    stamp = time.strftime('%Y%m%d-%H%M%S', time.gmtime())
    target, n = os.path.join(workdir, PREVIOUS, stamp), 1
    while os.path.lexists(target):
        n += 1
        target = os.path.join(workdir, PREVIOUS, f'{stamp}-{n}')
    return target


def start_run(plan: WorkdirPlan, config: ml_collections.ConfigDict) -> None:
    """Process 0, once a new run has passed every check: the old run's outputs (if any)
    move to WORKDIR/previous/<time>/ (nothing is deleted), what the task derived from the
    data moves from the staging directory into the workdir, and config.json is written."""
    workdir = plan.workdir
    if plan.move_aside:
        target = _previous_dir(workdir)
        os.makedirs(target)
        for name in plan.move_aside:
            os.replace(os.path.join(workdir, name), os.path.join(target, name))
        logging.warning(
            'the earlier run in %s is now in %s (%s); nothing was deleted',
            workdir,
            target,
            ', '.join(plan.move_aside),
        )
    for name in os.listdir(plan.staging):
        os.replace(os.path.join(plan.staging, name), os.path.join(workdir, name))
    os.rmdir(plan.staging)
    write_config(workdir, config)


def abandon_start(plan: WorkdirPlan) -> None:
    """Process 0, after a new run failed a check: the workdir as it was found."""
    shutil.rmtree(plan.staging, ignore_errors=True)
    if plan.created is None:
        return
    path = plan.workdir
    while os.path.isdir(path) and not os.listdir(path):  # only what this start made, empty
        os.rmdir(path)
        if path == plan.created:
            break
        path = os.path.dirname(path)


def record_resume(plan: WorkdirPlan, config: ml_collections.ConfigDict, step: int) -> None:
    """Process 0, once a resumed run has restored `step` and continues: config.json takes
    the changed restart-safe values, and config_history.jsonl keeps one row per change."""
    if not plan.changed:
        return
    row = {'time': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()), 'step': int(step)}
    row['changed'] = plan.changed
    with open(os.path.join(plan.workdir, HISTORY), 'a') as f:
        f.write(json.dumps(row) + '\n')
    write_config(plan.workdir, config)
    shown = ', '.join(f'{k} {a!r} -> {b!r}' for k, (a, b) in plan.changed.items())
    logging.info('resumed at step %d with %s (%s)', step, shown, HISTORY)


def schedule_change(config: ml_collections.ConfigDict, old_total: int, step: int) -> str:
    """What a new total_steps does to the learning-rate schedule at the resumed `step`: the
    schedule is a function of total_steps, so its decay now ends at the new horizon and
    the rate at `step` is the new schedule's."""
    from core import optim  # (optax: not loaded for every config check)

    old = config.copy_and_resolve_references()
    with old.unlocked():
        old.total_steps = old_total
    before = float(optim.learning_rate_schedule(old)(step))
    after = float(optim.learning_rate_schedule(config)(step))
    return (
        f'total_steps {old_total} -> {config.total_steps}: the {config.optimizer.schedule} '
        f'learning-rate schedule now ends at step {config.total_steps} (was {old_total}); at '
        f'step {step} the learning rate goes from {before:.3g} to {after:.3g}'
    )


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
    return read_json(os.path.join(run, 'config.json'))


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
    theirs, ours = _encoder_kind(model), _encoder_kind(config.model)
    if theirs and ours and theirs != ours:
        two_towers = 'text' in source.get('model', {})
        hint = (
            ' (a CLIP run holds both: set --config.init_subtree=image_backbone or text_backbone)'
            if two_towers
            else ''
        )
        a = {'image': 'an image', 'text': 'a text'}
        raise ConfigError(
            f'init_from {config.init_from} is {a[theirs]} model (params/{subtree}), and this '
            f'run trains {a[ours]} model; give --config.init_from a run with {a[ours]} '
            f'encoder{hint}'
        )
    if theirs != ours:
        return []  # a bare checkpoint or an unknown model: the restore names any mismatch
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


def check_vit(m) -> None:
    """Image size, patch size and channels must make a whole grid of patches."""
    if m.image_size <= 0 or m.patch_size <= 0 or m.image_size % m.patch_size:
        raise ConfigError(
            f'model.image_size {m.image_size} must be a positive multiple of model.patch_size '
            f'{m.patch_size}'
        )
    if m.channels not in (1, 3):
        raise ConfigError(f'model.channels={m.channels}; expected 1 or 3')
    if m.pooling not in ('cls', 'gap'):
        raise ConfigError(f'model.pooling={m.pooling!r}; expected cls or gap')
