"""Random translations of training images (`--max_shift`)."""

import json

import numpy as np
import pytest

from lmser_jax import config as config_lib
from lmser_jax import train_loop
from lmser_jax.data import batches


def _images(count, size=6):
  rng = np.random.default_rng(0)
  return rng.integers(1, 256, (count, size, size, 1)).astype(np.uint8)


def test_shift_matches_pixel_formula():
  images = _images(5)
  offsets = np.array([[0, 0], [1, 0], [0, -2], [-1, 1], [2, 2]])
  shifted = batches.shift_images(images, offsets)
  assert shifted.dtype == images.dtype
  assert shifted.shape == images.shape
  size = images.shape[1]
  for b, (down, right) in enumerate(offsets):
    for i in range(size):
      for j in range(size):
        src_i, src_j = i - down, j - right
        inside = 0 <= src_i < size and 0 <= src_j < size
        expected = images[b, src_i, src_j, 0] if inside else 0
        assert shifted[b, i, j, 0] == expected


def test_zero_offsets_leave_images_unchanged():
  images = _images(3)
  np.testing.assert_array_equal(
      batches.shift_images(images, np.zeros((3, 2), int)), images)


def test_offsets_are_bounded_and_depend_on_step():
  offsets = batches.random_shifts(seed=4, step=7, batch_size=500, max_shift=2)
  assert offsets.shape == (500, 2)
  assert offsets.min() == -2
  assert offsets.max() == 2
  np.testing.assert_array_equal(
      offsets, batches.random_shifts(seed=4, step=7, batch_size=500,
                                     max_shift=2))
  assert not np.array_equal(
      offsets, batches.random_shifts(seed=4, step=8, batch_size=500,
                                     max_shift=2))


@pytest.mark.parametrize("process_count", [1, 2])
def test_shifted_batches_resume_and_split(process_count):
  images = _images(40)
  labels = np.arange(40, dtype=np.int32)
  kwargs = dict(batch_size=8, seed=1, max_shift=2)
  reference = batches.train_batches(images, labels, **kwargs)
  full = [next(reference) for _ in range(12)]  # crosses an epoch
  for step in range(3, 12):
    offsets = batches.random_shifts(1, step, 8, 2)
    np.testing.assert_array_equal(
        full[step]["image"],
        batches.shift_images(images[full[step]["label"]], offsets))
  streams = [
      batches.train_batches(images, labels, start_step=3, process_index=p,
                            process_count=process_count, **kwargs)
      for p in range(process_count)
  ]
  for step in range(3, 12):
    joined = np.concatenate([next(s)["image"] for s in streams])
    np.testing.assert_array_equal(joined, full[step]["image"])
  assert any(not np.array_equal(b["image"], images[b["label"]]) for b in full)


def test_max_shift_is_a_recorded_setting(tmp_path):
  options = train_loop.TrainOptions(num_train_steps=2, batch_size=10)
  assert "max_shift" not in options.training_settings()
  shifted = train_loop.TrainOptions(num_train_steps=2, batch_size=10,
                                    max_shift=2)
  assert shifted.training_settings()["max_shift"] == 2
  with pytest.raises(ValueError, match="max_shift"):
    train_loop.TrainOptions(num_train_steps=2, max_shift=-1)

  config = config_lib.make_config("fc", "lmser_un")
  images = _images(40, size=28)
  labels = np.zeros(40, np.int32)
  train_loop.train(config, shifted, images, labels, str(tmp_path))
  recorded = json.loads((tmp_path / "train_settings.json").read_text())
  assert recorded["training"]["max_shift"] == 2
  with pytest.raises(train_loop.SettingsMismatchError,
                     match="max_shift: 2 recorded, 0 now"):
    train_loop.train(config, options, images, labels, str(tmp_path))


def test_unset_max_shift_matches_zero(tmp_path):
  config = config_lib.make_config("fc", "lmser_un")
  images = _images(40, size=28)
  labels = np.zeros(40, np.int32)
  options = train_loop.TrainOptions(num_train_steps=2, batch_size=10)
  train_loop.train(config, options, images, labels, str(tmp_path))
  with pytest.raises(train_loop.SettingsMismatchError,
                     match="max_shift: 0 recorded, 1 now"):
    train_loop.train(config, train_loop.TrainOptions(
        num_train_steps=2, batch_size=10, max_shift=1), images, labels,
                     str(tmp_path))
