r"""Lower bound on the FC training step time from its matrix products alone.

One Lmser training step of a fully connected model (one reflection, DCW)
runs, for every connection `n_in -> n_out` at batch `B`, the bottom-up and
top-down products, the gradients of both inputs (except that of the image)
and two weight gradients. This script times each of those products alone,
as compiled `jax.jit` programs on random float32 data, and adds up their
best times. From each it subtracts the time of one call of a one-element
program, the dispatch cost that a call pays and a product inside a step
does not.
A step that runs its products one after another at these speeds cannot
be faster than that sum, so `B / sum` estimates a ceiling on images per
second, printed beside `--target`. It is an estimate: a step could run two
small products at once on different cores, or leave a product's operands
in cache for the next one, and beat the isolated times a little.

Usage:
  python -m benchmarks.fc_bound
  python -m benchmarks.fc_bound --batch_size=50 --target=17400
"""

import math
import time

import jax
import jax.numpy as jnp
from absl import app
from absl import flags
from jax import lax

from benchmarks import cli
from benchmarks import fc_products
from lmser_jax import config as config_lib

FLAGS = flags.FLAGS

flags.DEFINE_integer("batch_size", 500, "Batch size B.")
flags.DEFINE_string("model", "lmser_un", "FC model whose layers to use.")
flags.DEFINE_float("target", 70700.0, "Images per second to compare with.")
flags.DEFINE_integer("rounds", 5, "Timing rounds per product; best kept.")
flags.DEFINE_float("round_seconds", 0.3, "Seconds per timing round.")


def _contract(lhs_dim: int, rhs_dim: int):
  return lambda a, b: lax.dot_general(a, b, (((lhs_dim,), (rhs_dim,)),
                                             ((), ())))


def best_seconds(fn, *args) -> float:
  """Return the best time in seconds of one call of `fn` over the rounds."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(FLAGS.rounds):
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < FLAGS.round_seconds:
      result = fn(*args)
      calls += 1
    jax.block_until_ready(result)
    best = min(best, (time.perf_counter() - started) / calls)
  return best


def main(argv):
  cli.check_no_arguments(argv)
  if FLAGS.batch_size < 1:
    raise app.UsageError(f"--batch_size={FLAGS.batch_size} is invalid;"
                         " expected >= 1")
  if not 0 < FLAGS.target < math.inf:
    raise app.UsageError(f"--target={FLAGS.target} is invalid; expected a"
                         " positive finite number of images per second")
  if FLAGS.rounds < 1 or not 0 < FLAGS.round_seconds < math.inf:
    raise app.UsageError(
        f"--rounds={FLAGS.rounds} and --round_seconds={FLAGS.round_seconds}"
        " are invalid; expected positive finite values")
  cli.check_choices("model", [FLAGS.model], config_lib.MODELS)

  config = config_lib.make_config("fc", FLAGS.model)
  widths = [784] + [spec.features for spec in config.layers]
  key = jax.random.PRNGKey(0)
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; FC"
        f" {'-'.join(map(str, widths))}, batch {FLAGS.batch_size}")
  one_element = jnp.zeros((), jnp.float32)
  dispatch = best_seconds(jax.jit(lambda a: a + 1), one_element)
  print(f"one call of a one-element program: {1e6 * dispatch:.1f} us,"
        " subtracted from each product's time")
  print()
  print("| product | shapes | GFLOP/s | ms |")
  print("| --- | --- | ---: | ---: |")
  total_seconds = total_flops = 0.0
  products = fc_products.step_products(FLAGS.batch_size, widths)
  for name, lhs_shape, rhs_shape, lhs_dim, rhs_dim in products:
    key, lhs_key, rhs_key = jax.random.split(key, 3)
    lhs = jax.random.normal(lhs_key, lhs_shape, jnp.float32)
    rhs = jax.random.normal(rhs_key, rhs_shape, jnp.float32)
    seconds = best_seconds(jax.jit(_contract(lhs_dim, rhs_dim)), lhs, rhs)
    seconds = max(seconds - dispatch, 1e-9)
    flops = 2.0 * lhs.size * rhs.size / lhs_shape[lhs_dim]
    total_seconds += seconds
    total_flops += flops
    print(f"| {name} | {lhs_shape} x {rhs_shape} | {flops / seconds / 1e9:.1f}"
          f" | {1e3 * seconds:.3f} |", flush=True)
  ceiling = FLAGS.batch_size / total_seconds
  print()
  print(f"products alone: {total_flops / 1e9:.3f} GFLOP in"
        f" {1e3 * total_seconds:.2f} ms per step, a ceiling of {ceiling:,.0f}"
        f" images/s ({ceiling / FLAGS.target:.2f}x the target of"
        f" {FLAGS.target:,.0f})")


if __name__ == "__main__":
  cli.run(main)
