"""Deterministic batches from in-memory arrays, for training and evaluation.

The order of training examples is a pure function of `(seed, step)`: epoch
`e` visits the examples in `numpy.random.default_rng([seed, e])`'s
permutation and drops its last partial batch. A resumed run therefore sees
exactly the batches that an uninterrupted run would have seen.

In a multi-process run every process computes the same global batch indices
and gathers only its own block of rows (`process_rows`), so the processes
together read each example of a batch exactly once.
"""

import queue
import threading
from typing import Iterator

import numpy as np


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  if batch_size > num_examples:
    raise ValueError(
        f"batch size {batch_size} is larger than the {num_examples} training"
        " examples")
  return num_examples // batch_size


def process_rows(batch_size: int, process_index: int,
                 process_count: int) -> slice:
  """Rows `[p * local, (p + 1) * local)` of a global batch that process `p` reads.

  `local = batch_size // process_count`. The blocks of all processes
  partition the batch, in process order.

  Raises:
    ValueError: `process_index` is outside `[0, process_count)`, or
      `batch_size` is not a multiple of `process_count`.
  """
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
        f"process index {process_index} is invalid for {process_count}"
        " processes")
  if batch_size % process_count:
    raise ValueError(
        f"batch size {batch_size} is not a multiple of the {process_count}"
        " processes")
  local = batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


def batch_indices(seed: int, step: int, num_examples: int,
                  batch_size: int) -> np.ndarray:
  """Indices `(batch_size,)` of the examples of training step `step` (0-based)."""
  per_epoch = steps_per_epoch(num_examples, batch_size)
  epoch, position = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return np.sort(order[position * batch_size:(position + 1) * batch_size])


def random_shifts(seed: int, step: int, batch_size: int,
                  max_shift: int) -> np.ndarray:
  """Draw row and column offsets `(batch_size, 2)` int in `[-max_shift, max_shift]`.

  The draw is a pure function of `(seed, step)` and covers the whole global
  batch, so a resumed run and every process of a multi-process run agree.
  """
  rng = np.random.default_rng([seed, step, 1])
  return rng.integers(-max_shift, max_shift + 1, (batch_size, 2))


def shift_images(images: np.ndarray, offsets: np.ndarray) -> np.ndarray:
  """Translate each image by its offset, filling the uncovered pixels with 0.

  Args:
    images: `(B, H, W, C)`, any dtype.
    offsets: `(B, 2)` int, the shift of each image down and right in
      pixels (negative: up and left), each at most `H - 1` and `W - 1`.

  Returns:
    `(B, H, W, C)` of the same dtype: `out[b, i, j] = images[b, i - dy,
    j - dx]` where that pixel exists, else 0.
  """
  _, height, width, _ = images.shape
  limit = int(np.abs(offsets).max()) if len(offsets) else 0
  padded = np.pad(images, ((0, 0), (limit, limit), (limit, limit), (0, 0)))
  out = np.empty_like(images)
  for index, (down, right) in enumerate(offsets):
    top, left = limit - down, limit - right
    out[index] = padded[index, top:top + height, left:left + width]
  return out


def train_batches(images: np.ndarray, labels: np.ndarray, *, batch_size: int,
                  seed: int, start_step: int = 0, process_index: int = 0,
                  process_count: int = 1,
                  max_shift: int = 0) -> Iterator[dict]:
  """Yield this process's rows of the training batches from `start_step` on.

  The batches never end. Row `r` of a global batch is example
  `batch_indices(seed, step, N, batch_size)[r]`.

  Args:
    images: `(N, H, W, C)` uint8.
    labels: `(N,)` int32.
    batch_size: examples per global batch (all processes).
    seed: fixes the order of every epoch.
    start_step: the step of the first batch (for resuming).
    process_index: this process's block of rows, in `[0, process_count)`.
    process_count: the number of processes that share each batch.
    max_shift: with a positive value, each image is translated by a random
      offset of up to this many pixels in each direction (`random_shifts`,
      `shift_images`), a fresh draw at every step; 0 leaves images as they
      are.

  Yields:
    dicts with `image` `(local, H, W, C)` uint8 and `label` `(local,)`
    int32: the rows `process_rows(batch_size, process_index,
    process_count)` of each global batch, `local = batch_size //
    process_count`.
  """
  num_examples = len(images)
  per_epoch = steps_per_epoch(num_examples, batch_size)
  rows = process_rows(batch_size, process_index, process_count)
  epoch, position = divmod(start_step, per_epoch)
  while True:
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    for index in range(position, per_epoch):
      chosen = np.sort(order[index * batch_size:(index + 1) * batch_size])
      chosen = chosen[rows]
      image = images[chosen]
      if max_shift:
        step = epoch * per_epoch + index
        offsets = random_shifts(seed, step, batch_size, max_shift)[rows]
        image = shift_images(image, offsets)
      yield {"image": image, "label": labels[chosen]}
    epoch, position = epoch + 1, 0


def eval_batches(images: np.ndarray, labels: np.ndarray, *,
                 batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict]:
  """Yield this process's rows of batches that visit every example once.

  Global batch `k` contains examples `[k * batch_size, (k + 1) *
  batch_size)` in order, and the rows past the last example are padding. All processes
  yield the same number of batches, also those whose rows are all padding.

  Args:
    images: `(N, H, W, C)` uint8.
    labels: `(N,)` int32.
    batch_size: rows per global batch (all processes).
    process_index: this process's block of rows, in `[0, process_count)`.
    process_count: the number of processes that share each batch.

  Yields:
    dicts with `image`, `label` and `weight` `(local,)` float32, which is 0
    on padding rows, for the rows `process_rows(batch_size, process_index,
    process_count)` of each global batch. Every batch has `local =
    batch_size // process_count` rows, so that one compiled evaluation step
    serves them all.
  """
  num_examples = len(images)
  rows = process_rows(batch_size, process_index, process_count)
  local = rows.stop - rows.start
  for batch_start in range(0, num_examples, batch_size):
    start = min(batch_start + rows.start, num_examples)
    stop = min(batch_start + rows.stop, num_examples)
    size = stop - start
    weight = np.zeros((local,), np.float32)
    weight[:size] = 1.0
    image = images[start:stop]
    label = labels[start:stop]
    if size < local:
      pad = local - size
      image = np.concatenate([image, np.zeros((pad,) + image.shape[1:],
                                              image.dtype)])
      label = np.concatenate([label, np.zeros((pad,), label.dtype)])
    yield {"image": image, "label": label, "weight": weight}


def prefetch(iterator: Iterator, size: int = 2) -> Iterator:
  """Run `iterator` in a background thread, `size` items ahead.

  Overlaps host-side gathering (and any placement done inside `iterator`)
  with the compiled step. Errors raised by `iterator` re-raise in the
  consumer.
  """
  items: queue.Queue = queue.Queue(maxsize=size)
  done = object()
  stop = threading.Event()

  def produce():
    try:
      for item in iterator:
        if stop.is_set():
          return
        items.put(item)
      items.put(done)
    except BaseException as error:  # pylint: disable=broad-except
      items.put(error)

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  try:
    while True:
      item = items.get()
      if item is done:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
