"""The training state, the Adam optimiser with per-step decay, and the compiled steps.

`make_train_step` and `make_eval_step` return functions compiled once with
`jax.jit` for a fixed batch shape; the loops feed them only full batches
(training drops the last partial batch of an epoch, evaluation pads it and
weights the padding by zero), so they never recompile.
"""

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from lmser_jax import config as config_lib
from lmser_jax import losses
from lmser_jax import model
from lmser_jax import parallel


class TrainState(flax.struct.PyTreeNode):
  """Parameters, optimiser state, step count and the key for style noise."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  def apply_gradients(self, grads) -> "TrainState":
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state)


def learning_rate_schedule(learning_rate: float = 0.01,
                           decay_rate: float = 0.9999) -> optax.Schedule:
  """Return `learning_rate * decay_rate ** step`, a decay after every step."""
  return optax.exponential_decay(
      init_value=learning_rate, transition_steps=1, decay_rate=decay_rate)


def create_optimizer(learning_rate: float = 0.01,
                     decay_rate: float = 0.9999,
                     b1: float = 0.9,
                     b2: float = 0.999,
                     eps: float = 1e-8) -> optax.GradientTransformation:
  """Adam with a learning rate decayed by `decay_rate` every step."""
  return optax.adam(
      learning_rate_schedule(learning_rate, decay_rate), b1=b1, b2=b2, eps=eps)


def create_train_state(seed: int, config: config_lib.ModelConfig,
                       tx: optax.GradientTransformation) -> TrainState:
  """Initialise parameters and optimiser state deterministically from `seed`."""
  init_key, noise_key = jax.random.split(jax.random.PRNGKey(seed))
  # One compiled program instead of many small eager random ops.
  params = jax.jit(model.init_params, static_argnums=1)(init_key, config)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      rng=noise_key,
      tx=tx)


def images_to_float(images: jax.Array) -> jax.Array:
  """uint8 pixels `(B, H, W, C)` to float32 in [0, 1]."""
  return images.astype(jnp.float32) / 255.0


def loss_and_metrics(params, config: config_lib.ModelConfig, batch: dict, *,
                     reflections: int, label_weight: float, remat: bool,
                     noise_key: jax.Array | None, recon_weight: float = 1.0):
  """Training loss of one batch and its parts.

  The loss is `recon_weight * mean_b 0.5 * ||x_b - x_hat_b||^2`, plus
  `label_weight` times the mean cross-entropy of the label logits for a
  supervised model. `recon_weight=0` trains a feed-forward classifier.

  Args:
    params: model parameters.
    config: the model.
    batch: `image` uint8 `(B, H, W, C)` and `label` int32 `(B,)`.
    reflections: reflections per perception.
    label_weight: weight of the cross-entropy term.
    remat: recompute reflections in the backward pass.
    noise_key: key for style noise (None: no noise).
    recon_weight: weight of the reconstruction term.

  Returns:
    `(loss, metrics)`, scalars.
  """
  x = images_to_float(batch["image"])
  out = model.perceive(
      params, config, x, reflections=reflections, noise_key=noise_key,
      remat=remat)
  recon = jnp.mean(losses.squared_error_sum(x, out.x_hat))
  metrics = {
      "recon_loss": recon,
      "mse": jnp.mean(losses.squared_error_mean(x, out.x_hat)),
  }
  loss = recon_weight * recon
  if config.supervised:
    ce = jnp.mean(losses.cross_entropy(out.logits, batch["label"]))
    loss = loss + label_weight * ce
    metrics["cross_entropy"] = ce
    metrics["accuracy"] = jnp.mean(losses.correct(out.logits, batch["label"]))
  metrics["loss"] = loss
  return loss, metrics


def make_train_step(config: config_lib.ModelConfig,
                    mesh: Mesh,
                    *,
                    reflections: int = 1,
                    label_weight: float = 1.0,
                    remat: bool = False,
                    recon_weight: float = 1.0):
  """Compile `step(state, batch) -> (state, metrics)` for data parallelism.

  The state is replicated and the batch split over `mesh`; the input state's
  buffers are donated, so do not reuse it after the call.
  """

  def train_step(state: TrainState, batch: dict):
    noise_key = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.grad(
        functools.partial(
            loss_and_metrics, config=config, batch=batch,
            reflections=reflections, label_weight=label_weight, remat=remat,
            noise_key=noise_key, recon_weight=recon_weight),
        has_aux=True)
    grads, metrics = grad_fn(state.params)
    return state.apply_gradients(grads), metrics

  replicated = parallel.replicated(mesh)
  return jax.jit(
      train_step,
      in_shardings=(replicated, parallel.batch_sharding(mesh)),
      out_shardings=(replicated, replicated),
      donate_argnums=(0,))


def make_eval_step(config: config_lib.ModelConfig,
                   mesh: Mesh,
                   *,
                   reflections: int = 1):
  """Compile `step(params, batch) -> sums` over a weighted batch.

  `batch` contains `image`, `label` and `weight` (1 for real examples, 0 for
  padding). The returned sums (`count`, `mse`, `recon_loss` and, for a
  supervised model, `correct` and `cross_entropy`) add up over batches;
  divide by `count` for means.
  """

  def eval_step(params, batch: dict):
    x = images_to_float(batch["image"])
    weight = batch["weight"].astype(jnp.float32)
    out = model.perceive(params, config, x, reflections=reflections)
    sums = {
        "count": jnp.sum(weight),
        "mse": jnp.sum(weight * losses.squared_error_mean(x, out.x_hat)),
        "recon_loss": jnp.sum(weight * losses.squared_error_sum(x, out.x_hat)),
    }
    if config.supervised:
      sums["correct"] = jnp.sum(weight * losses.correct(out.logits,
                                                        batch["label"]))
      sums["cross_entropy"] = jnp.sum(
          weight * losses.cross_entropy(out.logits, batch["label"]))
    return sums

  replicated = parallel.replicated(mesh)
  return jax.jit(
      eval_step,
      in_shardings=(replicated, parallel.batch_sharding(mesh)),
      out_shardings=replicated)
