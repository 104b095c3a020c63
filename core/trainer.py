"""The trainer every stage runs, top to bottom: config -> mesh -> task (data, model, loss,
evaluators) -> state -> restore -> loop (log, eval, checkpoint) -> test -> summary.

Eval rows score the validation split: they pick the best checkpoint, early stopping and
steps-to-target. A task with a test split (`Task.test`) has it read and scored once, when
the run completes, on the checkpoint validation selected (`score_test`).

One trainer serves every objective; a task module (`pretrain/mlm.py`, `pretrain/simclr.py`,
..., `finetune/classify.py`) says what is learned from what, and how it is evaluated.
"""

import contextlib
import dataclasses
import importlib
import json
import os
import shutil
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from core import checkpoint as ckpt_lib
from core import config as config_lib
from core import flops as flops_lib
from core import metrics as metrics_lib
from core import optim, recipe
from core import sharding as sharding_lib
from core import step as step_lib
from core import train_state as state_lib
from core import watchdog as watchdog_lib
from core.errors import UserError
from core.files import atomic_write
from core.task import TASKS, Runtime, Scorer, Task


class NonFiniteLossError(UserError, RuntimeError):
    """The loss or the gradient norm became NaN or Inf; the message gives the step."""


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _read_summary(workdir: str) -> dict:
    path = os.path.join(workdir, 'summary.json')
    if not os.path.isfile(path):
        return {}
    return config_lib.read_json(path)


def _train_time_at(workdir: str, step: int) -> float:
    """The training clock at `step` of an earlier run in `workdir` (0 for a new run)."""
    try:
        rows = metrics_lib.read_metrics(workdir)
    except FileNotFoundError:
        return 0.0
    times = [r['train_time_sec'] for r in rows if r['step'] <= step and 'train_time_sec' in r]
    return times[-1] if times else 0.0


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


def restore_init_from(task: Task, state, abstract_params, init_from: str):
    """init_from: params only, all of them or the task's chosen subtrees (an encoder)."""
    if task.restore is not None:
        return state.replace(params=task.restore(state.params, abstract_params, init_from))
    if task.init_subtrees is None:
        params, from_step = ckpt_lib.restore_params(init_from, abstract_params)
        logging.info('initialised params from %s (step %d)', init_from, from_step)
        return state.replace(params=params)
    params = dict(state.params)
    for ours, theirs in task.init_subtrees.items():
        params[ours], from_step = ckpt_lib.restore_params(
            init_from, abstract_params[ours], subtree=(theirs,)
        )
        logging.info(
            'initialised %s from %s (params/%s, step %d)', ours, init_from, theirs, from_step
        )
    return state.replace(params=params)


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
    plan: config_lib.WorkdirPlan | None = None  # None for a dry run (nothing written)


def follow_start(config: ml_collections.ConfigDict) -> None:
    """With init_from, the encoder's architecture is the one it was saved with, and a
    fine-tuning run's optimizer and pooling defaults follow that start (core/recipe.py);
    each change is logged. Done before config.json is written or compared, so a resumed
    run (and `evaluate` with the run's command) compares equal."""
    if not config.get('init_from'):
        return
    saved = config_lib.saved_run_config(config.init_from)
    subtree = config.get('init_subtree', 'backbone')
    for change in config_lib.adopt_architecture(config, saved, subtree):
        logging.info('init_from %s: %s', config.init_from, change)
    run_dir = config_lib.run_directory(config.init_from)
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
) -> RunSetup:
    """Config checks -> mesh -> workdir check -> task -> optimizer -> state shardings ->
    step -> workdir written.

    Nothing is written to the workdir before every check that needs no compilation has
    passed: a new run's task writes what it derives from the data (vocab.txt, labels.json)
    into a staging directory, and `config_lib.start_run` then moves an overwritten run
    aside, the staged files in, and writes config.json; a failed start leaves the workdir
    as it found it. A dry run (core/memory_plan.py) passes write_config=False, so the
    workdir gets no config.json (a later run there may have any config), and a `build_dir`
    for what the task derives.
    """
    module = task_module(config, stage, tasks)
    follow_start(config)
    config_lib.check_common(config)
    module.check_config(config)
    is_main = jax.process_index() == 0

    # Mesh, then what this start finds in the workdir (nothing is written yet).
    mesh, batch_shards = make_mesh(config)
    config_lib.check_batch_layout(config, jax.device_count(), batch_shards, jax.process_count())
    plan = config_lib.check_workdir(config, workdir) if write_config else None
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
            data_shards=data_shards(config, build_dir if fresh else workdir),
        )
        task = module.build(config, build_dir or workdir, runtime)

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
            config_lib.start_run(plan, config)
    except BaseException:
        if fresh and is_main:
            config_lib.abandon_start(plan)  # the workdir as this start found it
        raise
    _sync('started')
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
    run = set_up(config, workdir, stage, tasks=tasks)
    mesh, task, tx, shardings, stepper = run.mesh, run.task, run.tx, run.shardings, run.stepper
    init_rng, dropout_rng = run.init_rng, run.dropout_rng
    is_main = jax.process_index() == 0
    train_iter = task.train_iter

    # How the run starts, in order: this workdir's own checkpoint (resume); else init_from
    # (params only); else from scratch.
    checkpointer = ckpt_lib.Checkpointer(
        workdir,
        every=config.checkpoint_every,
        keep=config.keep_checkpoints,
        best_metric=task.metric,
    )
    writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
    abstract = state_lib.abstract_state(task.init_params, tx, mesh, init_rng, shardings)
    start_step, state = checkpointer.restore_latest(abstract, train_iter)
    if start_step is not None:
        writer.truncate_after(start_step)
        logging.info('resumed from %s/%d', checkpointer.directory, start_step)
    else:
        start_step = 0
        writer.truncate_after(-1)  # the rows of an attempt that saved no checkpoint
        state, _ = state_lib.create_sharded_state(task.init_params, tx, mesh, init_rng, shardings)
        if config.init_from:
            state = restore_init_from(task, state, abstract.params, config.init_from)
    num_params = state_lib.count_params(state.params)
    logging.info(
        'model: %.2fM parameters; mesh %s; %s over %d devices, %d processes',
        num_params / 1e6,
        dict(mesh.shape),
        config.parallelism,
        jax.device_count(),
        jax.process_count(),
    )
    if start_step >= config.total_steps or _read_summary(workdir).get('early_stopped'):
        logging.info('the run in %s is already complete (step %d)', workdir, start_step)
        checkpointer.close()
        task.close()
        return _read_summary(workdir)
    # The run continues: config.json takes the restart-safe keys that changed (recorded).
    if 'total_steps' in run.plan.changed and start_step:
        old_total = run.plan.changed['total_steps'][0]
        logging.info('%s', config_lib.schedule_change(config, old_total, start_step))
    if is_main:
        config_lib.record_resume(run.plan, config, start_step)
    state = stepper.put_state(state)
    peak = flops_lib.peak_flops_per_device(config.peak_tflops, config.get('precision', 'float32'))

    # The watchdog guards progress: phases that are slow by nature (compilation, evals, saves,
    # the test scoring) run inside `paused(phase)`, which also stops the throughput clock.
    pending: list[dict] = []  # device metrics of the steps since the last log row
    stacks = 'watchdog_stacks.txt'
    if jax.process_count() > 1:
        stacks = f'watchdog_stacks.process{jax.process_index()}.txt'
    watchdog = watchdog_lib.Watchdog(
        config.watchdog_secs, stacks_path=os.path.join(workdir, stacks)
    )
    progress = metrics_lib.Progress(
        start_step, config.total_steps, sync=lambda: jax.block_until_ready(pending)
    )

    @contextlib.contextmanager
    def paused(phase: str):
        """`phase` counts neither as training time nor against the watchdog. The clock stops
        first, waiting for the steps dispatched so far (under the watchdog), so every step
        before the pause is timed in full."""
        with progress.paused(), watchdog.paused(phase):
            yield

    def compile_began() -> None:
        progress.pause()
        watchdog.pause('compiling')

    def compile_ended() -> None:
        watchdog.resume()
        progress.resume()

    eval_history = []
    # The training clock of eval rows (`train_time_sec`): seconds spent training, evals left
    # out and compilation kept in, carried across restarts; it measures time-to-accuracy.
    clock = {'offset': _train_time_at(workdir, start_step), 'start': time.perf_counter()}
    clock['eval'] = 0.0

    health = {}  # what summary.json says of a run gone wrong (loss_rose_step, collapsed_step)

    def run_eval(step: int) -> None:
        began = time.perf_counter()
        train_time = clock['offset'] + began - clock['start'] - clock['eval']
        with paused(f'evaluating at step {step}'):
            result = task.evaluate(stepper, state.params)
        clock['eval'] += time.perf_counter() - began
        writer.write(step, 'eval', {**result, 'train_time_sec': train_time})
        eval_history.append({'step': step, **result})
        logging.info(
            'eval step %d | %s', step, ' | '.join(f'{k} {v:.4f}' for k, v in result.items())
        )

    if start_step == 0:
        run_eval(0)  # every run shows its own starting point

    # Early stopping: `early_stopping_patience` evals without a new best of task.metric.
    patience = config.get('early_stopping_patience', 0)
    early_stopped = False

    def best_so_far() -> dict:
        return max(eval_history, key=lambda r: r.get(task.metric, -np.inf))

    def stop_early(step: int) -> bool:
        if not patience or not eval_history or eval_history[-1]['step'] != step:
            return False
        return len(eval_history) - 1 - eval_history.index(best_so_far()) >= patience

    # SIGTERM (preemption): finish the step, save, exit 0. On several processes the signal
    # may reach them at different steps: they agree at the next step where every process
    # checks (a log, eval or save step), so all save the same step and none is left waiting
    # in a collective.
    sigterm: list[bool] = []
    preempted = False
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: sigterm.append(True))

    def agreed_preemption(check_point: bool) -> bool:
        if jax.process_count() == 1:
            return bool(sigterm)
        if not check_point:
            return False
        flags = multihost_utils.process_allgather(np.array([len(sigterm) > 0], np.int32))
        return bool(np.any(flags))

    last_logged = start_step
    step = start_step

    # skip_nonfinite_steps: how many updates were skipped, in all and in a row.
    skipped = {'total': 0, 'streak': 0}
    max_skipped = config.get('skip_nonfinite_steps', 0)

    def last_good() -> str:
        kept = checkpointer.latest_step()
        return f'the last good checkpoint is step {kept}' if kept else 'there is no checkpoint yet'

    def count_skipped(host: list[dict]) -> list[dict]:
        """Counts the skipped steps among `host` (the steps since the last log row); returns
        the others. Raises once more than `skip_nonfinite_steps` were skipped in a row."""
        for i, h in enumerate(host):
            if not h['skipped']:
                skipped['streak'] = 0
                continue
            skipped['total'] += 1
            skipped['streak'] += 1
            logging.warning(
                'step %d: non-finite loss or gradient norm, update skipped', last_logged + i + 1
            )
            if skipped['streak'] > max_skipped:
                raise NonFiniteLossError(
                    f'{skipped["streak"]} steps in a row up to step {last_logged + i + 1} had a '
                    'non-finite loss or gradient norm '
                    f'(skip_nonfinite_steps={max_skipped}); {last_good()}. '
                    'Lower learning_rate, raise warmup_steps or check the data'
                )
        return [h for h in host if not h['skipped']]

    loss_start = []  # the loss of the first step of this start of the run

    def check_loss_rise(steps: str, step: int, loss: float | None, first: float | None):
        """Warns once when a train row's loss is more than twice (and 1 nat above) the loss
        of the first step of this start of the run (computed before its update): a
        diverging run, not noise."""
        if loss is None or 'loss_rose_step' in health:
            return
        if not loss_start:
            if first is None or not np.isfinite(first):  # every step skipped: no start yet
                return
            loss_start.append(float(first))
        if loss > 2 * loss_start[0] and loss > loss_start[0] + 1.0:
            health['loss_rose_step'] = step
            logging.warning('%s', loss_rise_message(config, steps, loss, loss_start[0]))

    def flush_metrics(step: int) -> None:
        nonlocal pending, last_logged
        if not pending:
            return
        watchdog.phase = f'waiting for steps {last_logged + 1}-{step} to finish (their metrics)'
        host = jax.device_get(pending)
        if max_skipped:
            host = count_skipped(host) or [
                {k: v for k, v in host[-1].items() if k in ('learning_rate', 'skipped')}
            ]
        rows = {k: float(np.mean([h[k] for h in host])) for k in host[0]}
        if max_skipped:
            rows.pop('skipped')
            rows['skipped_steps'] = float(skipped['total'])  # by this start of the run
        # A non-finite gradient norm stops the run like a non-finite loss: its update has
        # already made the parameters NaN, and no checkpoint may save them.
        for i, h in enumerate(host):
            what = [k for k in ('loss', 'grad_norm') if k in h and not np.isfinite(h[k])]
            if what:
                name = 'loss' if what[0] == 'loss' else 'gradient norm'
                raise NonFiniteLossError(
                    f'the {name} became non-finite at step {last_logged + i + 1} (steps '
                    f'{last_logged + 1}-{step} checked); {last_good()}. '
                    'Lower learning_rate, raise warmup_steps or check the data'
                )
        # Training steps only: no eval, save or compile in the interval counts, and a row
        # whose only step is the compiled first one carries no throughput.
        per_step, eta = progress.update(step)
        if per_step is not None:
            rows['examples_per_sec'] = config.batch_size / per_step
            if task.tokens_per_example:
                rows['tokens_per_sec'] = config.batch_size * task.tokens_per_example / per_step
            rows['step_time_ms'] = per_step * 1e3
            if peak and task.flops_per_step:
                rows['mfu'] = task.flops_per_step / per_step / (peak * jax.device_count())
        writer.write(step, 'train', rows)
        progress.log(step, rows, eta)
        check_loss_rise(f'{last_logged + 1}-{step}', step, rows.get('loss'), host[0].get('loss'))
        pending, last_logged = [], step

    compiling = watchdog_lib.CompileListener(compile_began, compile_ended)
    try:
        for step in range(start_step + 1, config.total_steps + 1):
            watchdog.phase = f'reading the batch of step {step}'
            batch = stepper.put_batch(next(train_iter))
            watchdog.phase = f'running step {step}'
            if step == start_step + 1:
                # Compiling happens in the dispatch: left out of the watchdog and the
                # throughput (this step is not timed); its execution is guarded.
                with paused('compiling the train step'):
                    state, metrics = stepper.train(state, batch, dropout_rng)
                jax.block_until_ready(metrics)
                progress.start(step)
                logging.info('first step done (compiled) after %.1fs', time.time() - started)
            else:
                state, metrics = stepper.train(state, batch, dropout_rng)
            pending.append(metrics)
            watchdog.ping()
            due_eval = step % config.eval_every == 0 or step == config.total_steps
            due_save = step % config.checkpoint_every == 0 or step == config.total_steps
            boundary = step % config.log_every == 0 or due_save or due_eval
            preempted = agreed_preemption(boundary)
            if boundary or preempted:
                flush_metrics(step)  # also guards checkpoints against a non-finite state
            if due_eval:
                run_eval(step)
                early_stopped = stop_early(step)
            if due_save or preempted or early_stopped:
                with paused(f'saving the checkpoint of step {step}'):
                    checkpointer.save(
                        step,
                        stepper.get_state(state),
                        train_iter,
                        config,
                        force=bool(preempted) or early_stopped or step == config.total_steps,
                        metrics=eval_history[-1]
                        if eval_history and eval_history[-1]['step'] == step
                        else None,
                    )
            if early_stopped:
                best = best_so_far()
                logging.info(
                    'early stopping at step %d: %s has not improved for %d evals (best %.4f '
                    'at step %d)',
                    step,
                    task.metric,
                    patience,
                    best[task.metric],
                    best['step'],
                )
                break
            if preempted:
                logging.warning('SIGTERM: saved step %d; exiting to be restarted', step)
                break
    finally:
        compiling.close()
        watchdog.stop()
        checkpointer.close()
        best_checkpoint = checkpointer.best_step()
        signal.signal(signal.SIGTERM, previous_handler)
        if hasattr(train_iter, 'close'):
            train_iter.close()
        task.close()

    completed = not preempted and (step == config.total_steps or early_stopped)
    # The test split, once, on the checkpoint validation selected (nothing read it before).
    test_figures = {}
    if completed and task.test is not None:
        selected = best_checkpoint if best_checkpoint is not None else latest_kept_step(workdir)
        test_figures = score_test(run, config, workdir, writer, selected)

    summary = {
        'stage': stage,
        'task': task.name,
        'steps': int(step),
        'completed': completed,
        'early_stopped': early_stopped,
        'num_params': num_params,
        'flops_per_step': task.flops_per_step,
        'wall_time_sec': time.time() - started,
    }
    if eval_history:
        final = eval_history[-1]
        best = max(eval_history, key=lambda r: r.get(task.metric, -np.inf))
        summary.update({f'final_{k}': v for k, v in final.items() if k != 'step'})
        summary.update({f'best_{task.metric}': best.get(task.metric), 'best_step': best['step']})
        summary['best_checkpoint_step'] = best_checkpoint
        summary.update(task.summary_extras(final))
    summary.update(test_figures)
    collapsed = collapsed_since(eval_history) if completed else None  # judged at the end
    if collapsed is not None:
        health['collapsed_step'] = collapsed
        logging.warning('%s', collapse_message(config, collapsed, eval_history[-1]['step']))
    summary.update(health)
    if not preempted:
        writer.write_summary(summary)
    writer.close()
    return summary


def _kept_steps(workdir: str) -> list[int]:
    directory = os.path.join(workdir, 'checkpoints')
    kept = ckpt_lib.saved_steps(directory)
    if not kept:
        raise ckpt_lib.CheckpointError(
            f'no checkpoint in {directory}: train first (python launch.py finetune ...)'
        )
    return kept


def latest_kept_step(workdir: str) -> int:
    return _kept_steps(workdir)[-1]


def best_kept_step(workdir: str, metric: str) -> int:
    """The kept checkpoint whose eval (validation) row scored highest on `metric`
    (metrics.jsonl; the later one of a tie, as the Checkpointer keeps it), or the latest
    kept one when none of them has an eval row."""
    kept = _kept_steps(workdir)
    rows = [
        r
        for r in metrics_lib.read_metrics(workdir)
        if r['split'] == 'eval' and r['step'] in kept and metric in r
    ]
    if not rows:
        return kept[-1]
    return max(rows, key=lambda r: (r[metric], r['step']))['step']


def _rate_advice(config) -> str:
    """The likely cause of a collapsed or diverging run, and the flags to change."""
    if config.get('init_from'):
        start = f'from the pretrained encoder of {config.init_from}'
        text = not config.model.get('patch_size')
        row = recipe.recipe_for(config.model.hidden_size).learning_rate if text else 0.0
        lower = (
            f"{row:g}, the recipe's for this encoder"
            if 0 < row < config.learning_rate
            else f'{config.learning_rate / 10:g}'
        )
    else:
        start, lower = 'from scratch', f'{config.learning_rate / 10:g}'
    return (
        f'This run starts {start} at learning_rate={config.learning_rate:g}; the likely cause '
        f'is a rate too high for that start (or, from scratch, too few steps): rerun with a '
        f'lower --config.learning_rate (e.g. {lower}) or a longer --config.warmup_steps'
    )


def collapsed_since(eval_history: list[dict]) -> int | None:
    """The step from which every eval to the last one predicted a single class (a
    classifier that ends as a constant), or None. The step-0 eval is left out: a new head
    predicts one class by construction (zero-initialised), and so may the first evals of
    a healthy run from scratch; what counts is where the run ends."""
    since = None
    for row in reversed(eval_history):
        if row['step'] == 0 or row.get('predicted_classes') != 1:
            break
        since = row['step']
    return since


def collapse_message(config, since: int, last: int) -> str:
    """The warning for a run whose validation predictions end as all one class."""
    return (
        f'collapse: every validation prediction is one class (the model predicts a '
        f'constant) at every eval from step {since} to step {last}. {_rate_advice(config)}. '
        'summary.json records it as collapsed_step.'
    )


def loss_rise_message(config, steps: str, loss: float, start: float) -> str:
    """The warning for a training loss far above where the run started."""
    return (
        f'loss rose: the training loss of steps {steps} is {loss:.4g}, more than twice its '
        f'{start:.4g} at the start of this run. {_rate_advice(config)}. summary.json records '
        'it as loss_rose_step.'
    )


def checkpoint_params(run: RunSetup, workdir: str, step: int, parallelism: str):
    """The params of checkpoint `step` of `workdir`, placed for `run.stepper`."""
    task = run.task
    abstract = state_lib.abstract_state(
        task.init_params, run.tx, run.mesh, run.init_rng, run.shardings
    )
    path = os.path.join(workdir, 'checkpoints', str(step))
    params, _ = ckpt_lib.restore_params(path, abstract.params)
    if parallelism == 'pmap':
        params = run.stepper.put_state(state_lib.TrainState(jnp.zeros(()), params, None)).params
    return params


def score_test(run: RunSetup, config, workdir: str, writer, step: int) -> dict:
    """The end of a run whose task has a test split: checkpoint `step`, the one validation
    selected, scored once on the test split (built, and read, only now); writes the
    `{"split": "test"}` row and returns the summary's `test_<metric>` and `test_step`."""
    params = checkpoint_params(run, workdir, step, config.parallelism)
    result = run.task.test().evaluate(run.stepper, params)
    writer.write(step, 'test', result)
    logging.info(
        'test: checkpoint %d | %s', step, ' | '.join(f'{k} {v:.4f}' for k, v in result.items())
    )
    return {**{f'test_{k}': v for k, v in result.items()}, 'test_step': step}


EVALUATE_SPLITS = ('test', 'validation')


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, workdir: str, stage: str = 'finetune'
) -> dict:
    """Scores the validation-selected checkpoint of the run in `workdir` (the kept one
    best on its eval rows) on the test split, or on the validation split with
    `eval.evaluate_split=validation` (or when the task has no test split); writes
    WORKDIR/evaluation.json, naming the split, and, where the task can,
    WORKDIR/predictions.jsonl of that split."""
    module = task_module(config, stage)
    follow_start(config)
    config_lib.check_common(config)
    module.check_config(config)
    if not os.path.isfile(os.path.join(workdir, 'config.json')):
        raise config_lib.ConfigError(
            f'{workdir} holds no run (no config.json); give the --workdir of a {stage} run'
        )
    mesh, batch_shards = make_mesh(config)
    config_lib.check_batch_layout(config, jax.device_count(), batch_shards, jax.process_count())
    runtime = Runtime(
        mesh=mesh,
        parallelism=config.parallelism,
        per_host_batch=config.batch_size // jax.process_count(),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        data_shards=jax.process_count(),  # the training stream is built but not read
    )
    task = module.build(config, workdir, runtime)
    tx, schedule = optim.make_optimizer(config)
    rng = jax.random.key(config.seed)
    shardings = state_lib.state_shardings(task.init_params, tx, mesh, rng)
    if config.parallelism == 'pmap':
        stepper = step_lib.PmapStepper(task.loss_fn, tx, schedule, 1)
    else:
        stepper = step_lib.JitStepper(mesh, shardings, task.loss_fn, tx, schedule, 1)
    run = RunSetup(mesh, task, tx, rng, rng, shardings, stepper)
    step = best_kept_step(workdir, task.metric)
    params = checkpoint_params(run, workdir, step, config.parallelism)

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
