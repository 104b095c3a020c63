"""Multi-host start-up: `jax.distributed.initialize` from flags, or automatically on TPU pods
and under SLURM."""

import os

import jax
from absl import logging


def _auto_cluster() -> bool:
    """True where JAX can find the coordinator itself: a TPU pod slice or a SLURM job of
    several tasks."""
    if int(os.environ.get('SLURM_NTASKS', '1')) > 1 and 'SLURM_JOB_ID' in os.environ:
        return True
    hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
    return ',' in hosts


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Starts jax.distributed when this is a multi-process run; a no-op otherwise."""
    explicit = coordinator_address is not None
    if not explicit and not _auto_cluster():
        return
    if jax.config.jax_platforms in (None, '', 'cpu') and os.environ.get('JAX_PLATFORMS') == 'cpu':
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    if explicit:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    else:
        jax.distributed.initialize()
    logging.info(
        'jax.distributed: process %d of %d, %d local / %d global devices',
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
