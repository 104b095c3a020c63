"""Fine-tuning defaults that follow the starting point.

A size preset's optimizer values are for training that size from scratch: the `tiny`
preset's learning rate 1e-3 suits a 2-layer, 128-wide encoder initialised at random. An
encoder adopted through `init_from` is pretrained, and often larger (an imported MiniLM:
384 wide, 6 layers, 22.7M parameters), and at that rate a pretrained encoder is destroyed
in the first steps: the run ends predicting one class. So a text fine-tuning run with
`init_from` takes these keys from RECIPES, by the hidden size of the encoder it adopted,
instead of from its preset:

  learning_rate            the recipe's rate for that encoder size
  warmup_steps             WARMUP_FRACTION of total_steps (rounded up)
  optimizer.schedule       linear decay to
  optimizer.end_learning_rate   0 (BERT's)
  transfer.head_lr_scale   the new head's rate, times the encoder's
  model.pooling            what the start was trained with: a sentence-transformers
                           checkpoint's pooling (import.json, read from its 1_Pooling
                           config at import), a pretrax run's model.pooling, BERT's pooler
                           (Dense + tanh on [CLS]) for a checkpoint that has one

An image fine-tune keeps its preset's values (the tiny one measured from SimCLR on the
digits, the imagenet one a layer-decay fine-tuning recipe): no image row is measured yet.

A linear probe (transfer.freeze_backbone) trains only a new head, from scratch: it keeps
its optimizer keys. A key given on the command line always wins, and
`--config.transfer.start_defaults=none` keeps the config file's values for all of them.
The run records what it took in `transfer.start_defaults` (config.json) and the log.
docs/recipe.md has the table and the measurements that chose it.
"""

import dataclasses
import math
import os

import ml_collections
from absl import logging

from core import config as config_lib
from core.config import read_json
from core.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Recipe:
    up_to_hidden: float  # the largest encoder width this row serves
    learning_rate: float
    head_lr_scale: float
    encoders: str  # what it is for


RECIPES = (
    Recipe(256, 1e-3, 1.0, 'pretrax tiny (128), BERT-tiny / mini (128 / 256)'),
    Recipe(512, 1e-4, 10.0, 'MiniLM (384), BERT-small / medium (512)'),
    Recipe(768, 5e-5, 10.0, 'BERT-base (768)'),
    Recipe(math.inf, 2e-5, 10.0, 'BERT-large (1024) and wider'),
)
WARMUP_FRACTION = 0.1
OFF = 'none'


def warmup_steps(total_steps: int) -> int:
    """WARMUP_FRACTION of the steps, rounded up, so at least one (the first step, at rate
    0, leaves the start as it was), and fewer than all (a 1-step run: none)."""
    return max(0, min(math.ceil(WARMUP_FRACTION * total_steps), total_steps - 1))


def recipe_for(hidden_size: int) -> Recipe:
    return next(r for r in RECIPES if hidden_size <= r.up_to_hidden)


# sentence-transformers' Pooling modes that pretrax's model.pooling has.
_POOLING_MODES = {'pooling_mode_mean_tokens': 'mean', 'pooling_mode_cls_token': 'cls'}


def sentence_pooling(directory: str) -> str | None:
    """'mean' or 'cls': the pooling a sentence-transformers checkpoint in `directory` was
    trained with (modules.json names its Pooling module's folder, whose config.json sets
    one pooling_mode_*); None for a plain transformers checkpoint, or a mode pretrax has
    not (max, weighted mean: logged, and fine-tuning keeps its config's pooling)."""
    modules = os.path.join(directory, 'modules.json')
    folders = []
    if os.path.isfile(modules):
        folders = [m.get('path', '') for m in read_json(modules) if 'Pooling' in m.get('type', '')]
    for folder in folders:
        where = os.path.join(directory, folder, 'config.json')
        if not os.path.isfile(where):
            continue
        modes = [k for k, on in read_json(where).items() if k.startswith('pooling_mode_') and on]
        if len(modes) == 1 and modes[0] in _POOLING_MODES:
            return _POOLING_MODES[modes[0]]
        logging.warning(
            "%s pools by %s, which pretrax has not; fine-tuning keeps its config's model.pooling",
            where,
            ' + '.join(modes) or 'nothing',
        )
    return None


def source_pooling(saved: dict, run_dir: str | None) -> str | None:
    """How the start pooled a text sequence: its run's model.pooling, else import.json's
    `pooling` (a sentence-transformers checkpoint's; an import written before import.json
    had the key: read from the source it names, when still there), else its own start's
    (a run continued from another, followed through `init_from`), else 'pooler' for a
    checkpoint with BERT's pooler; None when the start says nothing (a pretrax MLM run)."""
    model = saved.get('model', {})
    if model.get('pooling'):
        return model['pooling']
    info = {}
    if run_dir and os.path.isfile(os.path.join(run_dir, 'import.json')):
        info = read_json(os.path.join(run_dir, 'import.json'))
    pooling = info.get('pooling')
    if 'pooling' not in info and os.path.isdir(info.get('source', '')):
        pooling = sentence_pooling(info['source'])
    if pooling:
        return pooling
    start = run_directory(saved['init_from']) if saved.get('init_from') else None
    if start and os.path.abspath(start) != os.path.abspath(run_dir or ''):
        # A continued pretraining (configs/dapt.py from an imported MiniLM) pools as its
        # start did: its own MLM config has no pooling to say.
        pooling = source_pooling(read_json(os.path.join(start, 'config.json')), start)
        if pooling:
            return pooling
    return 'pooler' if model.get('pooler') else None


def apply(
    config: ml_collections.ConfigDict, saved: dict, run_dir: str | None, given: set[str]
) -> list[str]:
    """Sets the keys of the module docstring on a fine-tuning `config` with init_from (the
    architecture already adopted from `saved`, the start's config.json in `run_dir`),
    except those in `given` (the user's); records them in transfer.start_defaults and
    returns them as 'key: old -> new'. Does nothing without init_from, for a config that
    has no transfer block (pretraining), or when start_defaults is already set (a run the
    study configured, or `none`)."""
    t = config.get('transfer')
    if not config.get('init_from') or t is None or t.get('start_defaults', OFF):
        return []
    if config.model.get('patch_size'):  # an image encoder: the preset's values
        t.start_defaults = 'nothing (start: an image encoder)'
        return []
    if config.get('init_subtree') == 'text_backbone':  # a CLIP run's text tower: model.text
        saved = {**saved, 'model': saved.get('model', {}).get('text', {})}
    recipe = recipe_for(config.model.hidden_size)
    values = {}
    if not t.freeze_backbone:
        values = {
            'learning_rate': recipe.learning_rate,
            'warmup_steps': warmup_steps(config.total_steps),
            'optimizer.schedule': 'linear',
            'optimizer.end_learning_rate': 0.0,
            'transfer.head_lr_scale': recipe.head_lr_scale,
        }
    pooling = source_pooling(saved, run_dir)
    if pooling and 'pooling' in config.model:
        values['model.pooling'] = pooling
    changes, taken = [], []
    for dotted, value in values.items():
        if dotted in given:
            continue
        parent_key, _, key = dotted.rpartition('.')
        parent = config_lib.get(config, parent_key) if parent_key else config
        if key not in parent:
            continue
        taken.append(f'{dotted}={value}')
        if parent[key] != value:
            changes.append(f'{dotted}: {parent[key]!r} -> {value!r}')
            parent[key] = type(parent[key])(value)
    why = 'a linear probe' if t.freeze_backbone else f'{config.model.hidden_size} wide'
    t.start_defaults = f'{", ".join(taken) or "nothing"} (start: {why})'
    return changes


# --- What a run takes from its start: the architecture and the vocabulary ----------------

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
        if config.get('teacher'):  # a distillation student reads its teacher's token ids
            raise ConfigError(
                f'init_from {config.init_from} was trained with the vocabulary {vocab}, and '
                f'the teacher {config.teacher} with another ({given}); a student reads its '
                "teacher's token ids: start it from a run of the teacher's vocabulary (e.g. "
                f'one trained with --config.data.vocab_file={given}), or from scratch'
            )
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
        parent = config_lib.get(config, parent_key)
        if key not in parent or parent[key] == value or value is None:
            continue
        if dotted in config_lib.COMMAND_LINE_KEYS:
            continue  # given explicitly: kept, and the restore names any mismatch
        changed.append(f'{dotted}: {parent[key]!r} -> {value!r}')
        parent[key] = type(parent[key])(value)
    return changed
