r"""Reconstruction on MNIST / Fashion-MNIST: AE and Lmser, FC and CNN.

Trains every chosen model, measures the reconstruction error (mean over test
images and pixels of `(x - x_hat)^2`) from the checkpoints saved at each
`--eval_steps` iteration, and writes under `--workdir`/`--dataset`:

  results.json, results.md      every measurement, and a table beside the
                                paper's MNIST numbers
  <arch>_<model>/               one run: checkpoints/, metrics.jsonl,
                                eval_step<N>.json, recon_step<N>.png

Usage:
  python -m experiments.mnist_recon \
      --flagfile=experiments/configs/mnist_recon.flags --data_dir=DIR

Rerunning the same command resumes: finished measurements are kept, and a
model stopped mid-way continues from its latest checkpoint.
"""

import os
import time

import jax
import numpy as np
from absl import flags
from absl import logging

from experiments import common
from lmser_jax import checkpointing
from lmser_jax import config as config_lib
from lmser_jax import evaluation
from lmser_jax import images as images_lib
from lmser_jax import model as model_lib
from lmser_jax import parallel
from lmser_jax import train_loop
from lmser_jax import training

FLAGS = flags.FLAGS

flags.DEFINE_list("archs", ["fc", "cnn"], "Architectures: fc, cnn.")
flags.DEFINE_list("models", list(config_lib.MODELS),
                  f"Models, any of {', '.join(config_lib.MODELS)}.")
flags.DEFINE_list("eval_steps", ["500", "5000", "20000"],
                  "Training iterations at which to measure; the largest one"
                  " is the length of training.")
flags.DEFINE_integer("grid_images", 16,
                     "Test images shown in each reconstruction picture.")

# MNIST, Table 1 of Huang, Tu and Xu (2019), at 500 / 5,000 / 20,000
# iterations; the paper does not say which architecture produced it.
PAPER_MNIST = {
    "ae": {500: 0.071, 5000: 0.036, 20000: 0.020},
    "lmser_un_n": {500: 0.030, 5000: 0.021, 20000: 0.016},
    "lmser_un": {500: 0.0067, 5000: 0.0018, 20000: 0.0006},
    "lmser_sup": {500: 0.0078, 5000: 0.0025, 20000: 0.0007},
}
MODEL_NAMES = {
    "ae": "AE",
    "lmser_un_n": "Lmser(un-n)",
    "lmser_un": "Lmser(un)",
    "lmser_sup": "Lmser(sup)",
}


# Module-level, so that the pictures of every measured step of a model share
# one compilation.
_perceive = jax.jit(model_lib.perceive, static_argnums=1)


def _parse_steps() -> list[int]:
  try:
    steps = sorted({int(s) for s in FLAGS.eval_steps})
  except ValueError:
    common.fail(f"--eval_steps={','.join(FLAGS.eval_steps)} is invalid;"
                " expected comma-separated positive integers")
  if not steps or steps[0] <= 0:
    common.fail(f"--eval_steps={','.join(FLAGS.eval_steps)} is invalid;"
                " expected comma-separated positive integers")
  return steps


def _check_flags() -> list[int]:
  common.check_common_flags()
  for name in ("archs", "models"):
    values = getattr(FLAGS, name)
    if not values:
      common.fail(f"--{name} is empty; expected at least one value")
    if len(set(values)) != len(values):
      common.fail(f"--{name}={','.join(values)} names a value twice")
  for arch in FLAGS.archs:
    if arch not in config_lib.ARCHITECTURES:
      common.fail(f"--archs contains {arch!r}; expected any of"
                  f" {', '.join(config_lib.ARCHITECTURES)}")
  for model in FLAGS.models:
    if model not in config_lib.MODELS:
      common.fail(f"--models contains {model!r}; expected any of"
                  f" {', '.join(config_lib.MODELS)}")
  if FLAGS.grid_images <= 0:
    common.fail(f"--grid_images={FLAGS.grid_images} is invalid; expected a"
                " positive number")
  return _parse_steps()


def _measure(run_dir, config, state_template, step, test, mesh):
  """Evaluate the checkpoint of `step` and draw its reconstructions."""
  path = os.path.join(run_dir, f"eval_step{step}.json")
  if os.path.exists(path):
    stored = common.read_json(path)
    # A measurement on another number of test examples is made again.
    if stored.get("count") == len(test):
      return stored
  checkpointer = checkpointing.Checkpointer(os.path.join(run_dir, "checkpoints"))
  state = checkpointer.restore(step, state_template)
  checkpointer.close()
  metrics = evaluation.evaluate(
      state.params, config, test.images, test.labels, mesh=mesh,
      batch_size=FLAGS.eval_batch_size)
  metrics["step"] = step

  x = training.images_to_float(test.images[:FLAGS.grid_images])
  x_hat = _perceive(jax.device_get(state.params), config, x).x_hat
  columns = min(FLAGS.grid_images, 16)
  # Rows alternate: a row of test images, then their reconstructions.
  rows = []
  for start in range(0, len(x), columns):
    rows.extend([np.asarray(x[start:start + columns]),
                 np.asarray(x_hat[start:start + columns])])
  if common.is_writer():
    images_lib.save_grid(
        os.path.join(run_dir, f"recon_step{step}.png"), np.concatenate(rows),
        columns=columns, scale=2)
  common.write_json(path, metrics)
  return metrics


def _run_model(arch, model, steps, train, test, mesh, out_dir) -> dict:
  """Train one model and measure it at every step; a divergence is recorded."""
  config = config_lib.make_config(arch, model, **common.model_overrides())
  run_dir = os.path.join(out_dir, f"{arch}_{model}")
  options = common.train_options(steps[-1], keep_steps=steps)
  logging.info("Model %s %s: %s", arch, model, config)
  started = time.perf_counter()
  try:
    state = train_loop.train(config, options, train.images, train.labels,
                             run_dir, mesh=mesh)
  except train_loop.NonFiniteLossError as error:
    logging.error("%s %s diverged: %s", arch, model, error)
    return {"status": "diverged", "message": str(error)}
  train_seconds = time.perf_counter() - started
  measurements = {}
  for step in steps:
    measurements[str(step)] = _measure(run_dir, config, state, step, test, mesh)
    logging.info("%s %s step %d: test reconstruction error %.5f", arch, model,
                 step, measurements[str(step)]["mse"])
  return {"status": "ok", "train_seconds_this_run": train_seconds,
          "measurements": measurements}


def _table(results: dict, steps: list[int]) -> str:
  header = ["model", "arch"] + [f"tau = {s}" for s in steps]
  lines = [
      f"Test reconstruction error on {FLAGS.dataset} (mean over the"
      f" {results['test_examples']} test images and their pixels of"
      " (x - x_hat)^2). In brackets: the paper's MNIST number at the same"
      " iteration.", "",
      "| " + " | ".join(header) + " |",
      "|" + " --- |" * len(header),
  ]
  for key, entry in results["models"].items():
    arch, model = key.split("/")
    cells = [MODEL_NAMES[model], arch.upper()]
    for step in steps:
      if entry["status"] != "ok":
        cells.append(entry["status"])
        continue
      value = entry["measurements"][str(step)]["mse"]
      paper = PAPER_MNIST[model].get(step) if FLAGS.dataset == "mnist" else None
      cells.append(f"{value:.4f}" + (f" ({paper})" if paper is not None else ""))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv):
  if len(argv) > 1:
    common.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  common.quiet_library_logs()
  steps = _check_flags()
  out_dir = os.path.join(FLAGS.workdir, FLAGS.dataset)
  common.write_flags(out_dir)
  logging.info("Flags:\n%s", FLAGS.flags_into_string())
  train, test = common.load_data()
  mesh = parallel.create_mesh()
  logging.info("Training on %d device(s): %s", mesh.devices.size,
               jax.devices()[0].platform)

  started = time.perf_counter()
  results = {"dataset": FLAGS.dataset, "eval_steps": steps,
             "test_examples": len(test), "models": {}}
  for arch in FLAGS.archs:
    for model in FLAGS.models:
      results["models"][f"{arch}/{model}"] = _run_model(
          arch, model, steps, train, test, mesh, out_dir)
  results["wall_seconds_this_run"] = time.perf_counter() - started
  if FLAGS.dataset == "mnist":
    results["paper_mnist"] = {
        m: {str(s): v for s, v in d.items()} for m, d in PAPER_MNIST.items()}

  common.write_json(os.path.join(out_dir, "results.json"), results)
  common.write_text(os.path.join(out_dir, "results.md"), _table(results, steps))
  if common.is_writer():
    logging.info("Results written to %s:\n%s", out_dir,
                 _table(results, steps))
  common.fail_if_diverged(results, out_dir)


if __name__ == "__main__":
  common.run(main)
