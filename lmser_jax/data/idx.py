"""Reader for IDX files, the format of the MNIST and Fashion-MNIST archives.

An IDX file is a big-endian header followed by the array data. The header is
a 4-byte magic number (two zero bytes, a dtype code, the number of dimensions)
and then one uint32 size per dimension. MNIST uses dtype code 0x08 (unsigned
byte) with 3 dimensions for images (magic 0x00000803) and 1 dimension for
labels (magic 0x00000801). Only those two magics are accepted here.
"""

import gzip
import math
import os
import pathlib
import zlib

import numpy as np

_GZIP_MAGIC = b"\x1f\x8b"
_UBYTE_CODE = 0x08
_MAGIC_SIZE = 4
_DIM_SIZE = 4
_KIND_BY_NDIM = {1: "a label", 3: "an image"}


class DataError(ValueError):
  """Invalid or missing dataset file.

  The message is one line naming the file and what was expected.
  """


def _magic_for(ndim: int) -> int:
  return (_UBYTE_CODE << 8) | ndim


def _describe_magic(ndim: int) -> str:
  return f"{_KIND_BY_NDIM[ndim]} file (magic 0x{_magic_for(ndim):08x})"


def _read_bytes(path: pathlib.Path) -> bytes:
  """Read the file, decompressing it when it starts with the gzip magic."""
  try:
    data = path.read_bytes()
  except FileNotFoundError as err:
    raise DataError(f"IDX file not found: {path}") from err
  except IsADirectoryError as err:
    raise DataError(
        f"{path} is a directory, expected an IDX file") from err

  if not data.startswith(_GZIP_MAGIC):
    return data
  try:
    return gzip.decompress(data)
  except (gzip.BadGzipFile, zlib.error, EOFError) as err:
    raise DataError(
        f"{path}: corrupt gzip stream, expected a gzip-compressed IDX file"
        f" ({type(err).__name__}: {err})") from err


def _parse_magic(
    path: pathlib.Path, data: bytes, expected_ndim: int | None) -> int:
  """Check the magic number and return the number of dimensions it gives."""
  if len(data) < _MAGIC_SIZE:
    raise DataError(
        f"{path}: file too short for an IDX header, expected at least"
        f" {_MAGIC_SIZE} bytes, found {len(data)}")

  magic = int.from_bytes(data[:_MAGIC_SIZE], "big")
  ndim = data[3]
  is_known_magic = ndim in _KIND_BY_NDIM and magic == _magic_for(ndim)

  if expected_ndim is None:
    if not is_known_magic:
      raise DataError(
          f"{path}: wrong magic 0x{magic:08x}, expected 0x{_magic_for(1):08x}"
          f" (labels) or 0x{_magic_for(3):08x} (images)")
    return ndim

  if magic != _magic_for(expected_ndim):
    found = f"{_KIND_BY_NDIM[ndim]} file" if is_known_magic else "unknown type"
    raise DataError(
        f"{path}: wrong magic 0x{magic:08x} ({found}), expected"
        f" {_describe_magic(expected_ndim)}")
  return ndim


def read_idx(
    path: str | os.PathLike[str], expected_ndim: int | None = None,
) -> np.ndarray:
  """Read one IDX file of unsigned bytes, gzip-compressed or raw.

  Compression is detected from the gzip magic bytes 1f 8b, not from the file
  name, so a decompressed file that kept its `.gz` name still loads.

  Args:
    path: the IDX file.
    expected_ndim: 3 to accept only an image file (magic 0x00000803), 1 to
      accept only a label file (magic 0x00000801), or None to accept either.

  Returns:
    A writable uint8 array whose shape is the header's dimensions, e.g.
    (60000, 28, 28) for MNIST training images or (60000,) for their labels.

  Raises:
    DataError: the file is missing, is not valid gzip, has a header that is
      too short or a wrong magic, or contains fewer or more data bytes than the
      header's dimensions give.
    ValueError: `expected_ndim` is not 1, 3 or None.
  """
  if expected_ndim is not None and expected_ndim not in _KIND_BY_NDIM:
    raise ValueError(
        f"expected_ndim must be 1, 3 or None, got {expected_ndim!r}")

  path = pathlib.Path(path)
  data = _read_bytes(path)
  ndim = _parse_magic(path, data, expected_ndim)

  header_size = _MAGIC_SIZE + _DIM_SIZE * ndim
  if len(data) < header_size:
    raise DataError(
        f"{path}: file too short for an IDX header with {ndim} dimensions,"
        f" expected at least {header_size} bytes, found {len(data)}")
  shape = tuple(
      int.from_bytes(data[start:start + _DIM_SIZE], "big")
      for start in range(_MAGIC_SIZE, header_size, _DIM_SIZE))

  expected_size = math.prod(shape)
  found_size = len(data) - header_size
  shape_text = "x".join(str(size) for size in shape)
  if found_size < expected_size:
    raise DataError(
        f"{path}: truncated data, header shape {shape_text} needs"
        f" {expected_size} data bytes, found {found_size}")
  if found_size > expected_size:
    raise DataError(
        f"{path}: {found_size - expected_size} trailing bytes, header shape"
        f" {shape_text} needs {expected_size} data bytes, found {found_size}")

  # np.frombuffer over `bytes` is read-only, so copy once to let callers
  # shuffle or normalize in place.
  return np.frombuffer(
      data, dtype=np.uint8, offset=header_size).reshape(shape).copy()
