r"""Time of a full test-set evaluation with and without the forward options.

`training.make_eval_step` compiles with `compiler_options.forward_options`
on CPU. This script times `evaluation.evaluate` over the whole MNIST test
split with those options and with XLA's defaults, alternating the two in
each round and keeping each one's best round, and prints the ratio.

Usage:
  python -m benchmarks.eval_step --data_dir=../shared/datasets/mnist
  python -m benchmarks.eval_step --data_dir=../shared/datasets/mnist \
      --archs=cnn --reflections=3 --rounds=5
"""

import time

import jax
from absl import app
from absl import flags

from benchmarks import cli
from lmser_jax import compiler_options
from lmser_jax import config as config_lib
from lmser_jax import evaluation
from lmser_jax import model
from lmser_jax import parallel
from lmser_jax.data import mnist

FLAGS = flags.FLAGS

flags.DEFINE_string("data_dir", None, "Folder with the MNIST IDX files.",
                    required=True)
flags.DEFINE_list("archs", ["fc", "cnn"], "Architectures.")
flags.DEFINE_string("model", "lmser_sup", "Model.")
flags.DEFINE_integer("reflections", 1, "Reflections per perception.")
flags.DEFINE_integer("batch_size", 500, "Evaluation batch size.")
flags.DEFINE_integer("rounds", 3, "Alternating rounds; the best is kept.")


def main(argv):
  cli.check_no_arguments(argv)
  if FLAGS.rounds < 1:
    raise app.UsageError(f"--rounds={FLAGS.rounds} is invalid; expected >= 1")
  cli.check_choices("model", [FLAGS.model], config_lib.MODELS)
  cli.check_choices("archs", FLAGS.archs, config_lib.ARCHITECTURES)
  if FLAGS.reflections < 1:
    raise app.UsageError(f"--reflections={FLAGS.reflections} is invalid;"
                         " expected >= 1")
  mesh = parallel.create_mesh()
  try:
    parallel.check_batch_size(FLAGS.batch_size, mesh, flag="batch_size")
  except ValueError as error:
    raise app.UsageError(str(error)) from None
  try:
    split = mnist.load_split("mnist", "test", FLAGS.data_dir)
  except (OSError, ValueError) as error:
    raise app.UsageError(f"--data_dir={FLAGS.data_dir}: {error}") from None

  tuned_options = compiler_options.forward_options
  variants = {
      "XLA defaults": lambda mesh: None,
      "forward options": tuned_options,
  }
  print(f"jax {jax.__version__}, {mesh.devices.size}"
        f" {jax.default_backend()} device(s); forward options:"
        f" {tuned_options(mesh)}; seconds to evaluate {len(split.labels):,}"
        f" test images, {FLAGS.reflections} reflection(s)")
  print()
  print("| arch | model | XLA defaults | forward options | speed-up |")
  print("| --- | --- | ---: | ---: | ---: |")

  try:
    for arch in FLAGS.archs:
      config = config_lib.make_config(arch, FLAGS.model)
      params = model.init_params(jax.random.PRNGKey(0), config)
      best = {name: float("inf") for name in variants}
      for _ in range(FLAGS.rounds):
        for name, options_fn in variants.items():
          compiler_options.forward_options = options_fn
          # The evaluation step is cached per model. Clearing the cache makes
          # each variant compile its own.
          evaluation._eval_step.cache_clear()
          evaluation.evaluate(params, config, split.images[:FLAGS.batch_size],
                              split.labels[:FLAGS.batch_size], mesh=mesh,
                              batch_size=FLAGS.batch_size,
                              reflections=FLAGS.reflections)
          started = time.perf_counter()
          evaluation.evaluate(params, config, split.images, split.labels,
                              mesh=mesh, batch_size=FLAGS.batch_size,
                              reflections=FLAGS.reflections)
          best[name] = min(best[name], time.perf_counter() - started)
      default, tuned = best["XLA defaults"], best["forward options"]
      print(f"| {arch} | {FLAGS.model} | {default:.3f} | {tuned:.3f} |"
            f" {default / tuned:.2f}x |", flush=True)
  finally:
    compiler_options.forward_options = tuned_options
    evaluation._eval_step.cache_clear()


if __name__ == "__main__":
  cli.run(main)
