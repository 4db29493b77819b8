"""Evaluation over a whole split with one compiled, weighted step."""

import functools

import jax
import numpy as np
from jax.sharding import Mesh

from lmser_jax import config as config_lib
from lmser_jax import parallel
from lmser_jax import training
from lmser_jax.data import batches as batches_lib


@functools.lru_cache(maxsize=64)
def _eval_step(config: config_lib.ModelConfig, mesh: Mesh, reflections: int,
               feed_reconstruction: bool):
  return training.make_eval_step(config, mesh, reflections=reflections,
                                 feed_reconstruction=feed_reconstruction)


def evaluate(params, config: config_lib.ModelConfig, images: np.ndarray,
             labels: np.ndarray, *, mesh: Mesh, batch_size: int = 500,
             reflections: int = 1,
             feed_reconstruction: bool = False) -> dict[str, float]:
  """Mean metrics over every example of a split.

  Args:
    params: model parameters (replicated on `mesh`, or host arrays).
    config: the model.
    images: `(N, H, W, C)` uint8.
    labels: `(N,)` int32.
    mesh: devices to split each batch over. In a multi-process run every
      process calls this function with the same arguments and reads only
      its rows of each batch.
    batch_size: a multiple of the device count; the last batch is padded.
    reflections: reflections per perception.
    feed_reconstruction: feed the reconstruction to the input layer from the
      second reflection on, instead of keeping it clamped to the image.

  Returns:
    `mse` (mean over images and pixels of `(x - x_hat)^2`), `recon_loss`
    (mean over images of `0.5 * ||x - x_hat||^2`), and for a supervised
    model `accuracy` and `cross_entropy`; plus `count`, the number of
    examples.
  """
  parallel.check_batch_size(batch_size, mesh, flag="eval_batch_size")
  step = _eval_step(config, mesh, reflections, feed_reconstruction)
  params = jax.device_put(params, parallel.replicated(mesh))
  # Each process gathers only the rows that its own devices hold.
  process_index, process_count = parallel.process_layout(mesh)
  totals = None
  for batch in batches_lib.eval_batches(
      images, labels, batch_size=batch_size, process_index=process_index,
      process_count=process_count):
    sums = step(params, parallel.put_batch(batch, mesh))
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals.pop("count"))
  means = {name: float(value) / count for name, value in totals.items()}
  if "correct" in means:
    means["accuracy"] = means.pop("correct")
  means["count"] = count
  return means
