"""The workdir of a run: what a start finds there (`check_workdir`, which writes nothing),
and what it writes once every check has passed (`start_run`, `record_resume`); a start
that fails leaves the workdir as it found it (`abandon_start`)."""

import dataclasses
import json
import os
import shutil
import time

import ml_collections
from absl import logging

from core.config import flatten
from core.errors import ConfigError
from core.files import atomic_write
from core.recipe import init_from_vocab

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
    'loggers',
    'data.prefetch',
    'init_from',
    'early_stopping_patience',
    'eval.evaluate_split',  # what the evaluate stage scores; training never reads it
)

# The keys `launch.py evaluate` may set differently from the run's own config.json: the
# restart-safe keys above, the eval keys, the batch (the scores are sums over examples, so
# any batch gives the same), and where the examples to score come from and which of their
# fields to read. Every other key (the model, the vocabulary and lowercasing, seq_len, the
# training data and seed the labels and the validation split came from) is the trained
# model's own: a difference would score another model than the one trained, so it is
# refused (`evaluate_config`). docs/finetuning.md, Evaluate, lists these for users.
EVALUATE_KEYS = (
    *RESTART_SAFE_KEYS,
    'eval',
    'batch_size',
    'grad_accum_steps',
    'data.eval_files',
    'data.eval_split',
    'data.test_files',
    'data.test_split',
    'data.data_dir',
    'data.header',
    'data.text_field',
    'data.text_pair_field',
    'data.label_field',
    'data.image_field',
    'data.tokens_field',
    'data.tags_field',
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
    'trackers.json',
    'teacher.json',
    'teacher_logits.npz',
)


PREVIOUS = 'previous'  # WORKDIR/previous/<time>/: the runs an overwrite moved aside


# What a new run derives from its data (vocab.txt, labels.json) is built here and moved into
# the workdir only when the start has passed every check.
STAGING = '.pretrax-starting'


HISTORY = 'config_history.jsonl'


def _restart_safe(key: str, keys: tuple[str, ...]) -> bool:
    return any(key == k or key.startswith(k + '.') for k in keys)


def _changed_outside(old: dict, new: dict, allowed: tuple[str, ...]) -> list[str]:
    """The flattened keys of `old` outside `allowed` that `new` changes (sorted), then those
    `new` lacks (sorted). A key `old` lacks came with a newer pretrax, whose default keeps
    the behaviour of before: not a difference."""
    outside = [k for k in sorted(old) if not _restart_safe(k, allowed)]
    return [k for k in outside if k in new and old[k] != new[k]] + [
        k for k in outside if k not in new
    ]


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


def starts_anew(config: ml_collections.ConfigDict, workdir: str) -> bool:
    """Whether a start in `workdir` is a new run: it holds no config.json, or `overwrite`
    moves the run there aside; else it resumes (or evaluates) the run it holds."""
    return bool(config.get('overwrite')) or not os.path.isfile(os.path.join(workdir, 'config.json'))


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
        differing = _changed_outside(old, new, RESTART_SAFE_KEYS)
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
    fresh = starts_anew(config, workdir)
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


def run_config(workdir: str | None) -> ml_collections.ConfigDict:
    """The config the run in `workdir` was trained with (its config.json)."""
    if not workdir:
        raise ConfigError('no --workdir: give the --workdir of the finetune run to evaluate')
    path = os.path.join(workdir, 'config.json')
    if not os.path.isfile(path):
        raise ConfigError(
            f'{workdir} holds no run (no config.json); give the --workdir of a finetune run'
        )
    return ml_collections.ConfigDict(_saved_config(path))


def evaluate_changes(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> dict:
    """{key: (the run's value, config's)} for each key outside EVALUATE_KEYS that differs.
    A key the run's config lacks came with a newer pretrax: not a difference."""
    old, new = flatten(json.loads(saved.to_json())), flatten(json.loads(config.to_json()))
    return {
        k: (old[k], new.get(k, '(none)')) for k in sorted(_changed_outside(old, new, EVALUATE_KEYS))
    }


def evaluate_config(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
    """Refuses a config for `evaluate` that would score another model than the run's."""
    changes = evaluate_changes(saved, config)
    if changes:
        shown = ', '.join(f'{k}: {old!r} -> {new!r}' for k, (old, new) in changes.items())
        raise ConfigError(
            f'evaluate scores the run as it was trained, and this config differs from its '
            f'config.json in {shown}. Drop those overrides (`launch.py evaluate --workdir RUN` '
            "reads the run's own config); only data and eval keys may change (where the "
            'examples to score come from, eval.*, eval_steps, batch_size: core/rundir.py '
            'EVALUATE_KEYS). To score another model, fine-tune it in a new --workdir'
        )


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
