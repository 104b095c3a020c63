"""The trainer every stage runs, top to bottom: config -> mesh -> task (data, model, loss,
evaluators) -> state -> restore -> loop (log, eval, checkpoint) -> test -> summary.

Eval rows score the validation split: they pick the best checkpoint, early stopping and
steps-to-target. A task with a test split (`Task.test`) has it read and scored once, when
the run completes, on the checkpoint validation selected (`score_test`).

One trainer serves every objective; a task module (`pretrain/mlm.py`, `pretrain/simclr.py`,
..., `finetune/classify.py`) says what is learned from what, and how it is evaluated. What
the loop keeps track of (pauses, clocks, eval history, SIGTERM, the non-finite guard, train
rows) is in core/loop.py, one object a concern.
"""

import dataclasses
import importlib
import json
import os
import shutil
import time
from typing import Any

import jax
import ml_collections
import optax
from absl import logging
from jax.experimental import multihost_utils

from core import checkpoint as ckpt_lib
from core import compile_cache, loop, optim, recipe, rundir, runlog, selection, startup
from core import config as config_lib
from core import metrics as metrics_lib
from core import sharding as sharding_lib
from core import step as step_lib
from core import trackers as trackers_lib
from core import train_state as state_lib
from core import watchdog as watchdog_lib
from core.errors import CheckpointError, StateLayoutError
from core.files import atomic_write
from core.task import TASKS, Runtime, Scorer, Task


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _read_summary(workdir: str) -> dict:
    path = os.path.join(workdir, 'summary.json')
    if not os.path.isfile(path):
        return {}
    return config_lib.read_json(path)


def task_module(config, stage: str, tasks: dict[str, str] | None = None):
    """The module of `config.task`, from the stage's table of the registry (core/task.py)
    or `tasks` (name -> module path)."""
    tasks = TASKS[stage] if tasks is None else tasks
    if config.task not in tasks:
        raise config_lib.ConfigError(
            f'--config.task={config.task!r} is not a {stage} task; expected one of {sorted(tasks)}'
        )
    return importlib.import_module(tasks[config.task])


def make_mesh(config) -> tuple[jax.sharding.Mesh, int]:
    """(mesh, how many ways the global batch is split)."""
    if config.parallelism == 'pmap':
        if config.mesh.fsdp != 1 or config.mesh.tensor != 1:
            raise config_lib.ConfigError(
                'parallelism=pmap is data parallel only; set mesh.fsdp=1 and mesh.tensor=1, '
                'or use parallelism=jit for fsdp/tensor sharding'
            )
        return sharding_lib.make_mesh(devices=jax.local_devices()[:1]), jax.device_count()
    try:
        mesh = sharding_lib.mesh_from_config(config)
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from e
    return mesh, sharding_lib.batch_shards(mesh)


def data_shards(config, workdir: str) -> int:
    """How many shards the training stream is cut into: as the run's checkpoints were saved,
    else `data.shards`, else one per process. Checks that this run's processes divide it."""
    saved = ckpt_lib.saved_data_shards(workdir)
    shards = saved or config.data.get('shards', 0) or jax.process_count()
    if shards % jax.process_count():
        origin = 'as its checkpoints were saved' if saved else 'data.shards'
        raise config_lib.ConfigError(
            f'the training data of this run is cut into {shards} shards ({origin}), which '
            f'{jax.process_count()} processes cannot share evenly. Run on a number of processes '
            f'that divides {shards}, or start runs with --config.data.shards=N, N a multiple '
            'of every process count you will use (e.g. 8)'
        )
    if config.batch_size % shards:
        raise config_lib.ConfigError(
            f'batch_size {config.batch_size} is not divisible by the {shards} data shards; set '
            '--config.batch_size to a multiple of data.shards'
        )
    return shards


@dataclasses.dataclass(frozen=True)
class RunSetup:
    """What a run builds before it holds a state: mesh, task, optimizer and step."""

    mesh: jax.sharding.Mesh
    task: Task
    tx: optax.GradientTransformation
    init_rng: jax.Array
    dropout_rng: jax.Array
    shardings: Any  # the NamedSharding of every leaf of the train state
    stepper: step_lib.JitStepper | step_lib.PmapStepper
    plan: rundir.WorkdirPlan | None = None  # None for a dry run (nothing written)


def follow_start(config: ml_collections.ConfigDict, module=None, workdir=None) -> None:
    """With init_from, the encoder's architecture is the one it was saved with, and a
    fine-tuning run's optimizer and pooling defaults follow that start (core/recipe.py);
    each change is logged. The task `module` may follow a start of its own first (its
    `follow_start(config, workdir)`: text_cls takes a distillation teacher's vocabulary,
    as the run in `workdir` recorded it when it started). Done
    before config.json is written or compared, so a resumed
    run (and `evaluate` with the run's command) compares equal."""
    if hasattr(module, 'follow_start'):
        module.follow_start(config, workdir)
    if not config.get('init_from'):
        return
    saved = recipe.saved_run_config(config.init_from)
    subtree = config.get('init_subtree', 'backbone')
    for change in recipe.adopt_architecture(config, saved, subtree):
        logging.info('init_from %s: %s', config.init_from, change)
    run_dir = recipe.run_directory(config.init_from)
    for change in recipe.apply(config, saved, run_dir, config_lib.COMMAND_LINE_KEYS):
        logging.info('init_from %s: fine-tuning default %s', config.init_from, change)
    if config.get('transfer', {}).get('start_defaults'):
        logging.info('defaults from the start: %s', config.transfer.start_defaults)


def set_up(
    config: ml_collections.ConfigDict,
    workdir: str,
    stage: str,
    *,
    tasks: dict[str, str] | None = None,
    write_config: bool = True,
    build_dir: str | None = None,
    evaluating: bool = False,
    profile: startup.Profile | None = None,
) -> RunSetup:
    """Config checks -> mesh -> workdir check -> task -> optimizer -> state shardings ->
    step -> workdir written.

    Nothing is written to the workdir before every check that needs no compilation has
    passed: a new run's task writes what it derives from the data (vocab.txt, labels.json)
    into a staging directory, and `rundir.start_run` then moves an overwritten run
    aside, the staged files in, and writes config.json; a failed start leaves the workdir
    as it found it. A dry run (core/memory_plan.py) passes write_config=False, so the
    workdir gets no config.json (a later run there may have any config), and a `build_dir`
    for what the task derives. `evaluate_checkpoint` sets up a finished run (`evaluating`):
    nothing is written, and the training stream is built but not read. `profile` (a
    training run's) times the build and the set-up after it.
    """
    profile = profile or startup.NoProfile()
    module = task_module(config, stage, tasks)
    if evaluating:  # the trained model as it was: only data and eval keys may differ
        saved = rundir.run_config(workdir)
        if rundir.evaluate_changes(saved, config):  # not its own config: follow its start
            follow_start(config, module, workdir)
        rundir.evaluate_config(saved, config)
    else:
        follow_start(config, module, workdir)
    config_lib.check_common(config)
    module.check_config(config)
    if not evaluating:
        trackers_lib.check_can_start(config)  # a missing W&B login: now, not after the data
    is_main = jax.process_index() == 0

    # Mesh, then what this start finds in the workdir (nothing is written yet).
    mesh, batch_shards = make_mesh(config)
    config_lib.check_batch_layout(config, jax.device_count(), batch_shards, jax.process_count())
    write_config = write_config and not evaluating
    plan = rundir.check_workdir(config, workdir) if write_config else None
    fresh = plan is not None and plan.fresh
    if fresh:
        build_dir = plan.staging  # what the task derives waits there until every check passed
        if is_main:
            shutil.rmtree(build_dir, ignore_errors=True)  # left by a start that was killed
    if is_main:
        os.makedirs(build_dir or workdir, exist_ok=True)
    _sync('workdir')

    try:
        # Task: data, model, loss, evaluators.
        runtime = Runtime(
            mesh=mesh,
            parallelism=config.parallelism,
            per_host_batch=config.batch_size // jax.process_count(),
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            data_shards=jax.process_count()
            if evaluating
            else data_shards(config, build_dir if fresh else workdir),
        )
        with profile.phase('data'):
            task = module.build(config, build_dir or workdir, runtime)
        setup_began = time.perf_counter()

        # Optimizer, state shardings and the step.
        tx, schedule = optim.make_optimizer(config)
        init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
        shardings = state_lib.state_shardings(task.init_params, tx, mesh, init_rng)
        skip = config.get('skip_nonfinite_steps', 0) > 0
        if config.parallelism == 'pmap':
            stepper = step_lib.PmapStepper(
                task.loss_fn, tx, schedule, config.grad_accum_steps, skip_nonfinite=skip
            )
        else:
            stepper = step_lib.JitStepper(
                mesh, shardings, task.loss_fn, tx, schedule, config.grad_accum_steps, skip
            )
        _sync('checked')
        # Every check that needs no compilation has passed: only now does a new run replace
        # an old one (moved aside) and write its config.json.
        if fresh and is_main:
            rundir.start_run(plan, config)
    except BaseException:
        if fresh and is_main:
            rundir.abandon_start(plan)  # the workdir as this start found it
        raise
    _sync('started')
    profile.add('setup', time.perf_counter() - setup_began)
    return RunSetup(mesh, task, tx, init_rng, dropout_rng, shardings, stepper, plan)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    stage: str,
    *,
    tasks: dict[str, str] | None = None,
) -> dict:
    """Runs (or resumes) `config.task` of the `stage` (pretrain | finetune) in `workdir`;
    returns the summary."""
    started = time.time()
    profile = startup.Profile(started)  # where the seconds before the first step go
    # Set-up: checks, mesh, task, optimizer, step; a new run's workdir written.
    run = set_up(config, workdir, stage, tasks=tasks, profile=profile)
    # The workdir is settled (an overwritten run moved aside): log.txt takes the log.
    with runlog.log_file(workdir, enabled=jax.process_index() == 0):
        return _train(run, config, workdir, stage, started, profile)


def _train(
    run: RunSetup,
    config: ml_collections.ConfigDict,
    workdir: str,
    stage: str,
    started: float,
    profile: startup.Profile,
) -> dict:
    """train_and_evaluate once the run is set up: restore, loop, test, summary."""
    task, stepper, train_iter = run.task, run.stepper, run.task.train_iter
    is_main = jax.process_index() == 0
    checkpointer = ckpt_lib.Checkpointer(
        workdir,
        every=config.checkpoint_every,
        keep=config.keep_checkpoints,
        best_metric=task.metric,
    )
    writer = metrics_lib.MetricWriter(workdir, enabled=is_main, config=config)

    # Restore: this workdir's own checkpoint (resume); else init_from (params); else scratch.
    restore_began = time.perf_counter()
    with startup.heartbeat('model state'):
        start_step, state = restore(run, config, checkpointer, writer)
    profile.add('restore' if start_step else 'init', time.perf_counter() - restore_began)
    if is_main:
        runlog.record_start(workdir, start_step)  # run.json: command, versions, devices
    num_params = state_lib.count_params(state.params)
    if start_step >= config.total_steps or _read_summary(workdir).get('early_stopped'):
        logging.info('the run in %s is already complete (step %d)', workdir, start_step)
        checkpointer.close()
        task.close()
        return _read_summary(workdir)
    # The run continues: config.json takes the restart-safe keys that changed (recorded).
    if 'total_steps' in run.plan.changed and start_step:
        old_total = run.plan.changed['total_steps'][0]
        logging.info('%s', rundir.schedule_change(config, old_total, start_step))
    if is_main:
        rundir.record_resume(run.plan, config, start_step)
    state = stepper.put_state(state)

    # The loop: step; at log, eval and save steps the train row, the eval, the checkpoint.
    track = loop.Trackers(config, task, workdir, writer, checkpointer.last_good, start_step)
    if start_step == 0:
        with profile.phase('eval0'), startup.heartbeat('step-0 eval'):
            track.evaluate(0, stepper, state.params)  # every run shows its own starting point
    first_began = time.perf_counter()
    step, preempted, early_stopped = start_step, False, False
    compiling = watchdog_lib.CompileListener(track.pauses.compile_began, track.pauses.compile_ended)
    try:
        with loop.Preemption() as preemption:
            for step in range(start_step + 1, config.total_steps + 1):
                track.watchdog.phase = f'reading the batch of step {step}'
                batch = stepper.put_batch(next(train_iter))
                track.watchdog.phase = f'running step {step}'
                if step == start_step + 1:
                    # Compiling happens in the dispatch: left out of the watchdog and the
                    # throughput (this step is not timed); its execution is guarded.
                    logging.info('first step: %s', compile_cache.preparing('the train step'))
                    with startup.heartbeat('first step'):
                        with track.pauses.paused('compiling the train step'):
                            state, metrics = stepper.train(state, batch, run.dropout_rng)
                        jax.block_until_ready(metrics)
                    track.progress.start(step)
                    profile.add('step1', time.perf_counter() - first_began)
                    logging.info(
                        'first step done after %s; %s', profile.line(), compile_cache.describe()
                    )
                    damaged = compile_cache.damaged()
                    if damaged:
                        logging.warning('%s', damaged)
                else:
                    state, metrics = stepper.train(state, batch, run.dropout_rng)
                track.rows.add(metrics)
                track.watchdog.ping()
                track.progress.tick(step)
                due_eval = step % config.eval_every == 0 or step == config.total_steps
                due_save = step % config.checkpoint_every == 0 or step == config.total_steps
                boundary = step % config.log_every == 0 or due_save or due_eval
                preempted = preemption.agreed(boundary)
                if boundary or preempted:
                    track.rows.flush(step)  # also guards checkpoints against a NaN state
                if due_eval:
                    track.evaluate(step, stepper, state.params)
                    early_stopped = track.history.should_stop(step)
                if due_save or preempted or early_stopped:
                    final = preempted or early_stopped or step == config.total_steps
                    row = track.history.at(step)  # the checkpoint's own eval, if any
                    with track.pauses.paused(f'saving the checkpoint of step {step}'):
                        kept = stepper.get_state(state)
                        checkpointer.save(step, kept, train_iter, config, force=final, metrics=row)
                if early_stopped:
                    logging.info('%s', track.history.stop_message(step))
                    break
                if preempted:
                    logging.warning('SIGTERM: saved step %d; exiting to be restarted', step)
                    break
    finally:
        track.progress.bar.close()
        compiling.close()
        track.watchdog.stop()
        checkpointer.close()
        if hasattr(train_iter, 'close'):
            train_iter.close()
        task.close()

    # Summary: the test split once, on the checkpoint validation selected; summary.json.
    completed = not preempted and (step == config.total_steps or early_stopped)
    best_checkpoint = checkpointer.best_step()
    test = {}
    if completed and task.test is not None:
        selected = best_checkpoint
        if selected is None:
            selected = selection.latest_kept_step(workdir)
        test = selection.score_test(run, config, workdir, writer, selected)
    summary = {
        'stage': stage,
        'task': task.name,
        'steps': int(step),
        'completed': completed,
        'early_stopped': early_stopped,
        'num_params': num_params,
        'flops_per_step': task.flops_per_step,
        'wall_time_sec': time.time() - started,
        'startup_sec': profile.summary(),
        **_eval_summary(task, track.history, best_checkpoint),
        **test,
    }
    if track.loss_rise.step is not None:
        summary['loss_rose_step'] = track.loss_rise.step
    collapsed = loop.collapsed_since(track.history.rows) if completed else None  # at the end
    if collapsed is not None:
        summary['collapsed_step'] = collapsed
        last = track.history.rows[-1]['step']
        logging.warning('%s', loop.collapse_message(config, collapsed, last))
    if not preempted:
        if is_main:
            _draw_curves(workdir, task.metric)
        writer.write_summary(summary)
    writer.close()
    return summary


def _draw_curves(workdir: str, metric: str) -> None:
    """WORKDIR/curves.png: train loss, learning rate and the eval metric against steps.
    A picture that cannot be drawn costs the run a warning, not its summary."""
    from core import plots  # (matplotlib: loaded at the end only)

    try:
        plots.curves(workdir, metric)
    except Exception as e:  # noqa: BLE001 - the run's results stand without the picture
        logging.warning('curves.png not drawn: %s: %s', type(e).__name__, e)


def _eval_summary(task: Task, history: loop.EvalHistory, best_checkpoint: int | None) -> dict:
    """The summary's eval figures: the last eval's, the best step's and the task's extras."""
    if not history.rows:
        return {}
    final, best = history.rows[-1], history.best()
    return {
        **{f'final_{k}': v for k, v in final.items() if k != 'step'},
        f'best_{task.metric}': best.get(task.metric),
        'best_step': best['step'],
        'best_checkpoint_step': best_checkpoint,
        **task.summary_extras(final),
    }


def restore(run: RunSetup, config, checkpointer, writer) -> tuple[int, Any]:
    """(start step, state): this workdir's newest good checkpoint (its metrics rows after
    that step dropped); else a new state, with `init_from`'s params when given."""
    task = run.task
    abstract = state_lib.abstract_state(
        task.init_params, run.tx, run.mesh, run.init_rng, run.shardings
    )
    logging.info(  # before the state is made or read: seconds on a cold start
        'model: %.2fM parameters; mesh %s; %s over %d devices, %d processes',
        state_lib.count_params(abstract.params) / 1e6,
        dict(run.mesh.shape),
        config.parallelism,
        jax.device_count(),
        jax.process_count(),
    )
    try:
        start_step, state = checkpointer.restore_latest(abstract, task.train_iter)
    except StateLayoutError as e:
        start_step, state = _resume_with_frozen_state(run, config, checkpointer, abstract, e)
    if start_step is not None:
        writer.truncate_after(start_step)
        logging.info('resumed from %s/%d', checkpointer.directory, start_step)
        return start_step, state
    writer.truncate_after(-1)  # the rows of an attempt that saved no checkpoint
    state, _ = state_lib.create_sharded_state(
        task.init_params, run.tx, run.mesh, run.init_rng, run.shardings
    )
    if config.init_from:
        params = task.init_from.restore(state.params, abstract.params, config.init_from)
        state = state.replace(params=params)
    if task.frozen is not None:
        state = state.replace(params=task.frozen(state.params, abstract.params))
    return 0, state


def _resume_with_frozen_state(run: RunSetup, config, checkpointer, abstract, error):
    """(step, state) of a run with frozen parameters checkpointed by pretrax before
    2026-11-30, whose optimizer kept state for them (zeros): its newest step that reads in
    that layout, the trained parameters' optimizer state carried over into this one's.
    Any other run, or a step that does not read that way either, raises `error`."""
    if not optim.freezes(config):
        raise error
    tx, _ = optim.make_optimizer(config, frozen_state=True)
    task = run.task
    shardings = state_lib.state_shardings(task.init_params, tx, run.mesh, run.init_rng)
    earlier = state_lib.abstract_state(task.init_params, tx, run.mesh, run.init_rng, shardings)
    try:
        step, state = checkpointer.restore_latest(earlier, task.train_iter)
        opt_state = optim.drop_frozen_state(abstract.opt_state, state.opt_state)
    except (CheckpointError, ValueError):
        raise error from None
    logging.warning(
        'checkpoint step %d keeps optimizer state for frozen parameters (pretrax before '
        "2026-11-30): resumed without it, the trained parameters' state as saved",
        step,
    )
    return step, state.replace(opt_state=jax.device_put(opt_state, run.shardings.opt_state))


EVALUATE_SPLITS = ('test', 'validation')


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, workdir: str, stage: str = 'finetune'
) -> dict:
    """Scores the validation-selected checkpoint of the run in `workdir` (the kept one
    best on its eval rows) on the test split, or on the validation split with
    `eval.evaluate_split=validation` (or when the task has no test split); writes
    WORKDIR/evaluation.json, naming the split, and, where the task can,
    WORKDIR/predictions.jsonl of that split."""
    run = set_up(config, workdir, stage, evaluating=True)
    task, stepper = run.task, run.stepper
    step = selection.best_kept_step(workdir, task.metric)
    params = selection.checkpoint_params(run, workdir, step, config.parallelism)

    split = config.get('eval', {}).get('evaluate_split', 'test')
    if split == 'test' and task.test is None:
        logging.warning('evaluate: the task has no test split; scoring the validation split')
        split = 'validation'
    scorer = task.test() if split == 'test' else Scorer(task.evaluate, task.predict)
    result = scorer.evaluate(stepper, params)
    logging.info(
        'evaluate: checkpoint %d on the %s split | %s',
        step,
        split,
        ' | '.join(f'{k} {v:.4f}' for k, v in result.items()),
    )
    path = os.path.join(workdir, 'checkpoints', str(step))
    report = {'step': step, 'checkpoint': path, 'task': task.name, 'split': split, **result}
    # Every process predicts (the step and its gather are collectives); process 0 writes.
    rows = scorer.predict(stepper, params) if scorer.predict is not None else None
    if jax.process_index() == 0:
        if rows is not None:
            out = os.path.join(workdir, 'predictions.jsonl')
            with atomic_write(out) as f:
                f.writelines(json.dumps(r) + '\n' for r in rows)
            report['predictions'] = out
            logging.info('evaluate: %d predictions written to %s', len(rows), out)
        with atomic_write(os.path.join(workdir, 'evaluation.json')) as f:
            json.dump(report, f, indent=2, sort_keys=True)
    task.close()
    return report
