"""Faster formulations of the training step give the straightforward numbers."""

import functools

import jax
import numpy as np
import optax
import pytest

from lmser_jax import config as config_lib
from lmser_jax import model
from lmser_jax import parallel
from lmser_jax import training

# A tiny supervised CNN with style units exercises every term of the loss
# and the per-example style noise.
CONFIG = config_lib.make_config(
    "cnn", "lmser_sup", input_shape=(9, 7, 2), num_style=2,
    layers=config_lib.cnn_layers(channels=(4, 6), code_dim=12))
BATCH_SIZE = 8
REFLECTIONS = 2


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "image": rng.integers(0, 256, (BATCH_SIZE, 9, 7, 2), np.uint8),
      "label": rng.integers(0, 10, (BATCH_SIZE,), np.int32),
  }


def _loss_fn(params, batch, style_noise):
  return training.loss_and_metrics(
      params, CONFIG, batch, reflections=REFLECTIONS, label_weight=0.7,
      remat=False, noise_key=None, style_noise=style_noise)


def _assert_trees_close(actual, expected, rtol=1e-5, atol=1e-6):
  actual_leaves, actual_tree = jax.tree.flatten(actual)
  expected_leaves, expected_tree = jax.tree.flatten(expected)
  assert actual_tree == expected_tree
  for got, want in zip(actual_leaves, expected_leaves):
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def test_drawn_style_noise_matches_key():
  params = model.init_params(jax.random.PRNGKey(0), CONFIG)
  x = training.images_to_float(_batch()["image"])
  key = jax.random.PRNGKey(3)
  noise = model.draw_style_noise(CONFIG, key, BATCH_SIZE, REFLECTIONS)
  assert noise.shape == (REFLECTIONS, BATCH_SIZE, 2)
  perceive = jax.jit(model.perceive,
                     static_argnames=("config", "reflections"))
  from_key = perceive(params, CONFIG, x, reflections=REFLECTIONS,
                      noise_key=key)
  from_noise = perceive(params, CONFIG, x, reflections=REFLECTIONS,
                        style_noise=noise)
  np.testing.assert_allclose(from_noise.x_hat, from_key.x_hat, rtol=1e-6,
                             atol=1e-6)


@pytest.mark.parametrize("num_chunks", [2, 4])
def test_microbatched_grad_equals_full_batch(num_chunks):
  params = model.init_params(jax.random.PRNGKey(1), CONFIG)
  batch = _batch()
  noise = model.draw_style_noise(CONFIG, jax.random.PRNGKey(2), BATCH_SIZE,
                                 REFLECTIONS)
  full = jax.jit(jax.grad(_loss_fn, has_aux=True))(params, batch, noise)
  chunked = jax.jit(
      functools.partial(training.microbatched_grad, _loss_fn,
                        num_chunks=num_chunks))(params, batch, noise)
  full_grads, full_metrics = full
  chunked_grads, chunked_metrics = chunked
  _assert_trees_close(chunked_metrics, full_metrics)
  _assert_trees_close(chunked_grads, full_grads)
  # The noise reaches the gradient: without it the gradient differs.
  noiseless, _ = jax.jit(jax.grad(_loss_fn, has_aux=True))(
      params, batch, None)
  assert not np.allclose(noiseless["layers"][0]["kernel"],
                         full_grads["layers"][0]["kernel"], rtol=1e-5)


def test_microbatched_step_equals_full_step():
  mesh = parallel.create_mesh()
  # SGD keeps the update proportional to the gradient; Adam's first step
  # is about `lr * sign(grad)` and would hide a wrong gradient.
  tx = optax.sgd(0.1)
  batch = parallel.put_batch(_batch(), mesh)
  results = []
  for microbatch_size in (None, 2):
    state = training.create_train_state(0, CONFIG, tx)
    step = training.make_train_step(CONFIG, mesh, reflections=REFLECTIONS,
                                    microbatch_size=microbatch_size)
    results.append(step(state, batch))
  (full_state, full_metrics), (chunked_state, chunked_metrics) = results
  _assert_trees_close(chunked_metrics, full_metrics)
  _assert_trees_close(chunked_state.params, full_state.params)
  assert int(chunked_state.step) == 1


def test_microbatch_size_must_divide_batch():
  mesh = parallel.create_mesh()
  state = training.create_train_state(0, CONFIG, optax.sgd(0.1))
  step = training.make_train_step(CONFIG, mesh, microbatch_size=3)
  with pytest.raises(ValueError, match="not a multiple of microbatch_size=3"):
    step(state, parallel.put_batch(_batch(), mesh))


def test_microbatch_size_must_be_positive():
  with pytest.raises(ValueError, match="microbatch_size=0 is invalid"):
    training.make_train_step(CONFIG, parallel.create_mesh(),
                             microbatch_size=0)


def test_microbatch_size_rejects_bool():
  with pytest.raises(ValueError, match="microbatch_size=True is invalid"):
    training.make_train_step(CONFIG, parallel.create_mesh(),
                             microbatch_size=True)


def test_auto_microbatch_size_on_cpu():
  mesh = parallel.create_mesh()
  chunk = training.AUTO_MICROBATCH_PER_DEVICE * mesh.devices.size
  resolve = functools.partial(training.resolve_microbatch_size, mesh=mesh,
                              config=CONFIG)
  assert resolve("auto", 10 * chunk) == chunk
  # The whole batch when it is one chunk or less, or not a multiple of one.
  assert resolve("auto", chunk) is None
  assert resolve("auto", chunk + 1) is None
  assert resolve(None, 10 * chunk) is None
  assert resolve(7, 10 * chunk) == 7


def test_auto_microbatch_size_off_without_conv():
  fc_config = config_lib.make_config("fc", "lmser_un")
  mesh = parallel.create_mesh()
  chunk = training.AUTO_MICROBATCH_PER_DEVICE * mesh.devices.size
  assert training.resolve_microbatch_size("auto", 10 * chunk, mesh,
                                          fc_config) is None


def test_multi_step_equals_single_steps():
  mesh = parallel.create_mesh()
  tx = optax.sgd(0.1)
  batches = [_batch(seed) for seed in range(3)]
  state = training.create_train_state(0, CONFIG, tx)
  step = training.make_train_step(CONFIG, mesh, reflections=REFLECTIONS)
  single_losses = []
  for batch in batches:
    state, metrics = step(state, parallel.put_batch(batch, mesh))
    single_losses.append(float(metrics["loss"]))

  stacked = jax.tree.map(lambda *arrays: np.stack(arrays), *batches)
  multi_state, multi_metrics = training.make_multi_train_step(
      CONFIG, mesh, reflections=REFLECTIONS)(
          training.create_train_state(0, CONFIG, tx), stacked)
  assert multi_metrics["loss"].shape == (3,)
  np.testing.assert_allclose(multi_metrics["loss"], single_losses, rtol=1e-5)
  _assert_trees_close(multi_state.params, state.params)
  assert int(multi_state.step) == 3


def test_remat_carries_step_equals_plain_step():
  # Microbatched as well, so remat_scan runs inside the chunk loop.
  mesh = parallel.create_mesh()
  tx = optax.sgd(0.1)
  batch = parallel.put_batch(_batch(), mesh)
  results = []
  for remat, remat_carries, microbatch_size in ((False, None, None),
                                                (True, 1, None),
                                                (True, 0, 4)):
    state = training.create_train_state(0, CONFIG, tx)
    step = training.make_train_step(
        CONFIG, mesh, reflections=4, remat=remat, remat_carries=remat_carries,
        microbatch_size=microbatch_size)
    results.append(step(state, batch))
  (plain_state, plain_metrics), *others = results
  for state, metrics in others:
    _assert_trees_close(metrics, plain_metrics)
    _assert_trees_close(state.params, plain_state.params, atol=1e-5)


def test_remat_carries_need_remat():
  with pytest.raises(ValueError, match="remat_carries=2 needs remat=True"):
    training.make_train_step(CONFIG, parallel.create_mesh(), remat_carries=2)
  with pytest.raises(ValueError, match="remat_carries=-1 is invalid"):
    training.make_train_step(CONFIG, parallel.create_mesh(), remat=True,
                             remat_carries=-1)
