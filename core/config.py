"""Config checks that run at start-up, before anything is compiled: the choices and
numeric ranges of every key, the batch layout, a ViT's grid; and `read_json`, for every
JSON file a run reads. What a start does with its workdir is core/rundir.py; what a run
takes from its `init_from` start is core/recipe.py."""

import dataclasses
import json
import math
from collections.abc import Callable

import ml_collections
from flax import traverse_util

from core import trackers
from core.errors import ConfigError, DataError

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
    'alpha': PROBABILITY,  # distill.alpha: the soft targets' weight
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
    'hidden_weight': NON_NEGATIVE,  # distill.hidden_weight: 0 = no hidden-state matching
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
    trackers.check(config)
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


def flatten(config: ml_collections.ConfigDict | dict) -> dict:
    """{'a.b': value} for every leaf of a config (or of its JSON)."""
    return traverse_util.flatten_dict(
        config if isinstance(config, dict) else config.to_dict(), sep='.'
    )


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


# The config keys set on this process's command line (--config.x=y), recorded by
# core/cli.py: an architecture key given there is the user's choice and is not adopted
# (a mismatch with the init_from checkpoint is then reported, not papered over).
COMMAND_LINE_KEYS: set[str] = set()


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
