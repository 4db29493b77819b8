"""MNIST and Fashion-MNIST splits as NumPy arrays.

Both datasets have the same layout: 28x28 grayscale uint8 images with 0 as
background, integer labels 0..9, 60,000 training and 10,000 test examples.
`load_split` reads them from a folder of IDX files, or through
tensorflow-datasets when no folder is given.
"""

import dataclasses
import os
import pathlib

import numpy as np

from lmser_jax.data.idx import DataError
from lmser_jax.data.idx import read_idx

DATASETS = ("mnist", "fashion_mnist")
SPLITS = ("train", "test")

NUM_CLASSES = 10
IMAGE_SIZE = 28

# The original archives name the test split "t10k".
_FILE_PREFIX_BY_SPLIT = {"train": "train", "test": "t10k"}


# eq=False because the generated __eq__ and __hash__ would compare and hash
# the arrays, which raises for NumPy arrays.
@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """One split of MNIST or Fashion-MNIST.

  Attributes:
    images: (N, 28, 28, 1) uint8, 0 is background and 255 is full ink.
    labels: (N,) int32 class ids in [0, 10).
  """

  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return self.labels.shape[0]


def _check_choice(kind: str, value: str, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise ValueError(
        f"unknown {kind} {value!r}, expected one of {', '.join(allowed)}")


def _find_idx_file(data_dir: pathlib.Path, stem: str) -> pathlib.Path:
  """Return `stem`.gz if it exists, else `stem` if it exists."""
  candidates = (data_dir / f"{stem}.gz", data_dir / stem)
  for candidate in candidates:
    if candidate.is_file():
      return candidate
  raise DataError(
      f"IDX file not found: neither {candidates[0]} nor {candidates[1]}"
      " exists")


def _check_arrays(
    images: np.ndarray, labels: np.ndarray, images_source: str,
    labels_source: str,
) -> None:
  """Check image size, label range and counts of a loaded split.

  Args:
    images: (N, H, W) or (N, H, W, 1) images.
    labels: (M,) integer labels.
    images_source: file or dataset name that `images` came from, for messages.
    labels_source: file or dataset name that `labels` came from.

  Raises:
    DataError: the images are not 28x28, a label is outside [0, 10), or
      N != M.
  """
  height_width = images.shape[1:3]
  if height_width != (IMAGE_SIZE, IMAGE_SIZE):
    found = "x".join(str(size) for size in height_width)
    raise DataError(
        f"{images_source}: expected {IMAGE_SIZE}x{IMAGE_SIZE} images,"
        f" found {found}")

  if labels.size:
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= NUM_CLASSES:
      bad = low if low < 0 else high
      raise DataError(
          f"{labels_source}: label {bad} out of range, expected labels in"
          f" [0, {NUM_CLASSES})")

  if images.shape[0] != labels.shape[0]:
    raise DataError(
        f"image and label counts differ: {images_source} has"
        f" {images.shape[0]} images, {labels_source} has {labels.shape[0]}"
        " labels")


def load_idx_split(data_dir: str | os.PathLike[str], split: str) -> Split:
  """Load one split from a folder of MNIST-layout IDX files.

  The folder contains `<prefix>-images-idx3-ubyte` and
  `<prefix>-labels-idx1-ubyte`, each gzip-compressed with a `.gz` suffix or
  raw, where the prefix is "train" for the train split and "t10k" for the test
  split. The `.gz` file is used when both forms exist.

  Args:
    data_dir: folder with the IDX files.
    split: "train" or "test".

  Returns:
    The split, with images (N, 28, 28, 1) uint8 and labels (N,) int32.

  Raises:
    ValueError: `split` is not one of SPLITS.
    DataError: `data_dir` is not a directory, a file is missing or invalid,
      the images are not 28x28, a label is 10 or more, or the image and label
      counts differ.
  """
  _check_choice("split", split, SPLITS)
  data_dir = pathlib.Path(data_dir)
  if not data_dir.exists():
    raise DataError(f"data directory not found: {data_dir}")
  if not data_dir.is_dir():
    raise DataError(
        f"{data_dir} is not a directory, expected a folder with IDX files")

  prefix = _FILE_PREFIX_BY_SPLIT[split]
  images_path = _find_idx_file(data_dir, f"{prefix}-images-idx3-ubyte")
  labels_path = _find_idx_file(data_dir, f"{prefix}-labels-idx1-ubyte")
  images = read_idx(images_path, expected_ndim=3)
  labels = read_idx(labels_path, expected_ndim=1)
  _check_arrays(images, labels, str(images_path), str(labels_path))

  return Split(images=images[..., np.newaxis], labels=labels.astype(np.int32))


def _load_tfds_split(name: str, split: str) -> Split:
  """Load a split through tensorflow-datasets, downloading it if needed."""
  # NOTE: this path has not been run against a real tensorflow-datasets
  # download. Tests cover it only through a fake tensorflow_datasets module.
  # tensorflow-datasets is imported here so that loading from a folder works
  # without it. The except clause is broad because the import, the download
  # and the decoding raise many unrelated types (ImportError, OSError,
  # tfds.core.registered.DatasetNotFoundError, TensorFlow errors, ...) and
  # the remedy is the same for all of them.
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    source = tfds.data_source(name, split=split)
    examples = [source[index] for index in range(len(source))]
  except Exception as err:  # pylint: disable=broad-exception-caught
    cause = str(err).splitlines()[0] if str(err) else ""
    raise DataError(
        f"could not load {name} {split} through tensorflow-datasets"
        f" ({type(err).__name__}: {cause}). Pass --data_dir=DIR naming a"
        " folder with the four IDX files, such as train-images-idx3-ubyte.gz"
    ) from err

  source_name = f"tensorflow-datasets {name} {split}"
  images = np.stack([example["image"] for example in examples])
  labels = np.array([example["label"] for example in examples])
  if images.ndim == 3:
    images = images[..., np.newaxis]
  _check_arrays(images, labels, source_name, source_name)
  return Split(
      images=images.astype(np.uint8), labels=labels.astype(np.int32))


def load_split(
    name: str, split: str, data_dir: str | os.PathLike[str] | None = None,
) -> Split:
  """Load a split of MNIST or Fashion-MNIST.

  Args:
    name: "mnist" or "fashion_mnist" (the tensorflow-datasets names).
    split: "train" or "test".
    data_dir: folder with the dataset's IDX files (see `load_idx_split`).
      When given, only that folder is read and tensorflow-datasets is not
      imported, so no network access happens. Both datasets use the same
      file names, so nothing checks that the folder contains `name`.
      When None, the split is loaded through tensorflow-datasets, which
      downloads it on first use.

  Returns:
    The split, with images (N, 28, 28, 1) uint8 and labels (N,) int32.

  Raises:
    ValueError: `name` is not one of DATASETS or `split` not one of SPLITS.
    DataError: the files in `data_dir` are missing or invalid, or, without
      `data_dir`, tensorflow-datasets could not load the split.
  """
  _check_choice("dataset", name, DATASETS)
  _check_choice("split", split, SPLITS)
  if data_dir is not None:
    return load_idx_split(data_dir, split)
  return _load_tfds_split(name, split)
