"""CelebA faces: the crop box, the uint8 cache, and one-line data errors."""

import numpy as np
import pytest
from PIL import Image

from lmser_jax.data import celeba
from lmser_jax.data import DataError


def test_crop_box_scales_with_the_image():
  assert celeba.crop_box(178, 218) == (25, 45, 153, 173)
  # The 64x64 face box of the 89x109 half-size copy.
  assert celeba.crop_box(89, 109) == (12, 22, 76, 86)
  left, top, right, bottom = celeba.crop_box(356, 436)
  assert (right - left, bottom - top) == (256, 256)


def _crop_at(path, box, size):
  with Image.open(path) as image:
    face = image.convert("RGB").crop(box)
    return np.asarray(face.resize((size, size), Image.Resampling.BICUBIC),
                      np.float64)


def test_crops_match_across_sizes(celeba_full_dir,
                                                        celeba_half_dir):
  for name in ("000001.jpg", "000017.jpg", "000032.jpg"):
    full = celeba.load_face(str(celeba_full_dir / name), 64).astype(np.float64)
    half = celeba.load_face(str(celeba_half_dir / name), 64).astype(np.float64)
    aligned = np.abs(full - half).mean()
    # The same face seen through a box moved by a few pixels differs more:
    # the crop follows the face, not a fixed place in the file.
    for dx, dy in ((8, 0), (0, 8), (-8, -8)):
      shifted = _crop_at(celeba_full_dir / name,
                         (25 + dx, 45 + dy, 153 + dx, 173 + dy), 64)
      assert aligned < np.abs(shifted - half).mean(), (name, dx, dy)
    assert aligned < 20, name


def test_cache_round_trips_exactly(celeba_half_dir, tmp_path, monkeypatch):
  faces = celeba.load_folder_split(str(celeba_half_dir), (9001, 9040), 32,
                                   str(tmp_path))
  assert faces.images.shape == (40, 32, 32, 3)
  assert faces.images.dtype == np.uint8
  assert list(faces.ids[[0, -1]]) == [9001, 9040]
  direct = np.stack([
      celeba.load_face(str(celeba_half_dir / f"{i:06d}.jpg"), 32)
      for i in range(9001, 9041)])
  np.testing.assert_array_equal(np.asarray(faces.images), direct)

  # The second load reads the cache and decodes nothing.
  def no_decoding(*args):
    raise AssertionError("decoded a JPEG although the cache exists")
  monkeypatch.setattr(celeba, "load_face", no_decoding)
  again = celeba.load_folder_split(str(celeba_half_dir), (9001, 9040), 32,
                                   str(tmp_path))
  assert isinstance(again.images, np.memmap)
  np.testing.assert_array_equal(np.asarray(again.images), direct)
  assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_cache_keyed_by_range_and_size(celeba_half_dir,
                                                       tmp_path):
  a = celeba.load_folder_split(str(celeba_half_dir), (1, 8), 32, str(tmp_path))
  b = celeba.load_folder_split(str(celeba_half_dir), (2, 9), 32, str(tmp_path))
  c = celeba.load_folder_split(str(celeba_half_dir), (1, 8), 64, str(tmp_path))
  np.testing.assert_array_equal(np.asarray(a.images[1:]),
                                np.asarray(b.images[:-1]))
  assert c.images.shape == (8, 64, 64, 3)


def test_cache_is_rebuilt_when_an_image_changes(celeba_half_dir, tmp_path):
  folder = tmp_path / "faces"
  folder.mkdir()
  for i in (1, 2, 3):
    (folder / f"{i:06d}.jpg").write_bytes(
        (celeba_half_dir / f"{i:06d}.jpg").read_bytes())
  before = np.asarray(celeba.load_folder_split(
      str(folder), (1, 3), 32, str(tmp_path / "c")).images)
  (folder / "000002.jpg").write_bytes(
      (celeba_half_dir / "000009.jpg").read_bytes())
  after = np.asarray(celeba.load_folder_split(
      str(folder), (1, 3), 32, str(tmp_path / "c")).images)
  np.testing.assert_array_equal(after[[0, 2]], before[[0, 2]])
  np.testing.assert_array_equal(
      after[1], celeba.load_face(str(celeba_half_dir / "000009.jpg"), 32))


def test_mean_image_matches_numpy(celeba_half_dir, tmp_path):
  faces = celeba.load_folder_split(str(celeba_half_dir), (1, 30), 32,
                                   str(tmp_path))
  expected = np.asarray(faces.images, np.float64).mean(axis=0) / 255
  np.testing.assert_allclose(celeba.mean_image(faces.images, chunk=7),
                             expected, rtol=1e-6)


def _write_jpeg(path, width, height):
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (height, width, 3), np.uint8)).save(
      path, format="JPEG")


def test_empty_folder_is_a_clear_error(tmp_path):
  with pytest.raises(DataError, match="has no .jpg images"):
    celeba.load_folder_split(str(tmp_path), (1, 2), 32, str(tmp_path / "c"))


def test_missing_folder_is_a_clear_error(tmp_path):
  with pytest.raises(DataError, match="is not a directory"):
    celeba.image_paths(str(tmp_path / "absent"), (1, 2))


def test_missing_id_is_a_clear_error(tmp_path):
  _write_jpeg(tmp_path / "000001.jpg", 178, 218)
  with pytest.raises(DataError, match="first missing: 000002.jpg"):
    celeba.image_paths(str(tmp_path), (1, 3))


def test_unreadable_image_is_a_clear_error(tmp_path):
  _write_jpeg(tmp_path / "000001.jpg", 178, 218)
  (tmp_path / "000002.jpg").write_bytes(b"not a jpeg")
  with pytest.raises(DataError, match="000002.jpg is not a readable image"):
    celeba.load_folder_split(str(tmp_path), (1, 2), 32, str(tmp_path / "c"))
  # A failed decode leaves no cache behind.
  assert not list((tmp_path / "c").glob("*.npy"))


def test_too_small_image_is_a_clear_error(tmp_path):
  _write_jpeg(tmp_path / "000001.jpg", 9, 11)
  with pytest.raises(DataError, match="too small for the face crop") as info:
    celeba.load_folder_split(str(tmp_path), (1, 1), 32, str(tmp_path / "c"))
  assert "not a readable image" not in str(info.value)


def test_image_of_another_shape_is_a_clear_error(tmp_path):
  _write_jpeg(tmp_path / "000001.jpg", 100, 100)
  with pytest.raises(DataError, match="expected an aligned CelebA image") as info:
    celeba.load_folder_split(str(tmp_path), (1, 1), 32, str(tmp_path / "c"))
  assert "not a readable image" not in str(info.value)


@pytest.mark.parametrize("text", ["", "5", "a-b", "0-3", "9-3", "1-2-3"])
def test_bad_id_range_is_rejected(text):
  with pytest.raises(ValueError, match="not an id range"):
    celeba.parse_id_range(text)


def test_id_range_parses_zero_padded_ids():
  assert celeba.parse_id_range("009001-010000") == (9001, 10000)
