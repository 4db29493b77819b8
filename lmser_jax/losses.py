"""Losses and per-example metrics of the reconstruction and label tasks."""

import jax
import jax.numpy as jnp
import optax


def squared_error_sum(x: jax.Array, x_hat: jax.Array) -> jax.Array:
  """Half the squared error summed over one image's pixels.

  The training loss of Lmser, `0.5 * ||x - x_hat||^2` per image; the sum
  over pixels sets how much a label term weighs against reconstruction.

  Args:
    x: `(B, ...)` targets.
    x_hat: `(B, ...)` reconstructions.

  Returns:
    `(B,)` float32.
  """
  diff = (x - x_hat).astype(jnp.float32)
  return 0.5 * jnp.sum(diff.reshape(diff.shape[0], -1) ** 2, axis=-1)


def squared_error_mean(x: jax.Array, x_hat: jax.Array) -> jax.Array:
  """Mean over one image's pixels of `(x - x_hat)^2`: `(B,)` float32.

  This is the reported reconstruction error, with pixels in [0, 1].
  """
  diff = (x - x_hat).astype(jnp.float32)
  return jnp.mean(diff.reshape(diff.shape[0], -1) ** 2, axis=-1)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy from logits `(B, C)` and int labels `(B,)`: `(B,)`."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)


def correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """1.0 where the top-1 prediction equals the label, else 0.0: `(B,)`."""
  return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
