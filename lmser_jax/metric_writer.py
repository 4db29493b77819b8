"""Scalar metrics as JSON lines, one object per write: `{"step": ..., ...}`."""

import json
import os

import jax
import numpy as np


class JsonlWriter:
  """Append scalars to `path`; only process 0 writes."""

  def __init__(self, path: str):
    self.path = path
    self._enabled = jax.process_index() == 0
    if self._enabled:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

  def drop_after(self, step: int) -> None:
    """Remove the records of steps after `step` (left by an interrupted run)."""
    if not self._enabled or not os.path.exists(self.path):
      return
    with open(self.path, encoding="utf-8") as stream:
      lines = [line for line in stream if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    if len(kept) == len(lines):
      return
    temporary = self.path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as stream:
      stream.writelines(kept)
    os.replace(temporary, self.path)

  def write_scalars(self, step: int, scalars: dict) -> None:
    if not self._enabled:
      return
    record = {"step": int(step)}
    record.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    with open(self.path, "a", encoding="utf-8") as stream:
      stream.write(json.dumps(record) + "\n")
