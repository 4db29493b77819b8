"""Occlusion masks for associative recall: which pixels the network observes.

A mask is float32 `(B, H, W, 1)` with 1 on observed pixels and 0 on hidden
ones, and it broadcasts over colour channels. Fixed masks are the same for
every image. A random block is drawn per image from a numpy generator, so a
given seed always hides the same blocks.

Face masks assume the aligned CelebA centre crop (`lmser_jax.data.celeba`),
where the eyes lie on rows 24 to 40 of 64 at every image size.
"""

import numpy as np

FACE_MASKS = ("eyes", "center", "random_block", "lower_half")
DIGIT_MASKS = ("lower_half", "random_block")
MASKS = ("eyes", "center", "random_block", "lower_half")

# Rows of the eye band as fractions of the crop height: rows 24 to 40 of 64.
_EYE_ROWS = (24 / 64, 40 / 64)


def _observed(batch: int, height: int, width: int) -> np.ndarray:
  return np.ones((batch, height, width, 1), np.float32)


def eye_band(batch: int, height: int, width: int) -> np.ndarray:
  """Hide a full-width band over the eyes (rows 24 to 40 of a 64-row face)."""
  mask = _observed(batch, height, width)
  top, bottom = (int(round(f * height)) for f in _EYE_ROWS)
  mask[:, top:bottom] = 0
  return mask


def central_square(batch: int, height: int, width: int) -> np.ndarray:
  """Hide the central square of half the image's height and width."""
  mask = _observed(batch, height, width)
  top, left = height // 4, width // 4
  mask[:, top:top + height // 2, left:left + width // 2] = 0
  return mask


def lower_half(batch: int, height: int, width: int) -> np.ndarray:
  """Hide the lower half of the rows."""
  mask = _observed(batch, height, width)
  mask[:, height // 2:] = 0
  return mask


def random_block(batch: int, height: int, width: int,
                 rng: np.random.Generator) -> np.ndarray:
  """Hide one block of half the height and width per image, anywhere inside it."""
  mask = _observed(batch, height, width)
  block_h, block_w = height // 2, width // 2
  tops = rng.integers(0, height - block_h + 1, size=batch)
  lefts = rng.integers(0, width - block_w + 1, size=batch)
  for row, (top, left) in enumerate(zip(tops, lefts)):
    mask[row, top:top + block_h, left:left + block_w] = 0
  return mask


def make_mask(name: str, batch: int, height: int, width: int,
              rng: np.random.Generator | None = None) -> np.ndarray:
  """Mask `name` (one of `MASKS`) for a batch: float32 `(B, H, W, 1)`, 1 = observed.

  Args:
    name: "eyes", "center", "random_block" or "lower_half".
    batch, height, width: the shape of the batch of images.
    rng: generator for "random_block" (required for it, unused otherwise).

  Raises:
    ValueError: unknown name, or "random_block" without `rng`.
  """
  if name == "eyes":
    return eye_band(batch, height, width)
  if name == "center":
    return central_square(batch, height, width)
  if name == "lower_half":
    return lower_half(batch, height, width)
  if name == "random_block":
    if rng is None:
      raise ValueError("the random_block mask needs a numpy Generator `rng`")
    return random_block(batch, height, width, rng)
  raise ValueError(f"mask {name!r} is unknown; expected one of {MASKS}")
