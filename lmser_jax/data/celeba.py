"""Aligned CelebA faces: centre crop, resize, and a uint8 cache on disk.

Two sources give the same arrays:

- a folder in the `img_align_celeba` layout (`000001.jpg`, `000002.jpg`,
  ...) at the original 178x218 size or any uniformly scaled copy, such as
  the 89x109 half-size faces in `../shared/datasets/celeba-aligned-half`;
- tensorflow-datasets' `celeb_a`, when it is installed and its data can be
  downloaded or is already prepared.

Each image is cropped to the usual 128x128 centre box of the full-size
image, scaled with the image (at half size the box is `(12, 22, 76, 86)`, a
64x64 face with the eyes on rows 24 to 40), and resized to `image_size`.
The faces are decoded once into an `.npy` cache of uint8 `(N, S, S, 3)`,
written atomically, and later opened as a memory map. Training then reads
only the rows of each batch and never keeps the whole set as floats.
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import os
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from lmser_jax.data.idx import DataError

# Size (width, height) of CelebA's aligned images and the left/top corner and
# side of the centre crop in those pixels.
FULL_SIZE = (178, 218)
FULL_CROP = (25, 45, 128)
# The first 10,000 aligned faces are all in CelebA's official training
# partition, so the last 1,000 of them serve as the held-out test set.
DEFAULT_TRAIN_IDS = (1, 9000)
DEFAULT_TEST_IDS = (9001, 10000)
# Smallest crop side that still shows a face.
MIN_CROP = 8
# Bumped whenever the crop or resize changes, so stale caches are not reused.
_CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Faces:
  """A split of faces.

  Attributes:
    images: uint8 `(N, S, S, 3)`, usually a read-only memory map of the
      cache file.
    labels: int32 `(N,)` zeros; faces carry no class, and the training loop
      expects a label per example.
    ids: int `(N,)` CelebA image ids (1-based) of the rows, or row numbers
      for tensorflow-datasets.
  """
  images: np.ndarray
  labels: np.ndarray
  ids: np.ndarray

  def __len__(self) -> int:
    return len(self.images)


def parse_id_range(text: str) -> tuple[int, int]:
  """Parse `"first-last"` (1-based, inclusive), e.g. `"009001-010000"`.

  Raises:
    ValueError: the text is not two positive integers with first <= last.
  """
  first, sep, last = text.partition("-")
  if (not sep or not first.strip().isdigit() or not last.strip().isdigit() or
      not 1 <= int(first) <= int(last)):
    raise ValueError(
        f"{text!r} is not an id range; expected FIRST-LAST with"
        " 1 <= FIRST <= LAST, for example 009001-010000")
  return int(first), int(last)


def crop_box(width: int, height: int,
             source: str = "image") -> tuple[int, int, int, int]:
  """Return the centre crop `(left, top, right, bottom)` for an image size.

  The full-size box `(25, 45, 153, 173)` scaled by `width / 178`, rounded
  down: `(12, 22, 76, 86)` for the 89x109 half-size images.

  Raises:
    DataError: the size is not a uniform scaling of 178x218, or the crop
      would be smaller than `MIN_CROP` pixels.
  """
  scale = width / FULL_SIZE[0]
  if abs(height - FULL_SIZE[1] * scale) > 1.0 + scale:
    raise DataError(
        f"{source} is {width}x{height}; expected an aligned CelebA image of"
        f" {FULL_SIZE[0]}x{FULL_SIZE[1]} or a uniformly scaled copy of it")
  left, top, side = (int(v * scale) for v in FULL_CROP)
  if side < MIN_CROP:
    raise DataError(
        f"{source} is {width}x{height}, too small for the face crop (a"
        f" {side}x{side} box); expected at least"
        f" {int(np.ceil(FULL_SIZE[0] * MIN_CROP / FULL_CROP[2]))} pixels wide")
  return left, top, left + side, top + side


def crop_and_resize(image: Image.Image, image_size: int,
                    source: str = "image") -> np.ndarray:
  """Centre-crop a PIL image and resize it: uint8 `(S, S, 3)`."""
  image = image.convert("RGB")
  box = crop_box(*image.size, source=source)
  face = image.crop(box)
  if face.size != (image_size, image_size):
    # PIL's bicubic filter widens with the scale factor when it shrinks, so
    # a downscale averages instead of aliasing.
    face = face.resize((image_size, image_size), Image.Resampling.BICUBIC)
  return np.asarray(face, np.uint8)


def load_face(path: str, image_size: int) -> np.ndarray:
  """Read one JPEG and return its face crop, uint8 `(S, S, 3)`.

  Raises:
    DataError: the file is missing, unreadable, or too small for the crop.
  """
  try:
    with Image.open(path) as image:
      return crop_and_resize(image, image_size, source=path)
  except DataError:
    raise
  except FileNotFoundError:
    raise DataError(f"{path} does not exist; expected the aligned CelebA"
                    " image with this id") from None
  except (OSError, SyntaxError, ValueError) as error:
    raise DataError(f"{path} is not a readable image ({error})") from None


def image_paths(data_dir: str, ids: tuple[int, int]) -> list[str]:
  """Paths of `first.jpg` ... `last.jpg` (zero-padded to 6 digits) in `data_dir`.

  Raises:
    DataError: the folder is missing or has no JPEG, or an id of the range
      has no file.
  """
  if not os.path.isdir(data_dir):
    raise DataError(f"{data_dir} is not a directory; expected a folder of"
                    " aligned CelebA images (000001.jpg, 000002.jpg, ...)")
  present = {name for name in os.listdir(data_dir)
             if name.lower().endswith(".jpg")}
  if not present:
    raise DataError(f"{data_dir} has no .jpg images; expected aligned CelebA"
                    " images named 000001.jpg, 000002.jpg, ...")
  first, last = ids
  names = [f"{i:06d}.jpg" for i in range(first, last + 1)]
  missing = [name for name in names if name not in present]
  if missing:
    raise DataError(
        f"{data_dir} lacks {len(missing)} of the images {first:06d}.jpg to"
        f" {last:06d}.jpg (first missing: {missing[0]}); choose ids that"
        " exist")
  return [os.path.join(data_dir, name) for name in names]


def _write_cache(path: str, faces: Iterable[np.ndarray], count: int,
                 image_size: int, meta: dict) -> None:
  """Write `count` faces to `path` through a temporary file and a rename."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  temporary = f"{path}.tmp{os.getpid()}.npy"
  try:
    array = np.lib.format.open_memmap(
        temporary, mode="w+", dtype=np.uint8,
        shape=(count, image_size, image_size, 3))
    written = 0
    for face in faces:
      if written == count:
        break
      array[written] = face
      written += 1
    if written != count:
      raise DataError(f"the source gave {written} images; expected {count}")
    array.flush()
    del array
    with open(f"{temporary}.json", "w", encoding="utf-8") as stream:
      json.dump(meta, stream, indent=2, sort_keys=True)
    os.replace(f"{temporary}.json", f"{path}.json")
    os.replace(temporary, path)
  finally:
    for leftover in (temporary, f"{temporary}.json"):
      if os.path.exists(leftover):
        os.remove(leftover)


def _open_cache(path: str, meta: dict) -> np.ndarray | None:
  """Return the cached array if `path` exists and was made from the same source."""
  if not (os.path.exists(path) and os.path.exists(f"{path}.json")):
    return None
  with open(f"{path}.json", encoding="utf-8") as stream:
    if json.load(stream) != meta:
      return None
  return np.load(path, mmap_mode="r")


def _cache_path(cache_dir: str, meta: dict) -> str:
  digest = hashlib.sha1(
      json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]
  return os.path.join(cache_dir, f"celeba_{meta['image_size']}_{digest}.npy")


def _decode_all(paths: list[str], image_size: int) -> Iterator[np.ndarray]:
  # PIL releases the GIL while decoding, so threads overlap the JPEG work.
  with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
    chunk = 256
    for start in range(0, len(paths), chunk):
      yield from pool.map(lambda p: load_face(p, image_size),
                          paths[start:start + chunk])


def load_folder_split(data_dir: str, ids: tuple[int, int], image_size: int,
                      cache_dir: str) -> Faces:
  """Faces `ids` (inclusive range) from a folder, decoded once into a cache.

  Args:
    data_dir: folder in the `img_align_celeba` layout.
    ids: `(first, last)` CelebA ids, 1-based, inclusive.
    image_size: side `S` of the square output.
    cache_dir: folder for the cache. A cache made from another folder, id
      range, size or crop is not reused. Neither is one made before a file
      of the range changed its size or modification time.

  Returns:
    `Faces` with images uint8 `(last - first + 1, S, S, 3)`, memory-mapped.

  Raises:
    DataError: see `image_paths` and `load_face`.
  """
  paths = image_paths(data_dir, ids)
  # Sizes and modification times of every file: a replaced image makes a
  # new cache instead of serving the old pixels.
  files = hashlib.sha1()
  for path in paths:
    stat = os.stat(path)
    files.update(f"{os.path.basename(path)}:{stat.st_size}:"
                 f"{stat.st_mtime_ns};".encode())
  meta = {"source": os.path.abspath(data_dir), "ids": list(ids),
          "image_size": image_size, "version": _CACHE_VERSION,
          "files": files.hexdigest()}
  path = _cache_path(cache_dir, meta)
  images = _open_cache(path, meta)
  if images is None:
    _write_cache(path, _decode_all(paths, image_size), len(paths), image_size,
                 meta)
    images = np.load(path, mmap_mode="r")
  return Faces(images, np.zeros(len(images), np.int32),
               np.arange(ids[0], ids[1] + 1))


def load_tfds_split(split: str, image_size: int, cache_dir: str,
                    tfds_data_dir: str | None = None) -> Faces:
  """Faces of tensorflow-datasets' `celeb_a` split `split` (e.g. "test[:1000]").

  The 178x218 images go through the same crop and resize as a folder's.

  Raises:
    DataError: tensorflow-datasets (or TensorFlow, which it needs here) is
      missing, or the dataset cannot be loaded.
  """
  meta = {"source": "tfds:celeb_a", "split": split, "image_size": image_size,
          "version": _CACHE_VERSION}
  path = _cache_path(cache_dir, meta)
  images = _open_cache(path, meta)
  if images is None:
    try:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      dataset, info = tfds.load("celeb_a", split=split, with_info=True,
                                data_dir=tfds_data_dir)
      count = info.splits[split].num_examples
      faces = (crop_and_resize(Image.fromarray(example["image"]), image_size,
                               source=f"celeb_a {split}")
               for example in tfds.as_numpy(dataset))
    except DataError:
      raise
    except Exception as error:  # pylint: disable=broad-except
      raise DataError(
          f"could not load celeb_a split {split!r} through"
          f" tensorflow-datasets ({type(error).__name__}: {error}); pass"
          " --data_dir with a folder of aligned CelebA images instead") from None
    _write_cache(path, faces, count, image_size, meta)
    images = np.load(path, mmap_mode="r")
  return Faces(images, np.zeros(len(images), np.int32), np.arange(len(images)))


def mean_image(images: np.ndarray, chunk: int = 1000) -> np.ndarray:
  """Per-pixel mean of uint8 `(N, H, W, C)` images in [0, 1], float32 `(H, W, C)`.

  Reads `chunk` rows at a time, so a memory-mapped set is never loaded whole.
  """
  total = np.zeros(images.shape[1:], np.float64)
  for start in range(0, len(images), chunk):
    total += np.asarray(images[start:start + chunk], np.float64).sum(axis=0)
  return (total / (255.0 * len(images))).astype(np.float32)
