"""FGSM and PGD: closed form, constraints, keys, gradients, trained models."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmser_jax import attacks
from lmser_jax import config as config_lib
from lmser_jax import model
from lmser_jax import parallel
from lmser_jax import train_loop
from lmser_jax.data import mnist

SHAPE = (4, 4, 1)
NUM_CLASSES = 5
EPS_VALUES = (0.0, 0.1, 0.2, 0.3)


def _linear_model(seed=0):
  """Weights `(16, 5)` and bias `(5,)` of `logits = flatten(x) @ W + b`."""
  key_w, key_b = jax.random.split(jax.random.PRNGKey(seed))
  weights = jax.random.normal(key_w, (np.prod(SHAPE), NUM_CLASSES))
  bias = jax.random.normal(key_b, (NUM_CLASSES,))
  return weights, bias


def _linear_logits(weights, bias, x):
  return x.reshape(x.shape[0], -1) @ weights + bias


def _inputs(batch=8, seed=1):
  """Uniform pixels, with some exactly 0 and 1 to exercise the clipping."""
  x = jax.random.uniform(jax.random.PRNGKey(seed), (batch,) + SHAPE)
  x = x.at[:, 0, 0, 0].set(0.0).at[:, 0, 1, 0].set(1.0)
  labels = jnp.arange(batch) % NUM_CLASSES
  return x, labels


def _pgd(**options):
  return functools.partial(attacks.pgd, steps=options.pop("steps", 10),
                           step_size=options.pop("step_size", 0.05),
                           **options)


def test_fgsm_linear_closed_form():
  weights, bias = _linear_model()
  x, labels = _inputs()
  eps = 0.1
  x_adv = _jit_attack(attacks.fgsm,
                      functools.partial(_linear_logits, weights, bias))(
                          x, labels, eps, None)

  # grad_x CE = W (softmax(logits) - onehot(label)), computed in float64.
  w64 = np.asarray(weights, np.float64)
  x64 = np.asarray(x, np.float64).reshape(len(x), -1)
  logits = x64 @ w64 + np.asarray(bias, np.float64)
  probs = np.exp(logits - logits.max(axis=1, keepdims=True))
  probs /= probs.sum(axis=1, keepdims=True)
  onehot = np.eye(NUM_CLASSES)[np.asarray(labels)]
  grad = (probs - onehot) @ w64.T
  expected = np.clip(x64 + eps * np.sign(grad), 0.0, 1.0)

  # Where the gradient is within float32 rounding of zero its sign is
  # undefined, so compare only the clearly signed pixels.
  signed = np.abs(grad) > 1e-5
  assert signed.mean() > 0.9
  got = np.asarray(x_adv, np.float64).reshape(len(x), -1)
  np.testing.assert_allclose(got[signed], expected[signed], atol=1e-6)


def _jit_attack(attack, logits_fn):
  """The attack compiled once, with `eps` and `key` traced."""
  return jax.jit(lambda x, labels, eps, key: attack(logits_fn, x, labels, eps,
                                                   key))


@pytest.mark.parametrize("attack_name", ["fgsm", "pgd", "pgd_restarts"])
def test_attack_stays_in_ball_and_box(attack_name):
  weights, bias = _linear_model()
  x, labels = _inputs()
  attack = {
      "fgsm": attacks.fgsm,
      "pgd": _pgd(),
      "pgd_restarts": _pgd(restarts=3),
  }[attack_name]
  run = _jit_attack(attack, functools.partial(_linear_logits, weights, bias))
  for eps in (0.0, 0.05, 0.3):
    x_adv = np.asarray(run(x, labels, eps, jax.random.PRNGKey(0)))
    assert np.max(np.abs(x_adv - np.asarray(x))) <= eps + 1e-6, eps
    assert x_adv.min() >= 0.0, eps
    assert x_adv.max() <= 1.0, eps


def test_pgd_same_key_same_result():
  weights, bias = _linear_model()
  x, labels = _inputs()
  logits_fn = functools.partial(_linear_logits, weights, bias)
  run = _jit_attack(_pgd(restarts=2), logits_fn)
  first = run(x, labels, 0.2, jax.random.PRNGKey(3))
  second = run(x, labels, 0.2, jax.random.PRNGKey(3))
  np.testing.assert_array_equal(first, second)


def test_pgd_key_sets_random_start():
  weights, bias = _linear_model()
  x, labels = _inputs()
  logits_fn = functools.partial(_linear_logits, weights, bias)
  # With no steps the result is the random start itself.
  run = _jit_attack(_pgd(steps=0), logits_fn)
  first = run(x, labels, 0.2, jax.random.PRNGKey(3))
  second = run(x, labels, 0.2, jax.random.PRNGKey(4))
  assert np.any(np.asarray(first) != np.asarray(x))
  assert np.mean(np.asarray(first) != np.asarray(second)) > 0.5


def test_pgd_without_random_start_begins_at_input():
  weights, bias = _linear_model()
  x, labels = _inputs()
  logits_fn = functools.partial(_linear_logits, weights, bias)
  run = _jit_attack(_pgd(steps=0, random_start=False), logits_fn)
  x_adv = run(x, labels, 0.2, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(x_adv, x)


def test_pgd_rejects_bad_options():
  weights, bias = _linear_model()
  x, labels = _inputs()
  logits_fn = functools.partial(_linear_logits, weights, bias)
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="restarts=0"):
    attacks.pgd(logits_fn, x, labels, 0.1, key, restarts=0)
  with pytest.raises(ValueError, match="steps=-1"):
    attacks.pgd(logits_fn, x, labels, 0.1, key, steps=-1)
  with pytest.raises(ValueError, match="random start"):
    attacks.pgd(logits_fn, x, labels, 0.1, key, restarts=2,
                random_start=False)


def _small_lmser_sup():
  config = config_lib.make_config(
      "fc", "lmser_sup", input_shape=(8, 8, 1),
      layers=config_lib.fc_layers((16, 12), 10))
  params = model.init_params(jax.random.PRNGKey(0), config)
  return config, params


def _reflection_logits(params, config, reflections, x):
  return model.perceive(params, config, x, reflections=reflections).logits


def test_gradient_finite_with_huge_logits():
  config, params = _small_lmser_sup()
  top = params["layers"][-1]
  params["layers"][-1] = dict(top, kernel=top["kernel"] * 1e4)
  x = jax.random.uniform(jax.random.PRNGKey(1), (16, 8, 8, 1))
  logits_fn = functools.partial(_reflection_logits, params, config, 3)
  gradient = jax.jit(functools.partial(attacks.input_gradient, logits_fn))
  logits = jax.jit(logits_fn)(x)
  predicted = jnp.argmax(logits, axis=-1)
  assert float(jnp.max(jnp.abs(logits))) > 1e3

  # A wrong label is where a loss computed from probabilities would give
  # log(0): the gradient must stay finite and non-zero for every example.
  wrong = (predicted + 1) % 10
  grad = np.asarray(gradient(x, wrong))
  assert np.all(np.isfinite(grad))
  per_example = np.abs(grad).reshape(len(x), -1).max(axis=1)
  assert np.all(per_example > 0)

  # With the predicted label the softmax saturates to one-hot, so the
  # gradient may be exactly zero, but never NaN.
  grad = np.asarray(gradient(x, predicted))
  assert np.all(np.isfinite(grad))


def test_gradient_depends_on_reflections():
  config, params = _small_lmser_sup()
  x = jax.random.uniform(jax.random.PRNGKey(1), (4, 8, 8, 1))
  labels = jnp.arange(4)
  grads = [
      jax.jit(functools.partial(
          attacks.input_gradient,
          functools.partial(_reflection_logits, params, config, k)))(x, labels)
      for k in (1, 3)
  ]
  assert np.all(np.isfinite(grads[1]))
  assert not np.allclose(grads[0], grads[1])


@pytest.fixture(scope="module")
def trained_mnist_model(mnist_dir, tmp_path_factory):
  """A small Lmser(sup) trained for 300 steps, and 500 test examples."""
  train = mnist.load_split("mnist", "train", mnist_dir)
  test = mnist.load_split("mnist", "test", mnist_dir)
  config = config_lib.make_config(
      "fc", "lmser_sup", layers=config_lib.fc_layers((64, 32), 10))
  options = train_loop.TrainOptions(
      num_train_steps=300, batch_size=50, log_every_steps=300,
      checkpoint_every_steps=300)
  state = train_loop.train(config, options, train.images, train.labels,
                           str(tmp_path_factory.mktemp("attack_model")))
  return config, jax.device_get(state.params), test.images[:500], \
      test.labels[:500]


def test_trained_model_accuracy_ordering(trained_mnist_model):
  config, params, images, labels = trained_mnist_model
  mesh = parallel.create_mesh()
  apply_fn = functools.partial(_logits_of, config=config)
  steps = {
      "fgsm": attacks.make_attack_step(apply_fn, attacks.fgsm, mesh),
      "pgd": attacks.make_attack_step(
          apply_fn, functools.partial(attacks.pgd, steps=40, step_size=0.01),
          mesh),
  }
  accuracy = {name: [] for name in steps}
  for name, step in steps.items():
    for eps in EPS_VALUES:
      result = attacks.accuracy_under_attack(
          step, params, images, labels, eps=eps, seed=0, mesh=mesh,
          batch_size=200)
      assert result["count"] == 500
      accuracy[name].append(result["accuracy"])
    # One compilation serves every batch (the last one padded) and every eps.
    assert step._cache_size() == 1  # pylint: disable=protected-access

  # 300 steps reach about 80% with two test reflections; the bound only
  # checks that the model learned, so that the attacks have work to do.
  assert accuracy["fgsm"][0] > 0.7, accuracy
  for name, values in accuracy.items():
    for smaller, larger in zip(values, values[1:]):
      assert larger <= smaller, (name, accuracy)
  for eps, fgsm_value, pgd_value in zip(EPS_VALUES, accuracy["fgsm"],
                                        accuracy["pgd"]):
    assert pgd_value <= fgsm_value, (eps, accuracy)


def _logits_of(params, x, *, config):
  return model.perceive(params, config, x, reflections=2).logits


def test_transfer_step_judges_with_eval_fn():
  weights, bias = _linear_model()
  other = _linear_model(seed=5)
  x, labels = _inputs(batch=8)
  images = np.round(np.asarray(x) * 255).astype(np.uint8)
  labels = np.asarray(labels, np.int32)
  mesh = parallel.create_mesh()
  apply_fn = lambda p, x: _linear_logits(*p, x)
  other_fn = lambda p, x: _linear_logits(*other, x)
  plain = attacks.make_attack_step(apply_fn, attacks.fgsm, mesh)
  same = attacks.make_attack_step(apply_fn, attacks.fgsm, mesh,
                                  eval_fn=apply_fn)
  transfer = attacks.make_attack_step(apply_fn, attacks.fgsm, mesh,
                                      eval_fn=other_fn)
  run = functools.partial(attacks.accuracy_under_attack,
                          params=(weights, bias), images=images,
                          labels=labels, eps=0.2, seed=0, mesh=mesh,
                          batch_size=8)
  assert run(plain) == run(same)
  # The images are crafted against `apply_fn` but judged by the other
  # model: equal to that model's accuracy on the same images.
  x_adv = attacks.fgsm(functools.partial(_linear_logits, weights, bias),
                       jnp.asarray(images, jnp.float32) / 255, labels, 0.2,
                       jax.random.PRNGKey(0))
  expected = np.mean(np.argmax(other_fn(None, x_adv), axis=-1) == labels)
  assert run(transfer)["accuracy"] == pytest.approx(expected)
