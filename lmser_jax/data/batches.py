"""Deterministic batches from in-memory arrays, for training and evaluation.

The order of training examples is a pure function of `(seed, step)`: epoch
`e` visits the examples in `numpy.random.default_rng([seed, e])`'s
permutation and drops its last partial batch. A resumed run therefore sees
exactly the batches that an uninterrupted run would have seen.
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


def batch_indices(seed: int, step: int, num_examples: int,
                  batch_size: int) -> np.ndarray:
  """Indices `(batch_size,)` of the examples of training step `step` (0-based)."""
  per_epoch = steps_per_epoch(num_examples, batch_size)
  epoch, position = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return np.sort(order[position * batch_size:(position + 1) * batch_size])


def train_batches(images: np.ndarray, labels: np.ndarray, *, batch_size: int,
                  seed: int, start_step: int = 0) -> Iterator[dict]:
  """Yield training batches from step `start_step` on, forever.

  Args:
    images: `(N, H, W, C)` uint8.
    labels: `(N,)` int32.
    batch_size: examples per batch.
    seed: fixes the order of every epoch.
    start_step: the step of the first batch (for resuming).

  Yields:
    dicts with `image` `(batch_size, H, W, C)` uint8 and `label`
    `(batch_size,)` int32.
  """
  num_examples = len(images)
  per_epoch = steps_per_epoch(num_examples, batch_size)
  epoch, position = divmod(start_step, per_epoch)
  while True:
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    for index in range(position, per_epoch):
      chosen = np.sort(order[index * batch_size:(index + 1) * batch_size])
      yield {"image": images[chosen], "label": labels[chosen]}
    epoch, position = epoch + 1, 0


def eval_batches(images: np.ndarray, labels: np.ndarray, *,
                 batch_size: int) -> Iterator[dict]:
  """Yield every example once in order, padding the last batch.

  Yields:
    dicts with `image`, `label` and `weight` `(batch_size,)` float32, which
    is 0 on padding rows; every batch has `batch_size` rows so that one
    compiled evaluation step serves them all.
  """
  num_examples = len(images)
  for start in range(0, num_examples, batch_size):
    stop = min(start + batch_size, num_examples)
    size = stop - start
    weight = np.zeros((batch_size,), np.float32)
    weight[:size] = 1.0
    image = images[start:stop]
    label = labels[start:stop]
    if size < batch_size:
      pad = batch_size - size
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
