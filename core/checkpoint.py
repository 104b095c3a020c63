"""Checkpoints: Orbax CheckpointManager holding the train state, the Grain iterator state
and the config of each saved step.

Orbax writes every step into a temporary directory and renames it when complete, so a
crash mid-save leaves the previous step untouched and the half-written one is ignored
(and cleaned up) on the next start. Restores go into an abstract target carrying the
current mesh's shardings, so a checkpoint saved on one mesh restores on any other. A step
that cannot be read (a full disk, a crashed node) is moved aside as <step>.corrupt and
the run resumes from the newest step that reads (`Checkpointer.restore_latest`).
"""

import dataclasses
import json
import logging as std_logging
import os
import re
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from core.errors import CheckpointError, StateLayoutError
from models.encoder import match_layout

# The data iterator: each process writes its own file, process_<i>-of-<n>.json, holding
# the states of the data shards it reads (data/shards.py). A restore gathers every file of
# the step, so the shards find their state whichever process reads them now.
_PROCESS_FILE = re.compile(r'process_(\d+)-of-(\d+)\.json$')


class DataIteratorHandler:
    """Orbax CheckpointHandler for the training data iterator (Grain), topology-free."""

    def save(self, directory, item=None, args=None):
        item = item if item is not None else args.item
        name = f'process_{jax.process_index()}-of-{jax.process_count()}.json'
        (directory / name).write_text(json.dumps(item.get_state(), indent=1))

    def restore(self, directory, item=None, args=None):
        item = item if item is not None else args.item
        item.set_state(merged_data_state(str(directory)))
        if hasattr(item, 'start_prefetch'):
            item.start_prefetch()
        return item

    def structure(self, directory):
        return None

    def metadata(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass

    @classmethod
    def typestr(cls):
        return f'{cls.__module__}.{cls.__qualname__}'


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
    item: Any


def _data_files(directory: str) -> dict[tuple[int, int], str]:
    files = {}
    for name in os.listdir(directory) if os.path.isdir(directory) else ():
        match = _PROCESS_FILE.match(name)
        if match:
            files[int(match[1]), int(match[2])] = os.path.join(directory, name)
    return files


def merged_data_state(directory: str) -> dict:
    """The data state saved in `directory` (checkpoints/<step>/data), every process's shards
    together: {'num_shards': V, 'shards': {k: state}}."""
    files = _data_files(directory)
    if not files:
        raise CheckpointError(f'{directory} holds no data iterator state (process_*.json)')
    saved_by = {n for _, n in files}
    if len(saved_by) != 1 or len(files) != next(iter(saved_by)):
        raise CheckpointError(
            f'{directory} holds data states of {sorted(files)}: not one complete set of '
            'processes; delete this checkpoint step to resume from the one before'
        )
    states = {}
    for (i, _), path in sorted(files.items()):
        try:
            with open(path) as f:
                states[i] = json.load(f)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise CheckpointError(f'{path} is not a JSON data state ({e})') from None
    if not all('shards' in s for s in states.values()):
        # Written before data shards existed: one process reading its whole stream is one
        # shard; several processes shared one seed, which no sharded pipeline reproduces.
        if len(states) == 1:
            return {'version': 1, 'num_shards': 1, 'shards': {'0': states[0]}}
        raise CheckpointError(
            f'{directory}: a multi-process data state from before data shards; start the run '
            'again in a new workdir'
        )
    merged = {'version': 1, 'num_shards': states[0]['num_shards'], 'shards': {}}
    for state in states.values():
        merged['shards'].update(state['shards'])
    return merged


def saved_steps(directory: str) -> list[int]:
    """The steps in a checkpoints/ directory, ascending ([] without one): those its
    CheckpointManager lists, readable or not (recovery moves damaged ones aside), and no
    save in flight (<step>.orbax-checkpoint-tmp-*)."""
    return sorted(m.step for m in ocp.path.step.standard_name_format().find_all(directory))


def saved_data_shards(workdir: str) -> int | None:
    """The number of data shards of the run whose checkpoints are in `workdir`, from the
    newest step whose data state reads (None without one: fixed for a run, so any step
    tells; a damaged one is left to the resume to report)."""
    directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    for step in reversed(saved_steps(directory)):
        try:
            return merged_data_state(os.path.join(directory, str(step), 'data'))['num_shards']
        except (OSError, ValueError, KeyError):
            continue
    return None


def _reason(e: BaseException) -> str:
    """An exception as one short line: its root cause (Orbax wraps tensorstore's
    OUT_OF_RANGE and the like in a generic message, raised from it), the first line, at
    most 200 chars. Only explicit causes are followed: an exception's context is whatever
    was being handled when it was raised (JSON's decoder leaves a StopIteration there)."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= 200 else text[:197] + '...'


class _FailedReadLeftovers(std_logging.Filter):
    """A failed Orbax read leaves its other array reads running. As they finish, asyncio
    logs "<Task|_GatheringFuture|Future> exception was never retrieved" for each, and
    tensorstore's callbacks raise "Event loop is closed" into sys.unraisablehook, each with
    a full traceback, although the failure was already reported once with its cause
    (`_reason`). This drops exactly those (an Orbax coroutine's, or an array read's
    failure), from the first restore on (they arrive whenever the reads end, even before
    the failure has unwound)."""

    installed = False

    def filter(self, record: std_logging.LogRecord) -> bool:
        message = record.getMessage()
        if 'exception was never retrieved' not in message:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        return not ('/orbax/' in message or self.leftover(exc))

    @staticmethod
    def leftover(exc: BaseException | None) -> bool:
        text = str(exc)
        return (isinstance(exc, RuntimeError) and text == 'Event loop is closed') or (
            text.startswith('Encountered error while reading array index')
        )

    @classmethod
    def install(cls) -> None:
        if cls.installed:
            return
        cls.installed = True
        std_logging.getLogger('asyncio').addFilter(cls())
        previous = sys.unraisablehook

        def hook(unraisable) -> None:
            if not cls.leftover(unraisable.exc_value):
                previous(unraisable)

        sys.unraisablehook = hook


def _all_processes(ok: bool) -> bool:
    """Whether `ok` holds on every process (each process reads its own shards of a step, so
    one may fail where another does not; all must agree on the step they resume)."""
    if jax.process_count() == 1:
        return ok
    flags = multihost_utils.process_allgather(np.array([ok], np.int32))
    return bool(np.all(flags))


def _aside(path: str) -> str:
    """checkpoints/<step> -> checkpoints/<step>.corrupt (-2, -3, ... when taken): a name
    Orbax does not read as a step, so it neither restores nor removes it."""
    target, n = path + '.corrupt', 1
    while os.path.lexists(target):
        n += 1
        target = f'{path}.corrupt-{n}'
    os.rename(path, target)
    return target


class Checkpointer:
    """WORKDIR/checkpoints/<step>/{state,data,config}.

    Keeps the last `keep` steps plus, with `best_metric`, the step whose eval scored
    highest on it (saves carry the eval figures of their step).
    """

    def __init__(
        self,
        workdir: str,
        *,
        every: int,
        keep: int,
        async_save: bool = True,
        best_metric: str | None = None,
    ):
        self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
        self.best_metric = best_metric
        policies = [ocp.checkpoint_managers.LatestN(n=keep)]
        if best_metric:
            policies.append(
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=lambda m: m[best_metric],
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            best_fn=(lambda m: m[best_metric]) if best_metric else None,
            best_mode='max',
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                'state': ocp.StandardCheckpointHandler(),
                'data': DataIteratorHandler(),
                'config': ocp.JsonCheckpointHandler(),
            },
        )

    def last_good(self) -> str:
        """Where a run stopped by an error can go back to, in words (for its message)."""
        kept = self.latest_step()
        return f'the last good checkpoint is step {kept}' if kept else 'there is no checkpoint yet'

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The kept step with the highest `best_metric` (None without one)."""
        return self.manager.best_step() if self.best_metric else None

    def save(
        self, step: int, state, data_iterator, config, force: bool = False, metrics=None
    ) -> bool:
        """Starts an (async) save if `step` is due (or `force`); returns whether it did.
        `metrics`: the eval figures of this step, for best-checkpoint tracking."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=DataIteratorSave(data_iterator),
            config=ocp.args.JsonSave(config.to_dict()),
        )
        if metrics is not None and self.best_metric not in metrics:
            metrics = None
        saved = self.manager.save(step, args=args, force=force, metrics=metrics)
        if saved:
            logging.info('checkpoint: saving step %d to %s', step, self.directory)
        return saved

    def _read_step(self, step: int, abstract_state) -> tuple[Any, dict | None, str | None]:
        """(state, data state, None), or (None, None, what failed) when a part of the step
        cannot be read: saved config, data-iterator state, train state (metadata, arrays).
        Orbax's handlers, not the manager: a process whose read fails must not leave the
        others waiting in the manager's barrier."""
        path = epath.Path(self.directory) / str(step)
        _FailedReadLeftovers.install()  # before: they may come while the failure unwinds
        part = 'saved config'
        try:
            ocp.JsonCheckpointHandler().restore(path / 'config')
            part = 'data-iterator state'
            data_state = merged_data_state(str(path / 'data'))
            part = 'train state'
            handler = ocp.StandardCheckpointHandler()
            try:
                target = ocp.args.StandardRestore(abstract_state)
                state = handler.restore(path / 'state', args=target)
            finally:
                handler.close()
        except MemoryError:
            raise
        except Exception as e:  # tensorstore, JSON and OS errors alike: unreadable
            return None, None, f'{part}: {_reason(e)}'
        return state, data_state, None

    def restore_latest(self, abstract_state, data_iterator) -> tuple[int | None, Any]:
        """Restores the newest step that reads completely, into `abstract_state`'s shardings,
        and the data iterator in place; (None, None) without a checkpoint.

        A newer step that cannot be read is moved aside as checkpoints/<step>.corrupt with
        a warning, once an older one has read (so a failure of every step, as a code
        change would cause, moves nothing); with none readable, a CheckpointError says so.
        Every process reads each step; they resume the newest step all of them read."""
        failed: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            state, data_state, problem = self._read_step(step, abstract_state)
            if problem and jax.process_count() > 1:  # what this process saw
                logging.warning('checkpoint step %d cannot be read (%s)', step, problem)
            if not _all_processes(problem is None):
                failed.append((step, problem or 'unreadable on another process'))
                continue
            if failed and jax.process_index() == 0:
                for bad, problem in failed:
                    moved = _aside(os.path.join(self.directory, str(bad)))
                    logging.warning(
                        'checkpoint step %d cannot be read (%s): moved aside to %s; resuming '
                        'from step %d',
                        bad,
                        problem,
                        moved,
                        step,
                    )
            if failed:
                if jax.process_count() > 1:
                    multihost_utils.sync_global_devices('checkpoints moved aside')
                self.manager.reload()
            data_iterator.set_state(data_state)
            return step, state
        if failed:
            shown = '; '.join(f'step {step}: {problem}' for step, problem in failed)
            other_layout = all('tree structures do not match' in p for _, p in failed)
            layout = (
                " The saved train state is laid out otherwise than this run's (an "
                'optimizer of another kind); its parameters still serve '
                '--config.init_from and launch.py evaluate.'
                if other_layout
                else ''
            )
            error = StateLayoutError if other_layout else CheckpointError
            raise error(
                f'no checkpoint in {self.directory} can be read ({shown}).{layout} Nothing was '
                'moved or deleted. To start over, give a new --workdir, or pass '
                '--config.overwrite=true (the run is moved to previous/)'
            )
        return None, None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def resolve_checkpoint(path: str) -> tuple[str, int]:
    """A workdir, its checkpoints/ directory, or one checkpoint step -> (checkpoints dir,
    step). The latest step is taken when none is named."""
    path = os.path.abspath(path)
    for candidate in (os.path.join(path, 'checkpoints'), path):
        steps = saved_steps(candidate)
        if steps:
            return candidate, steps[-1]
    parent, name = os.path.split(path)
    if name.isdigit() and os.path.isdir(os.path.join(path, 'state')):
        return parent, int(name)
    raise CheckpointError(
        f'no checkpoint found at {path}: expected a workdir with checkpoints/<step>, a '
        'checkpoints/ directory, or a checkpoints/<step> directory; check --config.init_from'
    )


def saved_params_metadata(path: str, *subtree: str):
    """The tree of saved parameter metadata (shapes, dtypes) under params/<subtree...> of
    the checkpoint at `path`, read without loading any array."""
    directory, step = resolve_checkpoint(path)
    state_dir = os.path.join(directory, str(step), 'state')
    saved = ocp.StandardCheckpointer().metadata(state_dir)
    saved_tree = saved.item_metadata.tree if hasattr(saved, 'item_metadata') else saved.tree
    saved_params = saved_tree['params']
    for key in subtree:
        if key not in saved_params:
            raise CheckpointError(
                f'checkpoint {state_dir} has no params/{"/".join(subtree)} '
                f'(top-level: {sorted(saved_params)}); set --config.init_subtree to one of them'
            )
        saved_params = saved_params[key]
    return saved_params


def restore_params(
    path: str, abstract_params, subtree: tuple[str, ...] = (), besides: tuple[str, ...] = ()
):
    """Restores only the parameters (no optimizer state) from the checkpoint at `path`.

    `subtree` selects a part of the saved params (e.g. ('backbone',)) to restore into
    `abstract_params`; top-level saved params named in `besides` are left out of it (a
    distillation run's teacher). Differing paths or shapes raise a CheckpointError listing
    them. An encoder saved in the other layer layout (`model.scan_layers`) is restored as
    saved and converted to the model's.
    """
    directory, step = resolve_checkpoint(path)
    state_dir = os.path.join(directory, str(step), 'state')
    saved_params = saved_params_metadata(path, *subtree)
    if besides:
        saved_params = {k: v for k, v in saved_params.items() if k not in besides}
    model_params = abstract_params
    abstract_params = match_layout(abstract_params, saved_params, _stack_abstract, _split_abstract)
    check_same_structure(saved_params, abstract_params, state_dir)

    target = {'params': abstract_params}
    for key in reversed(subtree):
        target = {'params': {key: target['params']}}
    # Without a sharding (a plain jax.eval_shape target) the arrays land on one device.
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    restore_args = jax.tree.map(
        lambda s: ocp.ArrayRestoreArgs(
            sharding=getattr(s, 'sharding', None) or default, global_shape=s.shape, dtype=s.dtype
        ),
        target,
    )
    with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore(
            state_dir,
            args=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=True
            ),
        )
    params = restored['params']
    for key in subtree:
        params = params[key]
    if _paths(abstract_params) != _paths(model_params):
        params = _to_layout(params, model_params)
    return params, step


def _relayout_sharding(sharding, spec: tuple):
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*spec))
    return sharding


def _stack_abstract(parts: list) -> jax.ShapeDtypeStruct:
    """Per-layer ShapeDtypeStructs -> the stacked one (its layer axis not sharded)."""
    s = parts[0]
    sharding = getattr(s, 'sharding', None)
    spec = (None, *sharding.spec) if isinstance(sharding, NamedSharding) else ()
    return jax.ShapeDtypeStruct(
        (len(parts), *s.shape), s.dtype, sharding=_relayout_sharding(sharding, spec)
    )


def _split_abstract(s: jax.ShapeDtypeStruct) -> list:
    """A stacked ShapeDtypeStruct -> one per layer (the leading axis dropped)."""
    sharding = getattr(s, 'sharding', None)
    spec = tuple(sharding.spec)[1:] if isinstance(sharding, NamedSharding) else ()
    part = jax.ShapeDtypeStruct(s.shape[1:], s.dtype, sharding=_relayout_sharding(sharding, spec))
    return [part] * s.shape[0]


def _to_layout(params, abstract_params):
    """Restored params -> the layer layout (and shardings, when given) of abstract_params."""
    shardings = [getattr(s, 'sharding', None) for s in jax.tree.leaves(abstract_params)]
    convert = lambda p: match_layout(p, abstract_params, jnp.stack, list)
    if None in shardings:
        return convert(params)
    out = jax.tree.map(lambda s: s.sharding, abstract_params)
    return jax.jit(convert, out_shardings=out)(params)


def _paths(tree) -> dict[str, tuple]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p, simple=True, separator='/'): tuple(v.shape) for p, v in flat}


def check_same_structure(saved, expected, where: str) -> None:
    """Raises a CheckpointError listing every parameter path that is missing, unexpected
    or of another shape."""
    a, b = _paths(saved), _paths(expected)
    problems = [f'missing in checkpoint: {k} {b[k]}' for k in sorted(set(b) - set(a))]
    problems += [f'not in model: {k} {a[k]}' for k in sorted(set(a) - set(b))]
    problems += [
        f'shape differs: {k} checkpoint {a[k]} vs model {b[k]}'
        for k in sorted(set(a) & set(b))
        if a[k] != b[k]
    ]
    if problems:
        shown = '\n  '.join(problems[:30])
        more = f'\n  ... and {len(problems) - 30} more' if len(problems) > 30 else ''
        raise CheckpointError(
            f'checkpoint {where} does not match the model ({len(problems)} differences):\n  '
            f'{shown}{more}\nUse a checkpoint of the same architecture, or set the model '
            'config (hidden_size, num_layers, vocab_size, ...) to the one it was trained with'
        )
