"""Tests for loading MNIST and Fashion-MNIST splits from IDX files and tfds."""

import gzip
import pathlib
import shutil
import sys
import types

import numpy as np
import pytest

from lmser_jax.data import DATASETS
from lmser_jax.data import DataError
from lmser_jax.data import load_idx_split
from lmser_jax.data import load_split
from lmser_jax.data import SPLITS

MNIST_TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974,
                           1009]
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"


def _write_images(path: pathlib.Path, count: int, size: int = 28) -> None:
  header = (0x00000803).to_bytes(4, "big")
  header += b"".join(n.to_bytes(4, "big") for n in (count, size, size))
  path.write_bytes(header + bytes(count * size * size))


def _write_labels(path: pathlib.Path, labels: list[int]) -> None:
  header = (0x00000801).to_bytes(4, "big") + len(labels).to_bytes(4, "big")
  path.write_bytes(header + bytes(labels))


def _message(excinfo: pytest.ExceptionInfo) -> str:
  return str(excinfo.value)


class _TfdsTrap(types.ModuleType):
  """Stand-in for tensorflow_datasets that records every attribute access."""

  def __init__(self):
    super().__init__("tensorflow_datasets")
    self.accessed = []

  def __getattr__(self, name):
    self.accessed.append(name)
    raise AssertionError(f"tensorflow_datasets.{name} was used")


@pytest.mark.parametrize("split, count", [("train", 60000), ("test", 10000)])
def test_mnist_split_shapes(mnist_dir, split, count):
  data = load_split("mnist", split, mnist_dir)

  assert len(data) == count
  assert data.images.shape == (count, 28, 28, 1)
  assert data.images.dtype == np.uint8
  assert data.labels.shape == (count,)
  assert data.labels.dtype == np.int32
  assert data.images.max() == 255


def test_mnist_test_label_counts(mnist_dir):
  data = load_split("mnist", "test", mnist_dir)

  counts = np.bincount(data.labels, minlength=10)

  assert counts.tolist() == MNIST_TEST_LABEL_COUNTS


@pytest.mark.parametrize("split, count", [("train", 60000), ("test", 10000)])
def test_fashion_mnist_split_sizes(fashion_mnist_dir, split, count):
  data = load_split("fashion_mnist", split, fashion_mnist_dir)

  assert len(data) == count
  assert data.images.shape == (count, 28, 28, 1)
  assert set(np.unique(data.labels).tolist()) == set(range(10))


def test_raw_split_equals_gzip(mnist_dir, tmp_path):
  for stem in (TEST_IMAGES, TEST_LABELS):
    compressed = (mnist_dir / f"{stem}.gz").read_bytes()
    (tmp_path / stem).write_bytes(gzip.decompress(compressed))

  from_gzip = load_idx_split(mnist_dir, "test")
  from_raw = load_idx_split(tmp_path, "test")

  np.testing.assert_array_equal(from_raw.images, from_gzip.images)
  np.testing.assert_array_equal(from_raw.labels, from_gzip.labels)


def test_missing_data_dir(tmp_path):
  data_dir = tmp_path / "absent"

  with pytest.raises(DataError) as excinfo:
    load_idx_split(data_dir, "test")

  assert str(data_dir) in _message(excinfo)
  assert "not found" in _message(excinfo)


def test_data_dir_is_file(tmp_path):
  data_dir = tmp_path / "file"
  data_dir.write_bytes(b"")

  with pytest.raises(DataError) as excinfo:
    load_idx_split(data_dir, "test")

  assert str(data_dir) in _message(excinfo)
  assert "not a directory" in _message(excinfo)


def test_missing_file_names_both(tmp_path):
  _write_labels(tmp_path / TEST_LABELS, [0])

  with pytest.raises(DataError) as excinfo:
    load_idx_split(tmp_path, "test")

  assert str(tmp_path / f"{TEST_IMAGES}.gz") in _message(excinfo)
  assert str(tmp_path / TEST_IMAGES) in _message(excinfo)
  assert "not found" in _message(excinfo)


def test_count_mismatch(mnist_dir, tmp_path):
  shutil.copy(mnist_dir / f"{TEST_IMAGES}.gz", tmp_path)
  labels_path = tmp_path / TEST_LABELS
  _write_labels(labels_path, [1] * 9999)

  with pytest.raises(DataError) as excinfo:
    load_idx_split(tmp_path, "test")

  assert str(tmp_path / f"{TEST_IMAGES}.gz") in _message(excinfo)
  assert str(labels_path) in _message(excinfo)
  assert "counts differ" in _message(excinfo)
  assert "10000 images" in _message(excinfo)
  assert "9999 labels" in _message(excinfo)


def test_label_out_of_range(tmp_path):
  _write_images(tmp_path / TEST_IMAGES, 3)
  labels_path = tmp_path / TEST_LABELS
  _write_labels(labels_path, [0, 10, 9])

  with pytest.raises(DataError) as excinfo:
    load_idx_split(tmp_path, "test")

  assert str(labels_path) in _message(excinfo)
  assert "label 10 out of range" in _message(excinfo)


def test_wrong_image_size(tmp_path):
  images_path = tmp_path / TEST_IMAGES
  _write_images(images_path, 2, size=32)
  _write_labels(tmp_path / TEST_LABELS, [0, 1])

  with pytest.raises(DataError) as excinfo:
    load_idx_split(tmp_path, "test")

  assert str(images_path) in _message(excinfo)
  assert "expected 28x28 images" in _message(excinfo)
  assert "32x32" in _message(excinfo)


def test_label_file_as_images(tmp_path):
  images_path = tmp_path / TEST_IMAGES
  _write_labels(images_path, [0, 1])
  _write_labels(tmp_path / TEST_LABELS, [0, 1])

  with pytest.raises(DataError) as excinfo:
    load_idx_split(tmp_path, "test")

  assert str(images_path) in _message(excinfo)
  assert "expected an image file (magic 0x00000803)" in _message(excinfo)


def test_gzip_preferred_over_raw(mnist_dir, tmp_path):
  shutil.copy(mnist_dir / f"{TEST_IMAGES}.gz", tmp_path)
  shutil.copy(mnist_dir / f"{TEST_LABELS}.gz", tmp_path)
  # Invalid raw files next to the gzip ones must not be read.
  (tmp_path / TEST_IMAGES).write_bytes(b"")
  (tmp_path / TEST_LABELS).write_bytes(b"")

  assert len(load_idx_split(tmp_path, "test")) == 10000


def test_data_dir_skips_tfds(mnist_dir, monkeypatch):
  trap = _TfdsTrap()
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", trap)

  data = load_split("mnist", "test", mnist_dir)

  assert len(data) == 10000
  assert not trap.accessed


def test_tfds_import_failure(monkeypatch):
  # A None entry in sys.modules makes `import` raise ImportError.
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)

  with pytest.raises(DataError) as excinfo:
    load_split("mnist", "test")

  assert "tensorflow-datasets" in _message(excinfo)
  assert "--data_dir" in _message(excinfo)
  assert isinstance(excinfo.value.__cause__, ImportError)
  assert "\n" not in _message(excinfo)


def test_tfds_download_failure(monkeypatch):
  fake_tfds = types.ModuleType("tensorflow_datasets")

  def fail_download(name, split):
    raise OSError(f"no network for {name} {split}\nsecond line")

  fake_tfds.data_source = fail_download
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake_tfds)

  with pytest.raises(DataError) as excinfo:
    load_split("fashion_mnist", "train")

  assert "--data_dir" in _message(excinfo)
  assert "no network for fashion_mnist train" in _message(excinfo)
  assert "\n" not in _message(excinfo)


def test_tfds_examples_converted(monkeypatch):
  examples = [
      {"image": np.full((28, 28, 1), label, np.uint8), "label": np.int64(label)}
      for label in (3, 7)
  ]
  requests = []

  def data_source(name, split):
    requests.append((name, split))
    return examples

  fake_tfds = types.ModuleType("tensorflow_datasets")
  fake_tfds.data_source = data_source
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake_tfds)

  data = load_split("mnist", "test")

  assert requests == [("mnist", "test")]
  assert data.images.shape == (2, 28, 28, 1)
  assert data.images.dtype == np.uint8
  assert data.images[1, 0, 0, 0] == 7
  assert data.labels.dtype == np.int32
  assert data.labels.tolist() == [3, 7]


def test_unknown_split(mnist_dir):
  with pytest.raises(ValueError) as excinfo:
    load_split("mnist", "validation", mnist_dir)

  assert "'validation'" in _message(excinfo)
  for split in SPLITS:
    assert split in _message(excinfo)


def test_unknown_split_idx(mnist_dir):
  with pytest.raises(ValueError) as excinfo:
    load_idx_split(mnist_dir, "t10k")

  assert "'t10k'" in _message(excinfo)
  assert "train, test" in _message(excinfo)


def test_unknown_dataset(mnist_dir):
  with pytest.raises(ValueError) as excinfo:
    load_split("cifar10", "test", mnist_dir)

  assert "'cifar10'" in _message(excinfo)
  for name in DATASETS:
    assert name in _message(excinfo)
