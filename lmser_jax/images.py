"""PNG picture grids of images in [0, 1]."""

import os

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Float images in [0, 1] (values outside are clipped) to uint8."""
  return np.round(np.clip(np.asarray(images, np.float32), 0.0, 1.0) *
                  255.0).astype(np.uint8)


def grid(images: np.ndarray, columns: int, padding: int = 2) -> np.ndarray:
  """Tile images `(N, H, W, C)` row-major into one `(rows*H', columns*W', C)` array.

  Cells are separated by `padding` pixels of white; empty cells stay white.
  """
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"expected images of shape (N, H, W, C), got {images.shape}")
  count, height, width, channels = images.shape
  rows = -(-count // columns)
  cell_h, cell_w = height + padding, width + padding
  canvas = np.ones((rows * cell_h + padding, columns * cell_w + padding,
                    channels), images.dtype)
  if images.dtype == np.uint8:
    canvas *= 255
  for index, image in enumerate(images):
    row, column = divmod(index, columns)
    top, left = padding + row * cell_h, padding + column * cell_w
    canvas[top:top + height, left:left + width] = image
  return canvas


def save_grid(path: str, images: np.ndarray, columns: int, scale: int = 1):
  """Write images `(N, H, W, C)` in [0, 1] as one PNG grid at `path`.

  `scale` enlarges every pixel to a `scale x scale` block, for small images.
  The file is written under a temporary name and renamed, so a reader never
  sees half a picture.
  """
  canvas = grid(to_uint8(images), columns)
  if scale > 1:
    canvas = canvas.repeat(scale, axis=0).repeat(scale, axis=1)
  if canvas.shape[-1] == 1:
    canvas = canvas[..., 0]
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  temporary = path + ".tmp"
  Image.fromarray(canvas).save(temporary, format="PNG")
  os.replace(temporary, path)
