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

from lmser_jax import compiler_options
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
                     noise_key: jax.Array | None, recon_weight: float = 1.0,
                     style_noise: jax.Array | None = None,
                     remat_carries: int | None = None):
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
    style_noise: `(reflections, B, num_style)` noise to use in place of
      drawing it from `noise_key`, see `model.draw_style_noise`.
    remat_carries: with `remat`, the most carries the backward pass stores
      besides the first (`model.perceive`); None stores one per reflection.

  Returns:
    `(loss, metrics)`, scalars.
  """
  x = images_to_float(batch["image"])
  out = model.perceive(
      params, config, x, reflections=reflections, noise_key=noise_key,
      style_noise=style_noise, remat=remat, remat_carries=remat_carries)
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


def _split_rows(array: jax.Array, num_chunks: int) -> jax.Array:
  """Split `(B, ...)` into `(num_chunks, B / num_chunks, ...)`.

  Chunk `i` contains rows `i::num_chunks`. Interleaved rather than
  contiguous chunks keep each chunk spread over every device of a
  batch-sharded mesh, so no chunk lives on one device.
  """
  rows = array.shape[0] // num_chunks
  return jnp.swapaxes(
      array.reshape((rows, num_chunks) + array.shape[1:]), 0, 1)


def microbatched_grad(loss_fn, params, batch: dict,
                      style_noise: jax.Array | None, num_chunks: int):
  """Compute the gradient and metrics of a batch-mean loss chunk by chunk.

  The batch runs as a `lax.scan` over chunks, so only one chunk's
  activations are alive at a time: this keeps the working set of a large
  batch in the CPU caches. Every term of the loss and every metric is a
  mean over examples and the chunks are equal in size, so the full-batch
  value is the mean of the chunk values, up to float summation order.

  Args:
    loss_fn: `loss_fn(params, batch, style_noise) -> (loss, metrics)`, a
      mean over the examples of `batch`.
    params: the parameters to differentiate.
    batch: arrays with a leading batch axis `B`, a multiple of `num_chunks`.
    style_noise: `(reflections, B, num_style)` or None; each chunk gets the
      rows of its own examples.
    num_chunks: number of chunks.

  Returns:
    `(grads, metrics)` of the whole batch.
  """
  chunks = jax.tree.map(lambda a: _split_rows(a, num_chunks), batch)
  noise_chunks = None
  if style_noise is not None:
    noise_chunks = jnp.swapaxes(
        _split_rows(jnp.swapaxes(style_noise, 0, 1), num_chunks), 1, 2)
  grad_fn = jax.grad(loss_fn, has_aux=True)

  def accumulate(totals, chunk):
    chunk_batch, chunk_noise = chunk
    grads, metrics = grad_fn(params, chunk_batch, chunk_noise)
    return jax.tree.map(jnp.add, totals, (grads, metrics)), None

  first = jax.tree.map(lambda a: a[0], (chunks, noise_chunks))
  shapes = jax.eval_shape(grad_fn, params, *first)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  totals, _ = jax.lax.scan(accumulate, zeros, (chunks, noise_chunks))
  return jax.tree.map(lambda total: total / num_chunks, totals)


# Examples per device in one chunk of the "auto" microbatching. On a 2-core
# x86 CPU, chunks of 100 and 125 trained the CNN at batch 500 5-10% faster
# than chunks of 50 and 10-20% faster than the whole batch. Chunks slowed
# the FC models at batch 500. benchmarks/README.md has the runs.
# NOTE: CPUs with other cache sizes may prefer other sizes.
AUTO_MICROBATCH_PER_DEVICE = 100


def resolve_microbatch_size(microbatch_size: int | str | None,
                            batch_size: int, mesh: Mesh,
                            config: config_lib.ModelConfig) -> int | None:
  """Return the chunk size for `batch_size` examples, None for no chunks.

  Integers and None pass through; "auto" is resolved as `make_train_step`
  documents.
  """
  if microbatch_size != "auto":
    return microbatch_size
  # Chunks pay off where the feature maps of a large batch spill out of the
  # CPU caches. On an accelerator they would only shrink each kernel, and
  # they are unmeasured there.
  if mesh.devices.flat[0].platform != "cpu":
    return None
  if not any(isinstance(spec, config_lib.Conv) for spec in config.layers):
    return None
  size = AUTO_MICROBATCH_PER_DEVICE * mesh.devices.size
  if batch_size <= size or batch_size % size:
    return None
  return size


def make_train_step(config: config_lib.ModelConfig,
                    mesh: Mesh,
                    *,
                    reflections: int = 1,
                    label_weight: float = 1.0,
                    remat: bool = False,
                    recon_weight: float = 1.0,
                    microbatch_size: int | str | None = "auto",
                    remat_carries: int | None = None):
  """Compile `step(state, batch) -> (state, metrics)` for data parallelism.

  The state is replicated and the batch split over `mesh`; the input state's
  buffers are donated, so do not reuse it after the call.

  With an integer `microbatch_size` smaller than the batch, the gradient is
  accumulated over chunks of that many examples inside the compiled step
  (see `microbatched_grad`), and the update equals the full-batch one up to
  float rounding. The batch size must then be a multiple of it, and it a
  multiple of the number of devices. None runs the whole batch at once.
  "auto" uses chunks of `AUTO_MICROBATCH_PER_DEVICE` examples per device
  for a model with convolutions on CPU when the batch is a larger multiple
  of that, and the whole batch otherwise.

  `remat_carries` caps the carries that the backward pass stores with
  `remat` (see `model.perceive`).
  """
  if microbatch_size != "auto" and microbatch_size is not None and (
      not isinstance(microbatch_size, int) or
      isinstance(microbatch_size, bool) or microbatch_size < 1 or
      microbatch_size % mesh.devices.size):
    raise ValueError(
        f"microbatch_size={microbatch_size!r} is invalid; expected a positive"
        f" multiple of the number of devices ({mesh.devices.size}), 'auto' or"
        " None")
  model.check_remat_carries(remat, remat_carries)

  def train_step(state: TrainState, batch: dict):
    noise_key = jax.random.fold_in(state.rng, state.step)
    batch_size = batch["image"].shape[0]
    chunk_size = resolve_microbatch_size(microbatch_size, batch_size, mesh,
                                         config)
    loss_fn = functools.partial(
        loss_and_metrics, config=config, reflections=reflections,
        label_weight=label_weight, remat=remat, noise_key=noise_key,
        recon_weight=recon_weight, remat_carries=remat_carries)
    if chunk_size is None or chunk_size >= batch_size:
      grads, metrics = jax.grad(
          functools.partial(loss_fn, batch=batch), has_aux=True)(state.params)
      return state.apply_gradients(grads), metrics

    if batch_size % chunk_size:
      raise ValueError(
          f"batch size {batch_size} is not a multiple of microbatch_size="
          f"{chunk_size}; pick a divisor of the batch size, 'auto' or None")
    style_noise = model.draw_style_noise(config, noise_key, batch_size,
                                         reflections)
    grads, metrics = microbatched_grad(
        lambda params, chunk, noise: loss_fn(params, batch=chunk,
                                             style_noise=noise),
        state.params, batch, style_noise, batch_size // chunk_size)
    return state.apply_gradients(grads), metrics

  replicated = parallel.replicated(mesh)
  return jax.jit(
      train_step,
      in_shardings=(replicated, parallel.batch_sharding(mesh)),
      out_shardings=(replicated, replicated),
      donate_argnums=(0,))


def make_multi_train_step(config: config_lib.ModelConfig,
                          mesh: Mesh,
                          *,
                          reflections: int = 1,
                          label_weight: float = 1.0,
                          remat: bool = False,
                          recon_weight: float = 1.0,
                          microbatch_size: int | str | None = "auto",
                          remat_carries: int | None = None):
  """Compile `steps(state, batches) -> (state, metrics)`: several steps at once.

  `batches` contains the arrays of `make_train_step`'s batch with a leading
  step axis, `(num_steps, B, ...)`, and the steps run in order in one
  `lax.scan`, so the host dispatches one program per `num_steps` steps. On a
  2-core CPU, 10 steps of batch 50 per call trained the CNN models 6-23%
  faster than one step per call (benchmarks/README.md). The metrics come back
  stacked, `(num_steps,)` each. The arguments are those of
  `make_train_step`; the input state's buffers are donated.
  """
  step = make_train_step(
      config, mesh, reflections=reflections, label_weight=label_weight,
      remat=remat, recon_weight=recon_weight, microbatch_size=microbatch_size,
      remat_carries=remat_carries)

  def train_steps(state: TrainState, batches: dict):
    return jax.lax.scan(step, state, batches)

  replicated = parallel.replicated(mesh)
  return jax.jit(
      train_steps,
      in_shardings=(replicated, parallel.stacked_batch_sharding(mesh)),
      out_shardings=(replicated, replicated),
      donate_argnums=(0,))


def make_eval_step(config: config_lib.ModelConfig,
                   mesh: Mesh,
                   *,
                   reflections: int = 1,
                   feed_reconstruction: bool = False):
  """Compile `step(params, batch) -> sums` over a weighted batch.

  `batch` contains `image`, `label` and `weight` (1 for real examples, 0 for
  padding). The returned sums (`count`, `mse`, `recon_loss` and, for a
  supervised model, `correct` and `cross_entropy`) add up over batches;
  divide by `count` for means. `feed_reconstruction` is passed to
  `model.perceive`. On CPU the step is compiled with
  `compiler_options.forward_options`.
  """

  def eval_step(params, batch: dict):
    x = images_to_float(batch["image"])
    weight = batch["weight"].astype(jnp.float32)
    out = model.perceive(params, config, x, reflections=reflections,
                         feed_reconstruction=feed_reconstruction)
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
      out_shardings=replicated,
      compiler_options=compiler_options.forward_options(mesh))
