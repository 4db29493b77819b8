"""Associative recall: complete partly hidden images and measure the completion.

The observed pixels stay clamped to the image. The hidden ones start at a
fill value (zero or the training mean) and are replaced by the
reconstruction after every reflection (`model.perceive(..., observed=)`).
The error is measured on the hidden pixels only.
"""

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lmser_jax import config as config_lib
from lmser_jax import model

# Mask maker: `(batch, height, width, rng) -> float32 (B, H, W, 1)`, 1 = observed.
MaskFn = Callable[[int, int, int, np.random.Generator], np.ndarray]


@functools.partial(jax.jit, static_argnames=("config", "reflections"))
def complete(params, config: config_lib.ModelConfig, x: jax.Array,
             observed: jax.Array, fill: jax.Array, *,
             reflections: int) -> jax.Array:
  """Recall `x` from its observed pixels after each of `reflections` reflections.

  Args:
    params: model parameters.
    config: the model.
    x: float `(B, H, W, C)` images in [0, 1]; only the observed pixels are
      read.
    observed: float `(B, H, W, 1)` or `(B, H, W, C)`, 1 where a pixel is seen.
    fill: float, broadcastable to `(H, W, C)`: the start value of hidden
      pixels.
    reflections: number of reflections `K`.

  Returns:
    float `(K, B, H, W, C)`: after reflection `k`, the observed pixels of
    `x` and the reconstruction `x_hat_k` on the hidden ones.
  """
  if (observed.ndim != x.ndim or observed.shape[:3] != x.shape[:3] or
      observed.shape[3] not in (1, x.shape[3])):
    raise ValueError(
        f"observed has shape {tuple(observed.shape)}; expected"
        f" {tuple(x.shape[:3]) + (1,)} or {tuple(x.shape)} for images of shape"
        f" {tuple(x.shape)}")
  x_in = observed * x + (1 - observed) * fill
  out = model.perceive(params, config, x_in, reflections=reflections,
                       observed=observed, return_states=True)
  return observed * x_in + (1 - observed) * out.states.x_hat


def psnr(mse: float) -> float:
  """Peak signal-to-noise ratio in dB for pixels in [0, 1]: `-10 log10(mse)`."""
  return math.inf if mse <= 0 else -10.0 * math.log10(mse)


def _hidden_error(x: np.ndarray, completion: np.ndarray,
                  observed: np.ndarray) -> tuple[float, float]:
  """Sum of squared errors over hidden pixel values, and their count."""
  hidden = np.broadcast_to(1.0 - observed, x.shape)
  return float(np.sum(hidden * (completion - x) ** 2)), float(hidden.sum())


def batch_masks(mask_fn: MaskFn, start: int, batch: int, height: int,
                width: int, seed: int) -> np.ndarray:
  """Masks for rows `[start, start + batch)` of a test set, the same for any model.

  Random masks are drawn from a generator keyed by `(seed, start)`, so they
  depend only on the rows, not on which model or batch order requests them.
  """
  return mask_fn(batch, height, width, np.random.default_rng([seed, start]))


def evaluate_recall(params, config: config_lib.ModelConfig,
                    images: np.ndarray, mask_fn: MaskFn, fill: np.ndarray, *,
                    reflections: int, batch_size: int = 100,
                    seed: int = 0) -> dict:
  """Error and PSNR of recall on the hidden pixels, after each reflection.

  Args:
    params: model parameters.
    config: the model.
    images: uint8 `(N, H, W, C)` test images (a memory map is fine; it is
      read `batch_size` rows at a time).
    mask_fn: mask maker, see `MaskFn`.
    fill: float32, broadcastable to `(H, W, C)`, start value of hidden
      pixels.
    reflections: largest number of reflections `K` to measure.
    batch_size: images per compiled call.
    seed: seed of random masks.

  Returns:
    `{"mse": [K floats], "psnr": [K floats], "fill_mse": float,
    "fill_psnr": float, "hidden_fraction": float}`. `mse[k - 1]` is the mean
    squared error over every hidden pixel value of every image after `k`
    reflections. `fill_*` is the same measure for the fill value alone
    (no model).
  """
  _, height, width, _ = images.shape
  sums = np.zeros(reflections)
  fill_sum = count = total = 0.0
  fill = np.asarray(fill, np.float32)
  for start in range(0, len(images), batch_size):
    x = np.asarray(images[start:start + batch_size], np.float32) / 255.0
    rows = len(x)
    observed = batch_masks(mask_fn, start, rows, height, width, seed)
    if rows < batch_size:
      # Pad to a full batch so that one compiled program serves every batch.
      pad = batch_size - rows
      x_run = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
      observed_run = np.concatenate(
          [observed, np.ones((pad,) + observed.shape[1:], observed.dtype)])
    else:
      x_run, observed_run = x, observed
    completions = np.asarray(complete(params, config, x_run, observed_run,
                                      fill, reflections=reflections))[:, :rows]
    for k in range(reflections):
      sums[k] += _hidden_error(x, completions[k], observed)[0]
    fill_error, hidden = _hidden_error(
        x, observed * x + (1 - observed) * fill, observed)
    fill_sum += fill_error
    count += hidden
    total += x.size
  mse = [float(s / count) for s in sums]
  return {
      "mse": mse,
      "psnr": [psnr(m) for m in mse],
      "fill_mse": float(fill_sum / count),
      "fill_psnr": psnr(fill_sum / count),
      "hidden_fraction": float(count / total),
  }
