"""The checkpoint validation selected, and the test split scored once on it: at the end of
a run whose task has a test split (`score_test`, core/trainer.py) and in the evaluate stage
(`trainer.evaluate_checkpoint`). Selection reads only eval (validation) rows."""

import os

import jax.numpy as jnp
from absl import logging

from core import checkpoint as ckpt_lib
from core import metrics as metrics_lib
from core import train_state as state_lib


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


def checkpoint_params(run, workdir: str, step: int, parallelism: str):
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


def score_test(run, config, workdir: str, writer, step: int) -> dict:
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
