"""Atomic, resumable checkpoints of the training state with orbax.

Orbax writes each step into a temporary directory
(`<step>.orbax-checkpoint-tmp-<timestamp>`) and renames it when complete, so
a run killed while saving leaves the previous checkpoint intact. Such a
leftover directory never counts as a step, and the next `Checkpointer` on
the same directory deletes it. The manager keeps the latest step plus any
steps named in `keep_steps` (the steps that experiments measure).

Checkpoints do not depend on the topology: a state saved on any number of
devices or processes restores onto any other, placed with the shardings of
the restoring run. In a multi-process run every process calls `save` and
`restore` with the same step; orbax synchronises them and writes every array
once.
"""

import os

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers


class Checkpointer:
  """Save and restore `TrainState`s under one directory, one subfolder a step."""

  def __init__(self, directory: str, keep_steps=(), max_to_keep: int = 1):
    policies = [checkpoint_managers.LatestN(max_to_keep)]
    if keep_steps:
      policies.append(checkpoint_managers.CustomSteps(sorted(set(keep_steps))))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=False,
        create=True,
        cleanup_tmp_directories=True)
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state) -> None:
    """Save `state` as `step`, replacing nothing that exists already."""
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
    self._manager.wait_until_finished()

  def restore(self, step: int, target):
    """Restore `step` into the structure, dtypes and shardings of `target`.

    `target` may be a state of concrete arrays or of
    `jax.ShapeDtypeStruct`s; the result is placed with their shardings, so a
    checkpoint written on any number of devices restores onto this run's.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def close(self) -> None:
    self._manager.close()
