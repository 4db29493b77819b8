"""Data parallelism with `jax.sharding`: one mesh axis over every device.

Parameters and optimiser state are replicated; batches are split along their
leading axis. XLA inserts the gradient all-reduce, so a step on N devices
computes the same update as on one device, up to float summation order.

In a multi-process run the mesh spans the devices of every process, ordered
by process, so the devices of process `p` of `P` store the contiguous rows
`[p * B / P, (p + 1) * B / P)` of every global batch of `B` rows. Each
process passes only those rows to `put_batch`.
"""

import itertools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def create_mesh(devices=None) -> Mesh:
  """Build a 1D mesh named `data` over `devices` (default: all devices).

  The devices are ordered by process (stably, so one process keeps the
  order it was given), which makes each process's rows of a batch one
  contiguous block.
  """
  devices = jax.devices() if devices is None else list(devices)
  devices = sorted(devices, key=lambda device: device.process_index)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def process_layout(mesh: Mesh) -> tuple[int, int]:
  """`(index, count)`: this process's block of batch rows, and the blocks.

  `count` is the number of processes with devices in `mesh` and `index` is
  this process's position among them, so this process feeds rows
  `batches.process_rows(batch_size, index, count)` of every batch.

  Raises:
    ValueError: this process has no device in `mesh`, or the processes'
      devices are interleaved along the mesh or unequal in number, so that
      no process holds one contiguous block of rows. `create_mesh` builds
      meshes without these problems.
  """
  owners = [device.process_index for device in mesh.devices.flat]
  blocks = [(owner, len(list(run))) for owner, run in itertools.groupby(owners)]
  processes = [owner for owner, _ in blocks]
  if len(set(processes)) != len(processes) or len(
      {size for _, size in blocks}) != 1:
    raise ValueError(
        f"the mesh interleaves the devices of processes {sorted(set(owners))}"
        " or gives them unequal numbers of devices; build it with"
        " parallel.create_mesh so that each process holds one contiguous"
        " block of every batch")
  if jax.process_index() not in processes:
    raise ValueError(
        f"process {jax.process_index()} has no device in the mesh (its"
        f" devices belong to processes {processes})")
  return processes.index(jax.process_index()), len(processes)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Split the leading (batch) axis across the mesh."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
  """Return a sharding that keeps the leading (step) axis whole and splits axis 1."""
  return NamedSharding(mesh, PartitionSpec(None, DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, flag: str = "batch_size"):
  """Raise ValueError unless `batch_size` splits evenly over the devices."""
  num_devices = mesh.devices.size
  if batch_size < 1 or batch_size % num_devices:
    raise ValueError(
        f"--{flag}={batch_size} is invalid: it must be a positive multiple of"
        f" the number of devices ({num_devices})")


def put_batch(batch: dict, mesh: Mesh) -> dict:
  """Assemble a global batch split over the mesh from this process's rows.

  Args:
    batch: dict of numpy arrays `(B / P, ...)` with this process's block of
      rows of a global batch of `B` rows, from `P` processes (see
      `process_layout`). With one process that is the whole batch.
    mesh: the devices of all processes.

  Returns:
    The same keys as `jax.Array`s `(B, ...)` split along the batch axis.
  """
  return jax.make_array_from_process_local_data(batch_sharding(mesh), batch)


def put_stacked_batches(batches: dict, mesh: Mesh) -> dict:
  """Assemble global batches stacked along a leading step axis, as `put_batch` does.

  Args:
    batches: dict of numpy arrays `(S, B / P, ...)`: this process's rows of
      `S` global batches.
    mesh: the devices of all processes.

  Returns:
    The same keys as `jax.Array`s `(S, B, ...)` split along axis 1.
  """
  return jax.make_array_from_process_local_data(stacked_batch_sharding(mesh),
                                                batches)
