"""Masks and associative recall: observed pixels stay, errors count hidden ones."""

import functools

import jax
import numpy as np
import pytest

from lmser_jax import config as config_lib
from lmser_jax import masks
from lmser_jax import model
from lmser_jax import recall


@pytest.mark.parametrize("name,hidden", [
    ("eyes", 16 / 64), ("center", 1 / 4), ("lower_half", 1 / 2),
    ("random_block", 1 / 4)])
def test_masks_hide_the_expected_share(name, hidden):
  mask = masks.make_mask(name, 3, 64, 64, np.random.default_rng(0))
  assert mask.shape == (3, 64, 64, 1)
  assert mask.dtype == np.float32
  assert set(np.unique(mask)) == {0.0, 1.0}
  np.testing.assert_allclose(1 - mask.mean(axis=(1, 2, 3)), hidden)


def test_eye_band_rows():
  mask = masks.eye_band(1, 64, 64)[0, :, 0, 0]
  assert np.flatnonzero(mask == 0).tolist() == list(range(24, 40))
  assert np.flatnonzero(masks.eye_band(1, 128, 128)[0, :, 0, 0] == 0)[0] == 48


def test_random_block_per_image_and_seed():
  a = masks.random_block(8, 28, 28, np.random.default_rng(1))
  b = masks.random_block(8, 28, 28, np.random.default_rng(1))
  np.testing.assert_array_equal(a, b)
  assert len({m.tobytes() for m in a}) > 1


def test_unknown_mask_and_missing_rng_are_errors():
  with pytest.raises(ValueError, match="unknown"):
    masks.make_mask("mouth", 1, 8, 8)
  with pytest.raises(ValueError, match="needs a numpy Generator"):
    masks.make_mask("random_block", 1, 8, 8)


def _model(name, arch="fc"):
  config = config_lib.make_config(arch, name)
  params = model.init_params(jax.random.PRNGKey(3), config)
  return config, params


@pytest.mark.parametrize("name,arch", [
    ("ae", "fc"), ("lmser_un_n", "fc"), ("lmser_un", "fc"),
    ("lmser_un", "cnn")])
def test_recall_never_changes_an_observed_pixel(name, arch):
  config, params = _model(name, arch)
  x = np.random.default_rng(0).uniform(size=(6, 28, 28, 1)).astype(np.float32)
  observed = masks.random_block(6, 28, 28, np.random.default_rng(2))
  fill = np.full((28, 28, 1), 0.3, np.float32)
  completions = np.asarray(recall.complete(params, config, x, observed, fill,
                                           reflections=4))
  assert completions.shape == (4, 6, 28, 28, 1)
  seen = np.broadcast_to(observed == 1, x.shape)
  for k in range(4):
    np.testing.assert_array_equal(completions[k][seen], x[seen])
    assert np.all((completions[k] >= 0) & (completions[k] <= 1))
  # The hidden pixels are the model's reconstruction, not the fill.
  assert not np.allclose(completions[-1][~seen], 0.3)


def test_first_reflection_recalls_from_the_filled_input():
  config, params = _model("lmser_un")
  x = np.random.default_rng(0).uniform(size=(4, 28, 28, 1)).astype(np.float32)
  observed = masks.lower_half(4, 28, 28)
  fill = np.zeros((28, 28, 1), np.float32)
  first = np.asarray(recall.complete(params, config, x, observed, fill,
                                     reflections=1))[0]
  x_hat = np.asarray(model.perceive(params, config, observed * x).x_hat)
  expected = observed * x + (1 - observed) * x_hat
  np.testing.assert_allclose(first, expected, atol=1e-6)


def test_evaluate_recall_counts_only_hidden_pixels():
  config, params = _model("lmser_un_n")
  images = np.random.default_rng(0).integers(
      0, 256, (7, 28, 28, 1)).astype(np.uint8)
  fill = np.full((28, 28, 1), 0.5, np.float32)
  mask_fn = functools.partial(masks.make_mask, "lower_half")
  result = recall.evaluate_recall(params, config, images, mask_fn, fill,
                                  reflections=2, batch_size=3)
  x = images.astype(np.float32) / 255
  hidden = x[:, 14:]
  np.testing.assert_allclose(result["fill_mse"], np.mean((hidden - 0.5) ** 2),
                             rtol=1e-5)
  assert result["hidden_fraction"] == pytest.approx(0.5)
  # Padded batches give the same numbers as one batch of every image.
  whole = recall.evaluate_recall(params, config, images, mask_fn, fill,
                                 reflections=2, batch_size=7)
  np.testing.assert_allclose(result["mse"], whole["mse"], rtol=1e-5)
  completions = np.asarray(recall.complete(
      params, config, x, masks.lower_half(7, 28, 28), fill, reflections=2))
  for k in range(2):
    np.testing.assert_allclose(
        result["mse"][k], np.mean((completions[k][:, 14:] - hidden) ** 2),
        rtol=1e-5)
    assert result["psnr"][k] == pytest.approx(
        -10 * np.log10(result["mse"][k]))


def test_random_masks_follow_seed():
  config, params = _model("ae")
  images = np.random.default_rng(0).integers(
      0, 256, (6, 28, 28, 1)).astype(np.uint8)
  fill = np.zeros((28, 28, 1), np.float32)
  mask_fn = functools.partial(masks.make_mask, "random_block")
  a = recall.evaluate_recall(params, config, images, mask_fn, fill,
                             reflections=1, batch_size=6, seed=4)
  b = recall.evaluate_recall(params, config, images, mask_fn, fill,
                             reflections=1, batch_size=6, seed=4)
  c = recall.evaluate_recall(params, config, images, mask_fn, fill,
                             reflections=1, batch_size=6, seed=5)
  assert a == b
  assert a["fill_mse"] != c["fill_mse"]


def test_mask_of_another_shape_is_rejected():
  config, params = _model("ae")
  x = np.zeros((8, 28, 28, 1), np.float32)
  with pytest.raises(ValueError, match="observed has shape"):
    recall.complete(params, config, x, masks.lower_half(4, 28, 28),
                    np.zeros((28, 28, 1), np.float32), reflections=1)


def test_psnr():
  assert recall.psnr(0.01) == pytest.approx(20.0)
  assert recall.psnr(0.0) == float("inf")
