r"""Benchmark of the compiled training step for every model.

For each architecture, model and batch size, prints training images per
second, compile time, FLOPs per step from XLA's cost analysis, achieved
GFLOP/s and its share of a float32 matrix-product roofline measured in the
same run, and the compiled step's memory (arguments, outputs and
temporaries, from XLA's memory analysis).

Usage:
  python -m benchmarks.train_step                # all 8 models, batch 50, 500
  python -m benchmarks.train_step --archs=cnn --batch_sizes=500 \
      --reflections=8 --remat
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from lmser_jax import config as config_lib
from lmser_jax import parallel
from lmser_jax import train_loop
from lmser_jax import training

FLAGS = flags.FLAGS
flags.DEFINE_list("archs", ["fc", "cnn"], "Architectures to time.")
flags.DEFINE_list("models", list(config_lib.MODELS), "Models to time.")
flags.DEFINE_list("batch_sizes", ["50", "500"], "Batch sizes to time.")
flags.DEFINE_integer("reflections", 1, "Reflections per training step.")
flags.DEFINE_bool("remat", False, "Recompute reflections in the backward pass.")
flags.DEFINE_enum("conv_impl", "patches", list(config_lib.CONV_IMPLS),
                  "Formulation of the convolutions.")
flags.DEFINE_float("min_seconds", 2.0,
                   "Minimum timed duration of each measurement, in seconds.")
flags.DEFINE_integer("matmul_size", 2048,
                     "Side of the square float32 matrices of the roofline.")
flags.DEFINE_string("json_out", None, "Also write the rows as JSON here.")


def _timed_rate(run_once, min_seconds: float) -> tuple[float, int]:
  """Calls per second of `run_once`, timed for at least `min_seconds`."""
  jax.block_until_ready(run_once())
  calls, started = 0, time.perf_counter()
  result = None
  while True:
    result = run_once()
    calls += 1
    if calls % 5 == 0:
      jax.block_until_ready(result)
      elapsed = time.perf_counter() - started
      if elapsed >= min_seconds:
        return calls / elapsed, calls


def matmul_roofline(size: int, min_seconds: float) -> float:
  """Achieved GFLOP/s of a float32 `size x size` matrix product."""
  keys = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(keys[0], (size, size), jnp.float32)
  b = jax.random.normal(keys[1], (size, size), jnp.float32)
  product = jax.jit(jnp.matmul)
  rate, _ = _timed_rate(lambda: product(a, b), min_seconds)
  return rate * 2 * size**3 / 1e9


def benchmark_step(arch: str, model: str, batch_size: int, mesh) -> dict:
  """Time one model's training step at one batch size."""
  config = config_lib.make_config(arch, model, conv_impl=FLAGS.conv_impl)
  options = train_loop.TrainOptions(num_train_steps=1, batch_size=batch_size,
                                    reflections=FLAGS.reflections,
                                    remat=FLAGS.remat)
  state = train_loop.initial_state(config, options, mesh)
  step = training.make_train_step(config, mesh, reflections=FLAGS.reflections,
                                  remat=FLAGS.remat)
  rng = np.random.default_rng(0)
  batch = parallel.put_batch({
      "image": rng.integers(0, 256, (batch_size, 28, 28, 1), np.uint8),
      "label": rng.integers(0, 10, (batch_size,), np.int32),
  }, mesh)

  started = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_seconds = time.perf_counter() - started
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
  memory = compiled.memory_analysis()
  memory_bytes = None
  if memory is not None:
    memory_bytes = (memory.argument_size_in_bytes +
                    memory.output_size_in_bytes +
                    memory.temp_size_in_bytes - memory.alias_size_in_bytes)

  holder = {"state": state}

  def run_once():
    holder["state"], metrics = compiled(holder["state"], batch)
    return metrics["loss"]

  rate, steps = _timed_rate(run_once, FLAGS.min_seconds)
  return {
      "arch": arch,
      "model": model,
      "batch_size": batch_size,
      "reflections": FLAGS.reflections,
      "remat": FLAGS.remat,
      "images_per_second": rate * batch_size,
      "steps_timed": steps,
      "compile_seconds": compile_seconds,
      "flops_per_step": flops,
      "gflops_per_second": rate * flops / 1e9,
      "memory_bytes": memory_bytes,
  }


def main(argv):
  del argv
  mesh = parallel.create_mesh()
  try:
    batch_sizes = [int(b) for b in FLAGS.batch_sizes]
  except ValueError:
    raise app.UsageError(
        f"--batch_sizes={','.join(FLAGS.batch_sizes)} is invalid; expected"
        " comma-separated positive integers")
  for batch_size in batch_sizes:
    parallel.check_batch_size(batch_size, mesh, flag="batch_sizes")
  roofline = matmul_roofline(FLAGS.matmul_size, FLAGS.min_seconds)
  print(f"devices: {mesh.devices.size} x {jax.devices()[0].device_kind};"
        f" float32 {FLAGS.matmul_size}^3 matmul roofline:"
        f" {roofline:.1f} GFLOP/s")
  print(f"reflections {FLAGS.reflections}, remat {FLAGS.remat},"
        f" conv_impl {FLAGS.conv_impl}")
  print("| arch | model | batch | images/s | compile s | GFLOP/step |"
        " GFLOP/s | roofline share | memory MiB |")
  print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  rows = []
  for arch in FLAGS.archs:
    for model in FLAGS.models:
      for batch_size in batch_sizes:
        row = benchmark_step(arch, model, batch_size, mesh)
        row["roofline_gflops_per_second"] = roofline
        row["roofline_share"] = row["gflops_per_second"] / roofline
        rows.append(row)
        memory = ("n/a" if row["memory_bytes"] is None else
                  f"{row['memory_bytes'] / 2**20:.1f}")
        print(f"| {arch} | {model} | {batch_size} |"
              f" {row['images_per_second']:,.0f} |"
              f" {row['compile_seconds']:.2f} |"
              f" {row['flops_per_step'] / 1e9:.3f} |"
              f" {row['gflops_per_second']:.1f} |"
              f" {100 * row['roofline_share']:.1f}% | {memory} |",
              flush=True)
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w", encoding="utf-8") as stream:
      json.dump(rows, stream, indent=2)


if __name__ == "__main__":
  app.run(main)
