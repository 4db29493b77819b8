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
  python -m benchmarks.train_step --archs=cnn --microbatch_sizes=none,50
  python -m benchmarks.train_step --archs=cnn --steps_per_call=1,10
  python -m benchmarks.train_step --archs=cnn --batch_sizes=50 \
      --reflections=8 --remat --remat_carries=none,2
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from absl import app
from absl import flags

from benchmarks import cli
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
flags.DEFINE_list(
    "remat_carries", ["none"],
    "Values of remat_carries to time with --remat, one table each: the most"
    " carries the backward pass stores besides the first (model.perceive);"
    " 'none' stores one per reflection.")
flags.DEFINE_enum("conv_impl", "patches", list(config_lib.CONV_IMPLS),
                  "Formulation of the convolutions.")
flags.DEFINE_list(
    "microbatch_sizes", ["auto"],
    "Values of make_train_step's microbatch_size to time, one table each;"
    " 'none' runs the whole batch at once, 'auto' is the default of"
    " make_train_step.")
flags.DEFINE_list("conv_impls", None,
                  "Formulations of the convolutions to time, one table each;"
                  " overrides --conv_impl.")
flags.DEFINE_list(
    "steps_per_call", ["1"],
    "Training steps per call to time, one table each; above 1 the steps run"
    " in one compiled lax.scan (make_multi_train_step).")
flags.DEFINE_float("min_seconds", 2.0,
                   "Minimum timed duration of each measurement, in seconds.")
flags.DEFINE_integer(
    "rounds", 3,
    "Timing rounds per measurement, alternating between variants; the best"
    " round is reported.")
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


def prepare_step(arch: str, model: str, batch_size: int, mesh, *,
                 conv_impl: str, microbatch_size: int | str | None,
                 steps_per_call: int = 1,
                 remat_carries: int | None = None) -> dict:
  """Compile one model's training step at one batch size, without timing it.

  Returns:
    The row of results so far, with a `run_once` entry that runs one call
    (`steps_per_call` steps) and returns its loss.
  """
  config = config_lib.make_config(arch, model, conv_impl=conv_impl)
  options = train_loop.TrainOptions(num_train_steps=1, batch_size=batch_size,
                                    reflections=FLAGS.reflections,
                                    remat=FLAGS.remat,
                                    remat_carries=remat_carries)
  state = train_loop.initial_state(config, options, mesh)
  step = training.make_train_step(config, mesh, reflections=FLAGS.reflections,
                                  remat=FLAGS.remat,
                                  remat_carries=remat_carries,
                                  microbatch_size=microbatch_size)
  rng = np.random.default_rng(0)
  host_batch = {
      "image": rng.integers(0, 256, (batch_size, 28, 28, 1), np.uint8),
      "label": rng.integers(0, 10, (batch_size,), np.int32),
  }
  batch = parallel.put_batch(host_batch, mesh)
  call, call_batch = step, batch
  if steps_per_call > 1:
    call = training.make_multi_train_step(
        config, mesh, reflections=FLAGS.reflections, remat=FLAGS.remat,
        remat_carries=remat_carries, microbatch_size=microbatch_size)
    stacked = {
        name: np.stack([array] * steps_per_call)
        for name, array in host_batch.items()
    }
    call_batch = jax.device_put(
        stacked,
        NamedSharding(mesh, PartitionSpec(None, parallel.DATA_AXIS)))

  started = time.perf_counter()
  compiled = call.lower(state, call_batch).compile()
  compile_seconds = time.perf_counter() - started
  chunk_size = training.resolve_microbatch_size(microbatch_size, batch_size,
                                                mesh, config)
  if steps_per_call == 1 and (chunk_size is None or chunk_size >= batch_size):
    cost = compiled.cost_analysis()
  else:
    # XLA counts a loop body once, whatever its trip count, so the FLOPs of
    # microbatched or scanned steps come from the unoptimised program of one
    # full-batch step.
    full_step = training.make_train_step(
        config, mesh, reflections=FLAGS.reflections, remat=FLAGS.remat,
        remat_carries=remat_carries, microbatch_size=None)
    cost = full_step.lower(state, batch).cost_analysis()
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
    holder["state"], metrics = compiled(holder["state"], call_batch)
    return metrics["loss"]

  return {
      "arch": arch,
      "model": model,
      "batch_size": batch_size,
      "reflections": FLAGS.reflections,
      "remat": FLAGS.remat,
      "remat_carries": remat_carries,
      "conv_impl": conv_impl,
      "microbatch_size": microbatch_size,
      "steps_per_call": steps_per_call,
      "compile_seconds": compile_seconds,
      "flops_per_step": flops,
      "memory_bytes": memory_bytes,
      "run_once": run_once,
  }


def time_steps(rows: list[dict]) -> None:
  """Time the prepared steps of `rows` in alternating rounds.

  Each row gets `--rounds` rounds of `min_seconds / rounds`, and the rows
  take turns, so a change in the load of a shared machine hits all of them
  alike. The best round of each row is kept, as the one least slowed by
  other processes.
  """
  seconds = FLAGS.min_seconds / FLAGS.rounds
  for row in rows:
    row["steps_timed"], row["call_rate"] = 0, 0.0
  for _ in range(FLAGS.rounds):
    for row in rows:
      rate, calls = _timed_rate(row["run_once"], seconds)
      row["steps_timed"] += calls * row["steps_per_call"]
      row["call_rate"] = max(row["call_rate"], rate)
  for row in rows:
    call_rate = row.pop("call_rate")
    del row["run_once"]
    step_rate = call_rate * row["steps_per_call"]
    row["images_per_second"] = step_rate * row["batch_size"]
    row["gflops_per_second"] = step_rate * row["flops_per_step"] / 1e9


def print_table(rows: list[dict]) -> None:
  """Print timed rows as a Markdown table."""
  print("| arch | model | batch | images/s | compile s | GFLOP/step |"
        " GFLOP/s | roofline share | memory MiB |")
  print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  for row in rows:
    memory = ("n/a" if row["memory_bytes"] is None else
              f"{row['memory_bytes'] / 2**20:.1f}")
    print(f"| {row['arch']} | {row['model']} | {row['batch_size']} |"
          f" {row['images_per_second']:,.0f} |"
          f" {row['compile_seconds']:.2f} |"
          f" {row['flops_per_step'] / 1e9:.3f} |"
          f" {row['gflops_per_second']:.1f} |"
          f" {100 * row['roofline_share']:.1f}% | {memory} |")


def _parse_microbatch_size(value: str) -> int | str | None:
  if value.lower() == "none":
    return None
  if value == "auto":
    return value
  try:
    return int(value)
  except ValueError:
    raise app.UsageError(
        f"--microbatch_sizes contains {value!r}; expected positive integers,"
        " 'auto' or 'none'") from None


def _parse_remat_carries(value: str) -> int | None:
  if value.lower() == "none":
    return None
  try:
    carries = int(value)
  except ValueError:
    carries = -1
  if carries < 0:
    raise app.UsageError(
        f"--remat_carries contains {value!r}; expected integers >= 0 or"
        " 'none'")
  if not FLAGS.remat:
    raise app.UsageError(f"--remat_carries={value} needs --remat; add"
                         " --remat or use --remat_carries=none")
  return carries


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
  if FLAGS.rounds < 1:
    raise app.UsageError(f"--rounds={FLAGS.rounds} is invalid; expected >= 1")
  for name in ("microbatch_sizes", "steps_per_call", "remat_carries"):
    if not getattr(FLAGS, name):
      raise app.UsageError(f"--{name} is empty; expected at least one value")
  remat_carries = [_parse_remat_carries(value) for value in
                   FLAGS.remat_carries]
  microbatch_sizes = [_parse_microbatch_size(m) for m in FLAGS.microbatch_sizes]
  conv_impls = FLAGS.conv_impls or [FLAGS.conv_impl]
  try:
    steps_per_call = [int(n) for n in FLAGS.steps_per_call]
  except ValueError:
    raise app.UsageError(
        f"--steps_per_call={','.join(FLAGS.steps_per_call)} is invalid;"
        " expected comma-separated positive integers") from None
  if min(steps_per_call) < 1:
    raise app.UsageError(
        f"--steps_per_call={','.join(FLAGS.steps_per_call)} is invalid;"
        " expected positive integers")
  for conv_impl in conv_impls:
    if conv_impl not in config_lib.CONV_IMPLS:
      raise app.UsageError(
          f"--conv_impls contains {conv_impl!r}; expected values from"
          f" {config_lib.CONV_IMPLS}")

  roofline = matmul_roofline(FLAGS.matmul_size, FLAGS.min_seconds)
  print(f"devices: {mesh.devices.size} x {jax.devices()[0].device_kind};"
        f" float32 {FLAGS.matmul_size}^3 matmul roofline:"
        f" {roofline:.1f} GFLOP/s")

  rows = []
  # One table per variant; the variants of one (arch, model, batch) are timed
  # together, see `time_steps`.
  variants = [(c, m, n, r) for c in conv_impls for m in microbatch_sizes
              for n in steps_per_call for r in remat_carries]
  tables = {variant: [] for variant in variants}
  for arch in FLAGS.archs:
    for model in FLAGS.models:
      for batch_size in batch_sizes:
        group = [
            prepare_step(arch, model, batch_size, mesh, conv_impl=conv_impl,
                         microbatch_size=microbatch_size, steps_per_call=steps,
                         remat_carries=carries)
            for conv_impl, microbatch_size, steps, carries in variants
        ]
        time_steps(group)
        for row in group:
          row["roofline_gflops_per_second"] = roofline
          row["roofline_share"] = row["gflops_per_second"] / roofline
          rows.append(row)
          variant = (row["conv_impl"], row["microbatch_size"],
                     row["steps_per_call"], row["remat_carries"])
          tables[variant].append(row)
          print(f"timed {arch} {model} batch {batch_size} conv_impl"
                f" {variant[0]} microbatch_size {variant[1]} steps_per_call"
                f" {variant[2]} remat_carries {variant[3]}:"
                f" {row['images_per_second']:,.0f} images/s", flush=True)

  for (conv_impl, microbatch_size, steps, carries), table in tables.items():
    print()
    print(f"reflections {FLAGS.reflections}, remat {FLAGS.remat},"
          f" remat_carries {carries}, conv_impl {conv_impl}, microbatch_size"
          f" {microbatch_size}, steps_per_call {steps}")
    print_table(table)

  if FLAGS.json_out:
    with open(FLAGS.json_out, "w", encoding="utf-8") as stream:
      json.dump(rows, stream, indent=2)


if __name__ == "__main__":
  cli.run(main)
