"""Multi-host (multi-process) start-up: every process of a run calls `initialize` before touching a
device, with the same coordinator."""

from __future__ import annotations

import jax
from absl import logging


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Joins this process to the run (`jax.distributed.initialize`).

  On TPU VMs and under SLURM give nothing: JAX finds the coordinator and this process's index
  itself. Elsewhere give all three: `coordinator_address` (`HOST:PORT` of process 0), the
  `num_processes` of the run and this `process_id` in `[0, num_processes)`.
  """
  if coordinator_address is not None and (num_processes is None or process_id is None):
    raise ValueError(f"coordinator_address={coordinator_address!r} needs num_processes and "
                     f"process_id too, got {num_processes!r} and {process_id!r}")
  if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"process_id={process_id} must be in [0, num_processes={num_processes})")
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
  logging.info("process %d of %d, %d local of %d devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
