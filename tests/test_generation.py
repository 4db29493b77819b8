"""Generation from chosen codes: code grids, sweeps, decoding and scores."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmser_jax import config as config_lib
from lmser_jax import generation
from lmser_jax import model
from lmser_jax import parallel
from lmser_jax import training

SMALL_FC = config_lib.fc_layers(hidden=(20, 15), code_dim=12)
SMALL_CNN = config_lib.cnn_layers(channels=(4, 6), code_dim=12)
INPUT_SHAPE = (9, 7, 1)

_perceive = jax.jit(model.perceive,
                    static_argnames=("config", "reflections", "return_states"))
_decode_codes = jax.jit(generation.decode_codes,
                        static_argnames=("config", "reflections"))


def _config(model_name, layers, **overrides):
  return config_lib.make_config("fc", model_name, input_shape=INPUT_SHAPE,
                                layers=layers, **overrides)


def _sup_config(layers=SMALL_FC):
  return _config("lmser_sup", layers, num_style=2)


def _inputs(batch=4, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(
      size=(batch,) + INPUT_SHAPE), jnp.float32)


def _codes(config, batch=5, scale=1.0, seed=1):
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(
      (batch, config.code_dim)), jnp.float32)


def test_style_grid_is_row_major():
  styles = generation.style_grid(jnp.array([0.5, -0.5, 7.0]),
                                 jnp.array([1.0, 2.0, 3.0]),
                                 jnp.array([10.0, 20.0]))
  assert styles.shape == (6, 3)
  np.testing.assert_array_equal(styles[:, 0], [1, 2, 3, 1, 2, 3])
  np.testing.assert_array_equal(styles[:, 1], [10, 10, 10, 20, 20, 20])
  np.testing.assert_array_equal(styles[:, 2], 7.0)


def test_style_grid_one_row_keeps_center():
  styles = generation.style_grid(jnp.array([0.5, -0.5]), jnp.array([1.0, 2.0]))
  np.testing.assert_array_equal(styles, [[1.0, -0.5], [2.0, -0.5]])


def test_label_style_codes_one_hot_then_style():
  config = _sup_config()
  codes = generation.label_style_codes(config, jnp.array([3, 0]),
                                       jnp.array([[1.5, -2.0], [0.0, 4.0]]))
  assert codes.shape == (2, 12)
  np.testing.assert_array_equal(codes[0, :10], np.eye(10)[3])
  np.testing.assert_array_equal(codes[1, :10], np.eye(10)[0])
  np.testing.assert_array_equal(codes[:, 10:], [[1.5, -2.0], [0.0, 4.0]])


def test_label_style_codes_need_labels():
  with pytest.raises(ValueError, match="supervised"):
    generation.label_style_codes(_config("lmser_un", SMALL_FC),
                                 jnp.array([0]), jnp.zeros((1, 0)))


def test_unit_sweeps_change_one_unit():
  code = jnp.array([1.0, 2.0, 3.0])
  values = generation.sweep_values(jnp.array([0.0, 10.0, -1.0]),
                                   jnp.array([1.0, 20.0, 1.0]), 3)
  codes = generation.unit_sweeps(code, values)
  assert codes.shape == (9, 3)
  for unit in range(3):
    for j in range(3):
      expected = np.array(code).copy()
      expected[unit] = values[unit, j]
      np.testing.assert_array_equal(codes[unit * 3 + j], expected)


@pytest.mark.parametrize("layers", [SMALL_FC, SMALL_CNN], ids=["fc", "cnn"])
@pytest.mark.parametrize("reflections", [0, 2])
def test_generation_is_deterministic(layers, reflections):
  config = _sup_config(layers)
  params = model.init_params(jax.random.PRNGKey(0), config)
  codes = _codes(config)
  first = _decode_codes(params, config=config, codes=codes,
                        reflections=reflections)
  second = _decode_codes(params, config=config, codes=codes,
                         reflections=reflections)
  eager = generation.decode_codes(params, config, codes,
                                  reflections=reflections)
  np.testing.assert_array_equal(first, second)
  np.testing.assert_allclose(first, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layers", [SMALL_FC, SMALL_CNN], ids=["fc", "cnn"])
@pytest.mark.parametrize("reflections", [0, 1, 3])
def test_generated_images_in_unit_range(layers, reflections):
  config = _sup_config(layers)
  params = model.init_params(jax.random.PRNGKey(2), config)
  # Codes far outside the trained range still give pixels in [0, 1].
  for scale in (1.0, 1e3):
    images = _decode_codes(params, config=config,
                           codes=_codes(config, scale=scale),
                           reflections=reflections)
    assert images.shape == (5,) + INPUT_SHAPE
    assert bool(jnp.all(jnp.isfinite(images)))
    assert float(images.min()) >= 0.0
    assert float(images.max()) <= 1.0


@pytest.mark.parametrize("layers", [SMALL_FC, SMALL_CNN], ids=["fc", "cnn"])
def test_decoder_alone_is_top_down_half_without_dpn(layers):
  config = _config("lmser_un_n", layers)
  params = model.init_params(jax.random.PRNGKey(3), config)
  out = _perceive(params, config=config, x=_inputs())
  generated = generation.decode_codes(params, config, out.code)
  np.testing.assert_allclose(generated, out.x_hat, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layers", [SMALL_FC, SMALL_CNN], ids=["fc", "cnn"])
def test_decoder_alone_is_top_down_half_with_dpn(layers):
  config = _sup_config(layers)
  params = model.init_params(jax.random.PRNGKey(4), config)
  out = _perceive(params, config=config, x=_inputs(), return_states=True)
  code = out.states.code[-1]
  bottom_up = [y[-1] for y in out.states.bottom_up]
  # The top-down half of perception, fed the perceived code and the paired
  # bottom-up inputs, gives the perceived reconstruction ...
  _, _, x_hat = model.top_down_pass(params, config, code, bottom_up)
  np.testing.assert_allclose(x_hat, out.x_hat, rtol=1e-6, atol=1e-6)
  # ... and without the paired inputs it is what generation decodes.
  _, _, alone = model.top_down_pass(params, config, code)
  np.testing.assert_allclose(generation.decode_codes(params, config, code),
                             alone, rtol=1e-6, atol=1e-6)


def _clamped_reference(params, config, codes, reflections, clamped):
  """Reference: decode, then reflections as a plain Python loop."""
  us, _, x = model.top_down_pass(params, config, codes)
  for _ in range(reflections):
    ys, zs, top = model.bottom_up_pass(params, config, x, us)
    code = jnp.where(clamped, codes, model.code_from_top(config, top))
    us, _, x = model.top_down_pass(params, config, code, ys, zs)
  return x


@pytest.mark.parametrize("layers", [SMALL_FC, SMALL_CNN], ids=["fc", "cnn"])
def test_clamped_reflections_equal_unrolled_loop(layers):
  config = _sup_config(layers)
  params = model.init_params(jax.random.PRNGKey(5), config)
  codes = _codes(config)
  # Label and style units clamped, as in label-conditioned generation, and a
  # mask that lets the encoder set the label units.
  for clamped in (np.ones(12, bool), np.arange(12) >= 10):
    clamped = jnp.asarray(clamped)
    generated = generation.decode_codes(params, config, codes, reflections=3,
                                        clamped=clamped)
    expected = _clamped_reference(params, config, codes, 3, clamped)
    np.testing.assert_allclose(generated, expected, rtol=1e-5, atol=1e-6)


def test_clamped_reflections_change_image_with_dpn():
  config = _sup_config(SMALL_CNN)
  params = model.init_params(jax.random.PRNGKey(6), config)
  codes = _codes(config)
  alone = generation.decode_codes(params, config, codes)
  reflected = generation.decode_codes(params, config, codes, reflections=1)
  assert float(jnp.abs(alone - reflected).max()) > 1e-6


def test_clamped_reflections_change_nothing_without_dpn():
  config = _config("lmser_un_n", SMALL_CNN)
  params = model.init_params(jax.random.PRNGKey(6), config)
  codes = jnp.abs(_codes(config))
  alone = generation.decode_codes(params, config, codes)
  reflected = generation.decode_codes(params, config, codes, reflections=2)
  # Equal up to float rounding: the scan compiles the same maps differently.
  np.testing.assert_allclose(alone, reflected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layers", [SMALL_FC, SMALL_CNN], ids=["fc", "cnn"])
@pytest.mark.parametrize("reflections", [1, 2])
def test_perceive_clamped_nothing_is_perceive(layers, reflections):
  config = _sup_config(layers)
  params = model.init_params(jax.random.PRNGKey(8), config)
  x = _inputs()
  out = _perceive(params, config=config, x=x, reflections=reflections)
  redrawn = generation.perceive_clamped(
      params, config, x, _codes(config, batch=4), jnp.zeros((12,), bool),
      reflections=reflections)
  np.testing.assert_allclose(redrawn, out.x_hat, rtol=1e-5, atol=1e-6)


def test_perceive_clamped_uses_clamped_code():
  config = _sup_config(SMALL_CNN)
  params = model.init_params(jax.random.PRNGKey(9), config)
  x = _inputs()
  codes = _codes(config, batch=4)
  clamped = jnp.arange(12) < 10
  redrawn = generation.perceive_clamped(params, config, x, codes, clamped)
  zeros = [jnp.zeros((4,) + shape) for shape in config.layer_shapes[1:-1]]
  ys, _, top = model.bottom_up_pass(params, config, x, zeros)
  code = jnp.where(clamped, codes, model.code_from_top(config, top))
  _, _, expected = model.top_down_pass(params, config, code, ys)
  np.testing.assert_allclose(redrawn, expected, rtol=1e-5, atol=1e-6)


def test_decode_codes_rejects_bad_input():
  config = _sup_config()
  params = model.init_params(jax.random.PRNGKey(0), config)
  with pytest.raises(ValueError, match="expected \\(batch, 12\\)"):
    generation.decode_codes(params, config, jnp.zeros((2, 10)))
  with pytest.raises(ValueError, match="reflections=-1"):
    generation.decode_codes(params, config, jnp.zeros((2, 12)),
                            reflections=-1)
  with pytest.raises(ValueError, match="reflections=0"):
    generation.perceive_clamped(params, config, _inputs(batch=2),
                                jnp.zeros((2, 12)), jnp.ones((12,), bool),
                                reflections=0)


def test_style_noise_absent_at_evaluation():
  config = _sup_config()
  params = model.init_params(jax.random.PRNGKey(7), config)
  x = _inputs()
  out = _perceive(params, config=config, x=x)
  # Without a noise key the code is the noise-free function of the top.
  np.testing.assert_array_equal(out.code, model.code_from_top(config,
                                                              out.top))
  mesh = parallel.create_mesh()
  eval_step = training.make_eval_step(config, mesh)
  batch = {"image": jnp.round(x * 255).astype(jnp.uint8),
           "label": jnp.arange(4, dtype=jnp.int32),
           "weight": jnp.ones((4,), jnp.float32)}
  sums = eval_step(params, batch)
  clean = _perceive(params, config=config,
                    x=training.images_to_float(batch["image"]))
  expected = np.mean(np.asarray(
      (training.images_to_float(batch["image"]) - clean.x_hat) ** 2))
  np.testing.assert_allclose(float(sums["mse"]) / 4, expected, rtol=1e-5)


def test_training_step_draws_style_noise():
  config = _sup_config()
  mesh = parallel.create_mesh()
  state = training.create_train_state(0, config, training.create_optimizer())
  batch = {"image": jnp.round(_inputs() * 255).astype(jnp.uint8),
           "label": jnp.arange(4, dtype=jnp.int32)}
  loss = functools.partial(training.loss_and_metrics, config=config,
                           batch=batch, reflections=1, label_weight=1.0,
                           remat=False)
  noise_key = jax.random.fold_in(state.rng, state.step)
  _, noisy = loss(state.params, noise_key=noise_key)
  _, clean = loss(state.params, noise_key=None)
  assert abs(float(noisy["recon_loss"]) - float(clean["recon_loss"])) > 1e-6
  # The compiled training step reports the metrics of the noisy loss.
  step = training.make_train_step(config, mesh, microbatch_size=None)
  _, metrics = step(state, batch)
  np.testing.assert_allclose(float(metrics["recon_loss"]),
                             float(noisy["recon_loss"]), rtol=1e-5)


def test_code_ranges_and_dead_units():
  codes = np.array([[0.0, 1.0, 2.0], [0.0, 3.0, 2.0], [0.0, -1.0, 2.0]])
  low, high = generation.code_ranges(codes)
  np.testing.assert_array_equal(low, [0.0, -1.0, 2.0])
  np.testing.assert_array_equal(high, [0.0, 3.0, 2.0])
  assert generation.dead_units(low, high) == [0, 2]


def test_label_consistency_per_label_and_overall():
  scores = generation.label_consistency(
      predicted=[0, 0, 1, 2, 2, 2], requested=[0, 1, 1, 2, 2, 0],
      num_classes=4)
  assert scores["overall"] == pytest.approx(4 / 6)
  assert scores["per_label"][:3] == pytest.approx([0.5, 0.5, 1.0])
  assert scores["per_label"][3] is None
  assert scores["count"] == 6
  assert scores["count_per_label"] == [2, 2, 2, 0]


def test_label_consistency_rejects_mismatched_lengths():
  with pytest.raises(ValueError, match="3 predictions for 2"):
    generation.label_consistency([0, 1, 2], [0, 1], num_classes=3)
