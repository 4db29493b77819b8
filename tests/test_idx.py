"""Tests for the IDX reader on the real MNIST files and on corrupted copies."""

import gzip
import pathlib

import numpy as np
import pytest

from lmser_jax.data import DataError
from lmser_jax.data import read_idx

IMAGE_MAGIC = 0x00000803
LABEL_MAGIC = 0x00000801


def _idx_bytes(magic: int, shape: tuple[int, ...], payload: bytes) -> bytes:
  header = magic.to_bytes(4, "big")
  header += b"".join(size.to_bytes(4, "big") for size in shape)
  return header + payload


def _write(path: pathlib.Path, data: bytes, compress: bool = False) -> None:
  path.write_bytes(gzip.compress(data) if compress else data)


def _image_payload(count: int) -> bytes:
  return (np.arange(count * 28 * 28) % 256).astype(np.uint8).tobytes()


def _message(excinfo: pytest.ExceptionInfo) -> str:
  return str(excinfo.value)


def test_real_mnist_train_shapes(mnist_dir):
  images = read_idx(mnist_dir / "train-images-idx3-ubyte.gz")
  labels = read_idx(mnist_dir / "train-labels-idx1-ubyte.gz")

  assert images.shape == (60000, 28, 28)
  assert images.dtype == np.uint8
  assert labels.shape == (60000,)
  assert labels.dtype == np.uint8
  assert images.flags.writeable


def test_raw_equals_gzip(mnist_dir, tmp_path):
  gz_path = mnist_dir / "t10k-images-idx3-ubyte.gz"
  raw_path = tmp_path / "t10k-images-idx3-ubyte"
  raw_path.write_bytes(gzip.decompress(gz_path.read_bytes()))

  from_gzip = read_idx(gz_path)
  from_raw = read_idx(raw_path)

  assert from_raw.shape == from_gzip.shape
  np.testing.assert_array_equal(from_raw, from_gzip)


def test_gzip_detected_by_magic(tmp_path):
  data = _idx_bytes(LABEL_MAGIC, (3,), bytes([1, 2, 3]))
  raw_named_gz = tmp_path / "labels.gz"
  gzip_named_raw = tmp_path / "labels"
  _write(raw_named_gz, data)
  _write(gzip_named_raw, data, compress=True)

  np.testing.assert_array_equal(read_idx(raw_named_gz), [1, 2, 3])
  np.testing.assert_array_equal(read_idx(gzip_named_raw), [1, 2, 3])


def test_small_image_file_shape(tmp_path):
  path = tmp_path / "images"
  _write(path, _idx_bytes(IMAGE_MAGIC, (2, 3, 4), bytes(range(24))))

  images = read_idx(path, expected_ndim=3)

  assert images.shape == (2, 3, 4)
  assert images[1, 2, 3] == 23


def test_missing_file(tmp_path):
  path = tmp_path / "absent-idx1-ubyte.gz"

  with pytest.raises(DataError) as excinfo:
    read_idx(path)

  assert str(path) in _message(excinfo)
  assert "not found" in _message(excinfo)


def test_directory_instead_of_file(tmp_path):
  with pytest.raises(DataError) as excinfo:
    read_idx(tmp_path)

  assert str(tmp_path) in _message(excinfo)
  assert "directory" in _message(excinfo)


@pytest.mark.parametrize("magic", [0x00000903, 0x00000802, 0x01000801])
def test_wrong_magic(tmp_path, magic):
  path = tmp_path / "bad-magic"
  _write(path, _idx_bytes(magic, (1, 1), b"\x00"))

  with pytest.raises(DataError) as excinfo:
    read_idx(path)

  assert str(path) in _message(excinfo)
  assert "wrong magic" in _message(excinfo)
  assert f"0x{magic:08x}" in _message(excinfo)
  assert "0x00000801" in _message(excinfo)
  assert "0x00000803" in _message(excinfo)


def test_label_file_as_image(mnist_dir):
  path = mnist_dir / "t10k-labels-idx1-ubyte.gz"

  with pytest.raises(DataError) as excinfo:
    read_idx(path, expected_ndim=3)

  assert str(path) in _message(excinfo)
  assert "expected an image file (magic 0x00000803)" in _message(excinfo)
  assert "0x00000801" in _message(excinfo)


def test_image_file_as_labels(tmp_path):
  path = tmp_path / "images"
  _write(path, _idx_bytes(IMAGE_MAGIC, (1, 28, 28), _image_payload(1)))

  with pytest.raises(DataError) as excinfo:
    read_idx(path, expected_ndim=1)

  assert str(path) in _message(excinfo)
  assert "expected a label file (magic 0x00000801)" in _message(excinfo)


def test_invalid_expected_ndim(tmp_path):
  with pytest.raises(ValueError, match="expected_ndim"):
    read_idx(tmp_path / "unused", expected_ndim=2)


def test_truncated_data(tmp_path):
  path = tmp_path / "truncated"
  _write(path, _idx_bytes(IMAGE_MAGIC, (2, 28, 28), _image_payload(1)),
         compress=True)

  with pytest.raises(DataError) as excinfo:
    read_idx(path)

  assert str(path) in _message(excinfo)
  assert "truncated" in _message(excinfo)
  assert "1568" in _message(excinfo)  # Expected bytes, 2 * 28 * 28.
  assert "784" in _message(excinfo)  # Bytes found.


def test_trailing_bytes(tmp_path):
  path = tmp_path / "trailing"
  _write(path, _idx_bytes(LABEL_MAGIC, (3,), bytes([1, 2, 3, 4, 5])))

  with pytest.raises(DataError) as excinfo:
    read_idx(path)

  assert str(path) in _message(excinfo)
  assert "2 trailing bytes" in _message(excinfo)


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00\x00", b"\x00\x00\x08\x03", b"\x00\x00\x08\x03\x00\x00\x00\x01"],
    ids=["empty", "half_magic", "no_dims", "one_of_three_dims"])
def test_header_too_short(tmp_path, data):
  path = tmp_path / "short"
  _write(path, data)

  with pytest.raises(DataError) as excinfo:
    read_idx(path)

  assert str(path) in _message(excinfo)
  assert "too short" in _message(excinfo)


def test_corrupt_gzip_stream(tmp_path):
  path = tmp_path / "corrupt.gz"
  compressed = gzip.compress(_idx_bytes(LABEL_MAGIC, (3,), bytes([1, 2, 3])))
  # Keep the gzip magic so detection still picks gzip, then break the rest.
  _write(path, compressed[:10] + b"\xff" * (len(compressed) - 10))

  with pytest.raises(DataError) as excinfo:
    read_idx(path)

  assert str(path) in _message(excinfo)
  assert "corrupt gzip" in _message(excinfo)


def test_cut_gzip_stream(tmp_path, mnist_dir):
  path = tmp_path / "t10k-labels-idx1-ubyte.gz"
  compressed = (mnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes()
  _write(path, compressed[:len(compressed) // 2])

  with pytest.raises(DataError) as excinfo:
    read_idx(path)

  assert str(path) in _message(excinfo)
  assert "corrupt gzip" in _message(excinfo)


def test_gzip_bad_checksum(tmp_path):
  path = tmp_path / "bad-crc.gz"
  compressed = bytearray(
      gzip.compress(_idx_bytes(LABEL_MAGIC, (3,), bytes([1, 2, 3]))))
  # The CRC-32 of the decompressed data is the 4 bytes before the size.
  compressed[-8] ^= 0xFF
  _write(path, bytes(compressed))

  with pytest.raises(DataError) as excinfo:
    read_idx(path)

  assert str(path) in _message(excinfo)
  assert "corrupt gzip" in _message(excinfo)


def test_messages_are_one_line(tmp_path):
  path = tmp_path / "short"
  _write(path, b"\x00")

  with pytest.raises(DataError) as excinfo:
    read_idx(path)

  assert "\n" not in _message(excinfo)
