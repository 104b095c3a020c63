"""The memory plan of a run, without training:

  python launch.py pretrain --config configs/bert_mlm.py:tiny --workdir DIR --dry_run

builds the run as the trainer does (config checks, mesh, task, optimizer, state shardings),
compiles the train step ahead of time for the configured mesh on abstract inputs, and
reports what one device holds: parameters and optimizer state (exact, from the state's
shardings), the step's arguments, outputs, temporaries (activations) and code (XLA's
memory analysis), and the FLOPs of one step (XLA's cost analysis and the task's analytic
figure). It prints a table and writes WORKDIR/memory_plan.json; it writes no config.json,
checkpoints or metrics, so the workdir stays free for a run of any config.
"""

import json
import os
import shutil

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from core import sharding as sharding_lib
from core import train_state as state_lib
from core import trainer
from core.files import atomic_write

PLAN_FILE = 'memory_plan.json'
# Where the task writes what it derives from the data (vocab.txt, labels.json) during the
# plan, so that none of it is left in the workdir for a later run to pick up.
SCRATCH_DIR = 'memory_plan_scratch'


def shard_bytes(x: jax.ShapeDtypeStruct) -> int:
    """Bytes of one device's shard of `x`, as its NamedSharding cuts it."""
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    return int(np.prod(shape, dtype=np.int64)) * x.dtype.itemsize


def tree_bytes(tree) -> tuple[int, int]:
    """(bytes per device, bytes in all) of a tree of sharded ShapeDtypeStructs."""
    leaves = jax.tree.leaves(tree)
    per_device = sum(shard_bytes(x) for x in leaves)
    total = sum(int(np.prod(x.shape, dtype=np.int64)) * x.dtype.itemsize for x in leaves)
    return per_device, total


def abstract_batch(local_batch: dict, mesh: jax.sharding.Mesh) -> dict:
    """The global batch the step sees, as ShapeDtypeStructs with the batch sharding: each
    process feeds its slice of the leading (batch) dimension (sharding.global_batch)."""
    sharding = sharding_lib.batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            (x.shape[0] * jax.process_count(), *x.shape[1:]), x.dtype, sharding=sharding
        ),
        local_batch,
    )


def _first_batch(task) -> dict:
    """One host-local batch of the training stream (its shapes), then the stream closed."""
    try:
        return next(task.train_iter)
    finally:
        if hasattr(task.train_iter, 'close'):
            task.train_iter.close()
        task.close()


def _jit_config(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, str]:
    """The config to plan and a note: pmap is planned as the jit layout with the same
    per-device state (replicated, the batch split over every device)."""
    if config.parallelism != 'pmap':
        return config, ''
    trainer.make_mesh(config)  # pmap's own checks (data parallel only)
    config = config.copy_and_resolve_references()
    config.parallelism = 'jit'
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
    note = (
        'the memory plan is for parallelism=jit: planned as jit with mesh data=-1 (state '
        'replicated, the batch split over every device), the per-device layout of pmap'
    )
    return config, note


def make_plan(config: ml_collections.ConfigDict, workdir: str, stage: str) -> dict:
    """Builds the run, compiles its train step for the mesh and returns the plan (every
    process takes part: building the run and compiling are collective)."""
    config, note = _jit_config(config)
    scratch = os.path.join(workdir, SCRATCH_DIR)
    if jax.process_index() == 0:
        shutil.rmtree(scratch, ignore_errors=True)  # a plan stopped half-way left it
    try:
        run = trainer.set_up(config, workdir, stage, write_config=False, build_dir=scratch)
        batch = abstract_batch(_first_batch(run.task), run.mesh)
        state = state_lib.abstract_state(
            run.task.init_params, run.tx, run.mesh, run.init_rng, run.shardings
        )
        compiled = run.stepper.lower_train(state, batch, run.dropout_rng).compile()
        if jax.process_count() > 1:  # every process has read the scratch files
            multihost_utils.sync_global_devices('memory_plan')
    finally:
        if jax.process_index() == 0:
            shutil.rmtree(scratch, ignore_errors=True)
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older jax: one dict per device program
        cost = cost[0]

    params, params_all = tree_bytes(state.params)
    opt, opt_all = tree_bytes(state.opt_state)
    batch_bytes, _ = tree_bytes(batch)
    per_device = {
        'params': params,
        'opt_state': opt,
        'state': tree_bytes(state)[0],
        'batch': batch_bytes,
        'arguments': memory.argument_size_in_bytes,
        'outputs': memory.output_size_in_bytes,
        'aliased': memory.alias_size_in_bytes,  # outputs written into donated arguments
        'temp': memory.temp_size_in_bytes,  # activations and other temporaries
        'generated_code': memory.generated_code_size_in_bytes,
    }
    per_device['peak_estimate'] = (
        per_device['arguments']
        + per_device['outputs']
        - per_device['aliased']
        + per_device['temp']
        + per_device['generated_code']
    )
    xla_peak = getattr(memory, 'peak_memory_in_bytes', 0)
    if xla_peak and jax.default_backend() != 'cpu':  # CPU's figure leaves temporaries out
        per_device['xla_peak'] = int(xla_peak)
    xla_flops = float(cost.get('flops', 0.0)) if cost else 0.0
    return {
        'stage': stage,
        'task': run.task.name,
        'parallelism': config.parallelism,
        'note': note,
        'mesh': {k: int(v) for k, v in run.mesh.shape.items()},
        'devices': jax.device_count(),
        'processes': jax.process_count(),
        'device_kind': jax.devices()[0].device_kind,
        'batch_size': config.batch_size,
        'grad_accum_steps': config.grad_accum_steps,
        'precision': config.precision,
        'batch': {
            jax.tree_util.keystr(path, simple=True, separator='/'): f'{x.dtype}{list(x.shape)}'
            for path, x in jax.tree_util.tree_leaves_with_path(batch)
        },
        'num_params': state_lib.count_params(state.params),
        'per_device_bytes': {k: int(v) for k, v in per_device.items()},
        'total_bytes': {'params': params_all, 'opt_state': opt_all},
        'flops': {
            'xla_per_device': xla_flops,  # the partitioned program of one device
            'xla_all_devices': xla_flops * jax.device_count(),
            'analytic_per_step': float(run.task.flops_per_step or 0.0),  # model matmuls
        },
    }


def _mib(n: float) -> str:
    return f'{n / 2**20:,.2f} MiB'


def format_plan(plan: dict) -> str:
    """The plan as a readable table."""
    b = plan['per_device_bytes']
    rows = [
        ('parameters', b['params']),
        ('optimizer state', b['opt_state']),
        ('train state (params + optimizer + step)', b['state']),
        ('batch', b['batch']),
        ('step arguments (state + batch + rng)', b['arguments']),
        ('step outputs', b['outputs']),
        ('outputs aliased to donated arguments', b['aliased']),
        ('activations / temporaries', b['temp']),
        ('generated code', b['generated_code']),
        ('peak estimate (args + outputs - aliased + temp + code)', b['peak_estimate']),
    ]
    if 'xla_peak' in b:
        rows.append(('peak (XLA)', b['xla_peak']))
    flops = plan['flops']
    analytic = flops['analytic_per_step']
    lines = [
        f'memory plan: {plan["stage"]} {plan["task"]}, parallelism {plan["parallelism"]}, '
        f'mesh {plan["mesh"]} ({plan["devices"]} devices {plan["device_kind"]!r}, '
        f'{plan["processes"]} processes)',
    ]
    if plan['note']:
        lines.append(f'note: {plan["note"]}')
    lines += [
        f'batch: {plan["batch_size"]} examples (grad_accum_steps {plan["grad_accum_steps"]}, '
        f'{plan["precision"]}); ' + ', '.join(f'{k} {v}' for k, v in plan['batch'].items()),
        f'parameters: {plan["num_params"]:,} ({_mib(plan["total_bytes"]["params"])} in all; '
        f'optimizer state {_mib(plan["total_bytes"]["opt_state"])} in all)',
        f'{"per device":<56} {"bytes":>15} {"MiB":>12}',
        *(f'  {name:<54} {n:>15,} {n / 2**20:>12,.2f}' for name, n in rows),
        'FLOPs of one train step',
        f'  {"XLA cost analysis, per device":<54} {flops["xla_per_device"]:>15.4g}',
        f'  {"XLA cost analysis, all devices":<54} {flops["xla_all_devices"]:>15.4g}',
        f'  {"analytic (task.flops_per_step, model matmuls)":<54} '
        + (f'{analytic:>15.4g}' if analytic else f'{"unknown":>15}'),
    ]
    return '\n'.join(lines)


def run(config: ml_collections.ConfigDict, workdir: str, stage: str) -> dict:
    """Makes the plan; process 0 prints it and writes WORKDIR/memory_plan.json."""
    plan = make_plan(config, workdir, stage)
    if jax.process_index() == 0:
        path = os.path.join(workdir, PLAN_FILE)
        with atomic_write(path) as f:
            json.dump(plan, f, indent=2)
        print(format_plan(plan))
        print(f'written to {path}', flush=True)
    return plan
