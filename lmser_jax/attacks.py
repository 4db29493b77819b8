"""L-inf adversarial attacks (FGSM, PGD) and accuracy under attack.

The attacks work on any classifier given as `logits_fn(x) -> (B, num_classes)`
logits, with `x` float `(B, H, W, C)` and pixels in [0, 1]. The loss is
softmax cross-entropy computed from the logits (never from probabilities, so
that a confident model gives a finite loss and gradient), summed over the
batch. The sum makes each example's input gradient its own, provided
`logits_fn` treats the examples of a batch independently, which holds for
`lmser_jax.model.perceive`.

For an Lmser model the gradient runs through every reflection:

    logits_fn = lambda x: model.perceive(params, config, x, reflections=k).logits

NOTE: in float32 the softmax is exactly one-hot once the correct logit
exceeds every other by more than about 87. The cross-entropy gradient is
then exactly zero, so FGSM leaves that example unchanged and PGD moves it
only by its random start. `accuracy_under_attack` reports the share of
unchanged examples, which points at this kind of gradient masking.
"""

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh

from lmser_jax import parallel
from lmser_jax import training
from lmser_jax.data import batches as batches_lib

LogitsFn = Callable[[jax.Array], jax.Array]
# `attack(logits_fn, x, labels, eps, key) -> x_adv`; `fgsm` ignores the key.
AttackFn = Callable[..., jax.Array]


def cross_entropy_per_example(logits: jax.Array,
                              labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy `(B,)` float32 from logits `(B, C)`, labels `(B,)`."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)


def _loss_and_logits(logits_fn: LogitsFn, x: jax.Array, labels: jax.Array):
  """Batch-summed cross-entropy, with the per-example losses and logits."""
  logits = logits_fn(x)
  per_example = cross_entropy_per_example(logits, labels)
  return jnp.sum(per_example), (per_example, logits)


def input_gradient(logits_fn: LogitsFn, x: jax.Array,
                   labels: jax.Array) -> jax.Array:
  """Gradient of each example's cross-entropy with respect to its input.

  Args:
    logits_fn: maps `x` to logits `(B, num_classes)`.
    x: `(B, H, W, C)` float inputs.
    labels: `(B,)` int class ids.

  Returns:
    `(B, H, W, C)`, the dtype of `x`.
  """
  grad, _ = jax.grad(_loss_and_logits, argnums=1, has_aux=True)(
      logits_fn, x, labels)
  return grad


def fgsm(logits_fn: LogitsFn,
         x: jax.Array,
         labels: jax.Array,
         eps: float | jax.Array,
         key: jax.Array | None = None) -> jax.Array:
  """Fast gradient sign method: one signed gradient step of size `eps`.

  `x_adv = clip(x + eps * sign(grad_x CE(logits_fn(x), labels)), 0, 1)`.

  Args:
    logits_fn: maps `x` to logits `(B, num_classes)`.
    x: `(B, H, W, C)` float inputs in [0, 1].
    labels: `(B,)` int true class ids.
    eps: L-inf radius, a Python float or a traced scalar.
    key: ignored. It is accepted so that `fgsm` and `pgd` can be called
      the same way.

  Returns:
    `x_adv`, same shape and dtype as `x`, within `eps` of `x` and in [0, 1].
  """
  del key
  eps = jnp.asarray(eps, x.dtype)
  grad = input_gradient(logits_fn, x, labels)
  return jnp.clip(x + eps * jnp.sign(grad), 0.0, 1.0)


def _project(x_adv: jax.Array, x: jax.Array, eps: jax.Array) -> jax.Array:
  """Project onto the L-inf ball of radius `eps` around `x`, then into [0, 1]."""
  return jnp.clip(jnp.clip(x_adv, x - eps, x + eps), 0.0, 1.0)


def _keep_stronger(best, candidate, labels):
  """Per example, keep the stronger of two adversarial images.

  A misclassified image beats a correctly classified one. Among two
  misclassified images the earlier one stays. Among two correctly
  classified ones the higher loss wins.
  """
  best_x, best_loss, best_wrong = best
  x_adv, loss, logits = candidate
  wrong = jnp.argmax(logits, axis=-1) != labels
  take = (wrong & ~best_wrong) | (~wrong & ~best_wrong & (loss > best_loss))
  mask = take.reshape((-1,) + (1,) * (x_adv.ndim - 1))
  return (jnp.where(mask, x_adv, best_x), jnp.where(take, loss, best_loss),
          best_wrong | wrong)


def pgd(logits_fn: LogitsFn,
        x: jax.Array,
        labels: jax.Array,
        eps: float | jax.Array,
        key: jax.Array,
        *,
        steps: int = 40,
        step_size: float = 0.01,
        restarts: int = 1,
        random_start: bool = True) -> jax.Array:
  """Projected gradient descent on the cross-entropy in the L-inf ball.

  Each restart starts at `x` plus uniform noise in `[-eps, eps]` (clipped to
  [0, 1]), then takes `steps` steps `x <- x + step_size * sign(grad_x CE)`,
  each followed by a projection onto the eps-ball around `x` and onto
  [0, 1]. Every iterate of every restart, the start and the last included,
  is a candidate. Per example the result is the first misclassified
  candidate, or, when none is misclassified, the one with the highest loss.
  Keeping the best iterate and not only the last costs one extra forward
  pass per restart, because each step computes the loss at its iterate
  anyway.

  From a random start a pixel may be `2 * eps` away from the corner that
  FGSM jumps to, so with `steps * step_size < 2 * eps` (40 steps of 0.01 at
  eps = 0.3) PGD can miss examples that FGSM finds. More steps, restarts or
  `random_start=False` close that gap.

  Args:
    logits_fn: maps `x` to logits `(B, num_classes)`.
    x: `(B, H, W, C)` float inputs in [0, 1].
    labels: `(B,)` int true class ids.
    eps: L-inf radius, a Python float or a traced scalar.
    key: PRNG key of the random starts; the same key gives the same result.
    steps: gradient steps per restart (a Python int).
    step_size: L-inf size of each step.
    restarts: independent starts (a Python int >= 1).
    random_start: when False, the single start is `x` itself (the basic
      iterative method), and `restarts` must be 1.

  Returns:
    `x_adv`, same shape and dtype as `x`, within `eps` of `x` and in [0, 1].

  Raises:
    ValueError: `steps < 0`, `restarts < 1`, or `restarts > 1` without a
      random start (every restart would be the same).
  """
  if steps < 0:
    raise ValueError(f"steps={steps} is invalid; expected >= 0")
  if restarts < 1:
    raise ValueError(f"restarts={restarts} is invalid; expected >= 1")
  if restarts > 1 and not random_start:
    raise ValueError(
        f"restarts={restarts} without a random start repeats the same attack;"
        " use restarts=1 or random_start=True")
  eps = jnp.asarray(eps, x.dtype)
  step_size = jnp.asarray(step_size, x.dtype)
  loss_grad = jax.value_and_grad(_loss_and_logits, argnums=1, has_aux=True)

  def run_restart(best, restart_key):
    if random_start:
      noise = jax.random.uniform(restart_key, x.shape, x.dtype, -1.0, 1.0)
      start = jnp.clip(x + eps * noise, 0.0, 1.0)
    else:
      start = x

    def step(_, carry):
      x_adv, best = carry
      (_, (loss, logits)), grad = loss_grad(logits_fn, x_adv, labels)
      best = _keep_stronger(best, (x_adv, loss, logits), labels)
      x_adv = _project(x_adv + step_size * jnp.sign(grad), x, eps)
      return x_adv, best

    last, best = lax.fori_loop(0, steps, step, (start, best))
    _, (loss, logits) = _loss_and_logits(logits_fn, last, labels)
    return _keep_stronger(best, (last, loss, logits), labels), None

  batch = x.shape[0]
  init = (x, jnp.full((batch,), -jnp.inf, jnp.float32),
          jnp.zeros((batch,), bool))
  (best_x, _, _), _ = lax.scan(run_restart, init,
                               jax.random.split(key, restarts))
  return best_x


def make_attack_step(apply_fn: Callable[..., jax.Array],
                     attack: AttackFn,
                     mesh: Mesh,
                     eval_fn: Callable[..., jax.Array] | None = None):
  """Compile `step(params, batch, eps, seed, batch_index) -> sums`.

  The step attacks one batch with `attack` and counts the examples that
  stay correctly classified. `eps`, `seed` and `batch_index` are traced
  arguments, so one compilation serves every batch and every `eps` as long
  as the batch shape stays the same.

  Args:
    apply_fn: `apply_fn(params, x) -> logits (B, num_classes)`.
    attack: `attack(logits_fn, x, labels, eps, key) -> x_adv`, such as
      `fgsm` or `functools.partial(pgd, steps=...)`.
    mesh: devices to split each batch over; parameters are replicated.
    eval_fn: `eval_fn(params, x) -> logits` that classifies the adversarial
      images, when it differs from the attacked `apply_fn` (a transfer
      attack, e.g. crafted through one reflection and judged through
      three). Default: `apply_fn`.

  Returns:
    A jitted function of `params`, a batch dict (`image` uint8
    `(B, H, W, C)`, `label` int32 `(B,)`, `weight` float32 `(B,)` with 0 on
    padding rows), `eps` (float scalar), `seed` and `batch_index` (int
    scalars). The attack's key is `fold_in(PRNGKey(seed), batch_index)`.
    It returns the weighted sums `count`, `correct` (top-1 on the
    adversarial images) and `unchanged` (examples whose adversarial image
    equals the original exactly).
  """

  def attack_step(params, batch, eps, seed, batch_index):
    x = training.images_to_float(batch["image"])
    labels = batch["label"]
    weight = batch["weight"].astype(jnp.float32)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), batch_index)
    logits_fn = functools.partial(apply_fn, params)
    x_adv = attack(logits_fn, x, labels, eps, key)
    judge = logits_fn if eval_fn is None else functools.partial(eval_fn, params)
    correct = jnp.argmax(judge(x_adv), axis=-1) == labels
    unchanged = jnp.all((x_adv == x).reshape(x.shape[0], -1), axis=-1)
    return {
        "count": jnp.sum(weight),
        "correct": jnp.sum(weight * correct.astype(jnp.float32)),
        "unchanged": jnp.sum(weight * unchanged.astype(jnp.float32)),
    }

  replicated = parallel.replicated(mesh)
  return jax.jit(
      attack_step,
      in_shardings=(replicated, parallel.batch_sharding(mesh), replicated,
                    replicated, replicated),
      out_shardings=replicated)


def accuracy_under_attack(step, params, images: np.ndarray,
                          labels: np.ndarray, *, eps: float, seed: int,
                          mesh: Mesh,
                          batch_size: int = 500) -> dict[str, float]:
  """Top-1 accuracy of a model on adversarial versions of a split.

  Args:
    step: from `make_attack_step`; reuse it across calls to avoid
      recompiling.
    params: model parameters (replicated on `mesh`, or host arrays).
    images: `(N, H, W, C)` uint8.
    labels: `(N,)` int32.
    eps: L-inf radius in pixel units of [0, 1].
    seed: batch `i` is attacked with the key `fold_in(PRNGKey(seed), i)`,
      so the result depends on the seed and the batch size, never on
      earlier calls.
    mesh: devices; `batch_size` must be a multiple of their number. In a
      multi-process run every process calls this function with the same
      arguments and reads only its rows of each batch.
    batch_size: rows per compiled call; the last batch is padded with rows
      of weight 0.

  Returns:
    `accuracy` and `unchanged` (shares of the `count` examples), and
    `count`.

  Raises:
    ValueError: `images` is empty, or `batch_size` does not fit the mesh.
  """
  if len(images) == 0:
    raise ValueError("images is empty; expected at least one example")
  parallel.check_batch_size(batch_size, mesh, flag="eval_batch_size")
  params = jax.device_put(params, parallel.replicated(mesh))
  # Host scalars, not device arrays, so that every process passes the same
  # replicated values.
  eps = np.float32(eps)
  seed = np.uint32(seed)
  # Each process gathers only the rows that its own devices hold.
  process_index, process_count = parallel.process_layout(mesh)
  totals = None
  batches = batches_lib.eval_batches(
      images, labels, batch_size=batch_size, process_index=process_index,
      process_count=process_count)
  for index, batch in enumerate(batches):
    sums = step(params, parallel.put_batch(batch, mesh), eps, seed,
                np.int32(index))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals["count"])
  return {"accuracy": float(totals["correct"]) / count,
          "unchanged": float(totals["unchanged"]) / count,
          "count": count}
