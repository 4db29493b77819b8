"""Data parallelism with `jax.sharding`: one mesh axis over every device.

Parameters and optimiser state are replicated; batches are split along their
leading axis. XLA inserts the gradient all-reduce, so a step on N devices
computes the same update as on one device, up to float summation order.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def create_mesh(devices=None) -> Mesh:
  """A 1D mesh named `data` over `devices` (default: all devices)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Split the leading (batch) axis across the mesh."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, flag: str = "batch_size"):
  """Raise ValueError unless `batch_size` splits evenly over the devices."""
  num_devices = mesh.devices.size
  if batch_size < 1 or batch_size % num_devices:
    raise ValueError(
        f"--{flag}={batch_size} is invalid: it must be a positive multiple of"
        f" the number of devices ({num_devices})")


def put_batch(batch: dict, mesh: Mesh) -> dict:
  """Place a host batch (dict of numpy arrays) split over the mesh."""
  return jax.device_put(batch, batch_sharding(mesh))
