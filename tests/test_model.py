"""Perception: the reflection scan, the DCW/DPN switches and the code layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmser_jax import config as config_lib
from lmser_jax import model

# Compiled once per configuration: eager dispatch of the scan and the
# transposed convolutions would dominate the test time.
_perceive = jax.jit(
    model.perceive,
    static_argnames=("config", "reflections", "return_states", "remat",
                     "remat_carries", "feed_reconstruction"))

SMALL_CNN = config_lib.cnn_layers(channels=(4, 6), code_dim=12)
SMALL_FC = config_lib.fc_layers(hidden=(20, 15), code_dim=12)


def _config(model_name, layers, **overrides):
  return config_lib.make_config(
      "fc", model_name, input_shape=(9, 7, 2), layers=layers, **overrides)


def _inputs(batch=3, shape=(9, 7, 2), seed=0):
  # NumPy draws: each new shape of a JAX random draw costs a compilation.
  return jnp.asarray(
      np.random.default_rng(seed).uniform(size=(batch,) + shape), jnp.float32)


def _unrolled(params, config, x, reflections):
  """Reference: reflections as a plain Python loop."""
  shapes = config.layer_shapes
  us = [jnp.zeros((x.shape[0],) + s) for s in shapes[1:-1]]
  x_in = x
  for _ in range(reflections):
    ys, zs, top = model.bottom_up_pass(params, config, x_in, us)
    code = model.code_from_top(config, top)
    us, _, x_hat = model.top_down_pass(params, config, code, ys, zs)
  return x_hat, code, top


@pytest.mark.parametrize("layers", [SMALL_FC, SMALL_CNN],
                         ids=["fc", "cnn"])
@pytest.mark.parametrize("model_name", config_lib.MODELS)
def test_scan_equals_unrolled_loop(model_name, layers):
  config = _config(model_name, layers, num_style=2)
  params = model.init_params(jax.random.PRNGKey(1), config)
  x = _inputs()
  out = _perceive(params, config=config, x=x, reflections=3)
  x_hat, code, top = _unrolled(params, config, x, 3)
  np.testing.assert_allclose(out.x_hat, x_hat, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.code, code, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.top, top, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_name", ["ae", "lmser_un_n"])
def test_second_reflection_without_dpn_is_noop(model_name):
  config = _config(model_name, SMALL_CNN)
  params = model.init_params(jax.random.PRNGKey(2), config)
  x = _inputs()
  once = _perceive(params, config=config, x=x, reflections=1)
  twice = _perceive(params, config=config, x=x, reflections=2)
  np.testing.assert_array_equal(once.x_hat, twice.x_hat)
  np.testing.assert_array_equal(once.code, twice.code)


def test_second_reflection_with_dpn_changes_output():
  config = _config("lmser_un", SMALL_CNN)
  params = model.init_params(jax.random.PRNGKey(2), config)
  x = _inputs()
  once = _perceive(params, config=config, x=x, reflections=1)
  twice = _perceive(params, config=config, x=x, reflections=2)
  assert float(jnp.abs(once.x_hat - twice.x_hat).max()) > 1e-6


def test_states_have_reflection_axis():
  config = _config("lmser_sup", SMALL_CNN)
  params = model.init_params(jax.random.PRNGKey(3), config)
  out = _perceive(params, config=config, x=_inputs(), reflections=4,
                       return_states=True)
  shapes = config.layer_shapes
  assert out.states.x_hat.shape == (4, 3, 9, 7, 2)
  assert out.states.code.shape == (4, 3, 12)
  for i, shape in enumerate(shapes[1:-1]):
    assert out.states.encoder[i].shape == (4, 3) + shape
    assert out.states.top_down[i].shape == (4, 3) + shape
  np.testing.assert_array_equal(out.states.x_hat[-1], out.x_hat)
  # The first reflection's input is the clamped x.
  np.testing.assert_array_equal(out.states.inputs[0], _inputs())


def test_dcw_off_uses_its_own_decoder():
  config = _config("ae", SMALL_FC)
  params = model.init_params(jax.random.PRNGKey(4), config)
  x = _inputs()
  before = _perceive(params, config=config, x=x).x_hat
  changed = jax.tree.map(lambda a: a, params)
  changed["layers"][0]["down_kernel"] = changed["layers"][0]["down_kernel"] * 2
  after = _perceive(changed, config=config, x=x).x_hat
  assert float(jnp.abs(before - after).max()) > 1e-6
  # The encoder does not see the decoder's weights.
  np.testing.assert_array_equal(
      _perceive(params, config=config, x=x).code,
      _perceive(changed, config=config, x=x).code)


def test_supervised_code_is_softmax_then_style():
  config = _config("lmser_sup", SMALL_FC, num_style=2)
  assert config.code_dim == 12
  params = model.init_params(jax.random.PRNGKey(5), config)
  out = _perceive(params, config=config, x=_inputs())
  np.testing.assert_allclose(out.code[:, :10].sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(out.code[:, :10],
                             jax.nn.softmax(out.logits, axis=-1), rtol=1e-5)
  np.testing.assert_array_equal(out.code[:, 10:], out.top[:, 10:])


def test_style_noise_only_with_key():
  config = _config("lmser_sup", SMALL_FC, num_style=2)
  params = model.init_params(jax.random.PRNGKey(6), config)
  x = _inputs()
  clean = _perceive(params, config=config, x=x)
  clean_again = _perceive(params, config=config, x=x)
  noisy = _perceive(params, config=config, x=x,
                    noise_key=jax.random.PRNGKey(0))
  np.testing.assert_array_equal(clean.x_hat, clean_again.x_hat)
  assert float(jnp.abs(clean.x_hat - noisy.x_hat).max()) > 1e-6
  # Noise reaches the decoder only: the logits are unchanged.
  np.testing.assert_array_equal(clean.logits, noisy.logits)


def test_decode_equals_top_down_half_without_dpn():
  config = _config("lmser_un_n", SMALL_CNN)
  params = model.init_params(jax.random.PRNGKey(7), config)
  out = _perceive(params, config=config, x=_inputs())
  np.testing.assert_allclose(model.decode(params, config, out.code), out.x_hat,
                             rtol=1e-6, atol=1e-6)


def test_observed_pixels_stay_clamped():
  config = _config("lmser_un", SMALL_CNN)
  params = model.init_params(jax.random.PRNGKey(8), config)
  x = _inputs()
  observed = (_inputs(seed=9) > 0.5).astype(x.dtype)
  filled = x * observed
  out = _perceive(params, config=config, x=filled, reflections=3,
                       observed=observed, return_states=True)
  for r in range(3):
    inputs = out.states.inputs[r]
    np.testing.assert_array_equal(inputs * observed, filled * observed)
  # From the second reflection on, masked pixels hold the reconstruction.
  expected = observed * filled + (1 - observed) * out.states.x_hat[0]
  np.testing.assert_allclose(out.states.inputs[1], expected, rtol=1e-6)


@pytest.mark.parametrize("activation", config_lib.ACTIVATIONS)
@pytest.mark.parametrize("dpn_mode", config_lib.DPN_MODES)
def test_outputs_finite_and_in_unit_range(activation, dpn_mode):
  config = _config("lmser_sup", SMALL_CNN, activation=activation,
                   dpn_mode=dpn_mode)
  params = model.init_params(jax.random.PRNGKey(10), config)
  out = _perceive(params, config=config, x=_inputs(), reflections=2)
  assert bool(jnp.all(jnp.isfinite(out.x_hat)))
  assert float(out.x_hat.min()) >= 0.0
  assert float(out.x_hat.max()) <= 1.0


@pytest.mark.parametrize("layers", [SMALL_FC, SMALL_CNN],
                         ids=["fc", "cnn"])
def test_gradients_match_unrolled_loop(layers):
  # The scan carries activities in place of some top-down inputs and does
  # not rematerialise the last reflection. Gradients must not change.
  config = _config("lmser_un", layers)
  params = model.init_params(jax.random.PRNGKey(11), config)
  x = _inputs()

  def loss(p, remat, remat_carries):
    return jnp.sum(_perceive(p, config=config, x=x, reflections=3,
                             remat=remat,
                             remat_carries=remat_carries).x_hat ** 2)

  reference = jax.grad(
      lambda p: jnp.sum(_unrolled(p, config, x, 3)[0] ** 2))(params)
  for remat, remat_carries in ((False, None), (True, None), (True, 1)):
    grads = jax.grad(loss)(params, remat, remat_carries)
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(grads)):
      # Summation order differs; the largest entries reach about 100.
      scale = float(jnp.max(jnp.abs(a)))
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("layers,mode", [(SMALL_FC, "clamped"),
                                         (SMALL_FC, "fed"),
                                         (SMALL_CNN, "observed")],
                         ids=["fc-clamped", "fc-fed", "cnn-observed"])
def test_remat_carries_keep_gradients(layers, mode):
  # Supervised, so the style noise of every reflection is an input too.
  config = _config("lmser_sup", layers)
  params = model.init_params(jax.random.PRNGKey(5), config)
  x = _inputs()
  observed = None
  if mode == "observed":
    observed = jnp.asarray(np.random.default_rng(1).uniform(size=x.shape) >
                           0.5, jnp.float32)
  reflections = 6

  def loss(p, remat_carries):
    out = _perceive(p, config=config, x=x, reflections=reflections,
                    noise_key=jax.random.PRNGKey(2), observed=observed,
                    feed_reconstruction=mode == "fed", remat=True,
                    remat_carries=remat_carries)
    return jnp.sum(out.x_hat ** 2) + jnp.sum(out.logits)

  reference = jax.grad(loss)(params, None)
  for remat_carries in (0, 2):
    grads = jax.grad(loss)(params, remat_carries)
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(grads)):
      scale = float(jnp.max(jnp.abs(a)))
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


def test_remat_carries_checked():
  config = _config("lmser_un", SMALL_FC)
  params = model.init_params(jax.random.PRNGKey(0), config)
  x = _inputs()
  with pytest.raises(ValueError, match="needs remat=True"):
    model.perceive(params, config, x, reflections=3, remat_carries=1)
  with pytest.raises(ValueError, match="remat='no' is invalid"):
    model.perceive(params, config, x, reflections=3, remat="no",
                   remat_carries=1)
  with pytest.raises(ValueError, match="reflections=2.0 is invalid"):
    model.perceive(params, config, x, reflections=2.0, remat=True,
                   remat_carries=1)
  out = model.perceive(params, config, x, reflections=np.int64(3), remat=True,
                       remat_carries=np.int64(1))
  assert out.x_hat.shape == x.shape
  for bad in (-1, 1.5, True):
    with pytest.raises(ValueError, match="remat_carries"):
      model.perceive(params, config, x, reflections=3, remat=True,
                     remat_carries=bad)


def test_remat_carries_keep_every_state():
  config = _config("lmser_un", SMALL_FC)
  params = model.init_params(jax.random.PRNGKey(0), config)
  out = _perceive(params, config=config, x=_inputs(), reflections=4,
                  return_states=True, remat=True, remat_carries=1)
  expected = _perceive(params, config=config, x=_inputs(), reflections=4,
                       return_states=True)
  assert out.states.x_hat.shape[0] == 4
  np.testing.assert_allclose(out.states.x_hat, expected.states.x_hat,
                             rtol=1e-6)


def test_perceive_rejects_bad_input():
  config = _config("lmser_un", SMALL_FC)
  params = model.init_params(jax.random.PRNGKey(0), config)
  with pytest.raises(ValueError, match="shape"):
    model.perceive(params, config, jnp.zeros((2, 8, 7, 2)))
  with pytest.raises(ValueError, match="shape"):
    model.perceive(params, config, jnp.zeros((2, 9, 7)))
  with pytest.raises(ValueError, match="dtype"):
    model.perceive(params, config, jnp.zeros((2, 9, 7, 2), jnp.uint8))


def test_invalid_config_raises():
  with pytest.raises(ValueError, match="activation"):
    _config("lmser_un", SMALL_FC, activation="tanh")
  with pytest.raises(ValueError, match="does not fit"):
    config_lib.ModelConfig((2, 2, 1), (config_lib.Conv(4, 5, 2, 0),
                                       config_lib.Dense(3)))
  with pytest.raises(ValueError, match="reflections"):
    config = _config("lmser_un", SMALL_FC)
    model.perceive(model.init_params(jax.random.PRNGKey(0), config), config,
                   _inputs(), reflections=0)
