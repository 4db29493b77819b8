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

  def write_scalars(self, step: int, scalars: dict) -> None:
    if not self._enabled:
      return
    record = {"step": int(step)}
    record.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    with open(self.path, "a", encoding="utf-8") as stream:
      stream.write(json.dumps(record) + "\n")
