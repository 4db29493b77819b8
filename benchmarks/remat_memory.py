r"""Memory of the compiled training step as reflections grow, with and without remat.

For every model and batch size, compiles `training.make_train_step` with 1
reflection and with `--reflections` (8 by default). The larger count is
compiled three ways:
- without `remat`;
- with `remat`, which recomputes each reflection in the backward pass
  instead of storing its activations, but stores one carry (the state passed
  between reflections) per reflection;
- with `remat` and `remat_carries=--remat_carries`, which stores only that
  many carries and recomputes the others.
The script prints XLA's memory analysis of each compiled step (arguments,
outputs and temporaries, less the donated buffers that outputs reuse) and
the ratios to the 1-reflection step, all measured in one run. Nothing is
executed, so the numbers do not depend on the load of the machine.

Usage:
  python -m benchmarks.remat_memory
  python -m benchmarks.remat_memory --archs=cnn --batch_sizes=500 \
      --reflections=16 --remat_carries=1
"""

import jax
import numpy as np
from absl import app
from absl import flags

from benchmarks import cli
from lmser_jax import config as config_lib
from lmser_jax import parallel
from lmser_jax import train_loop
from lmser_jax import training

FLAGS = flags.FLAGS

flags.DEFINE_list("archs", ["fc", "cnn"], "Architectures.")
flags.DEFINE_list("models", ["lmser_un", "lmser_sup"], "Models.")
flags.DEFINE_list("batch_sizes", ["50", "500"], "Batch sizes.")
flags.DEFINE_integer("reflections", 8, "The larger number of reflections.")
flags.DEFINE_integer(
    "remat_carries", 2,
    "Carries stored besides the first in the last column (remat_carries of"
    " model.perceive).")


def step_memory(config, batch_size: int, reflections: int, remat: bool,
                mesh, remat_carries: int | None = None) -> int:
  """Bytes of XLA's memory analysis of one compiled training step."""
  options = train_loop.TrainOptions(num_train_steps=1, batch_size=batch_size,
                                    reflections=reflections, remat=remat,
                                    remat_carries=remat_carries)
  state = train_loop.initial_state(config, options, mesh)
  step = training.make_train_step(config, mesh, reflections=reflections,
                                  remat=remat, remat_carries=remat_carries)
  height, width, channels = config.input_shape
  batch = parallel.put_batch({
      "image": np.zeros((batch_size, height, width, channels), np.uint8),
      "label": np.zeros((batch_size,), np.int32),
  }, mesh)
  memory = step.lower(state, batch).compile().memory_analysis()
  return (memory.argument_size_in_bytes + memory.output_size_in_bytes +
          memory.temp_size_in_bytes - memory.alias_size_in_bytes)


def main(argv):
  cli.check_no_arguments(argv)
  if FLAGS.reflections < 2:
    raise app.UsageError(f"--reflections={FLAGS.reflections} is invalid;"
                         " expected at least 2")
  if FLAGS.remat_carries < 0:
    raise app.UsageError(f"--remat_carries={FLAGS.remat_carries} is invalid;"
                         " expected an integer >= 0")
  cli.check_choices("archs", FLAGS.archs, config_lib.ARCHITECTURES)
  cli.check_choices("models", FLAGS.models, config_lib.MODELS)
  try:
    batch_sizes = [int(b) for b in FLAGS.batch_sizes]
  except ValueError:
    batch_sizes = []
  if not batch_sizes or min(batch_sizes) < 1:
    raise app.UsageError(
        f"--batch_sizes={','.join(FLAGS.batch_sizes)} is invalid; expected"
        " comma-separated positive integers")
  mesh = parallel.create_mesh()
  k = FLAGS.reflections
  carries = (f"{FLAGS.remat_carries} carr"
             f"{'y' if FLAGS.remat_carries == 1 else 'ies'}")
  print(f"jax {jax.__version__}, {mesh.devices.size} {jax.default_backend()}"
        " device(s); MiB of the compiled training step")
  print()
  print(f"| arch | model | batch | 1 refl. | {k} refl. | {k} refl. + remat |"
        f" {k} refl. + remat, {carries} | {k} / 1 | {k} + remat / 1 |"
        f" {k} + remat, {carries} / 1 |")
  print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  for arch in FLAGS.archs:
    for model in FLAGS.models:
      config = config_lib.make_config(arch, model)
      for batch_size in batch_sizes:
        single = step_memory(config, batch_size, 1, False, mesh)
        many = step_memory(config, batch_size, k, False, mesh)
        many_remat = step_memory(config, batch_size, k, True, mesh)
        few_carries = step_memory(config, batch_size, k, True, mesh,
                                  remat_carries=FLAGS.remat_carries)
        mib = lambda size: f"{size / 2**20:.1f}"
        print(f"| {arch} | {model} | {batch_size} | {mib(single)} |"
              f" {mib(many)} | {mib(many_remat)} | {mib(few_carries)} |"
              f" {many / single:.2f}x | {many_remat / single:.2f}x |"
              f" {few_carries / single:.2f}x |", flush=True)


if __name__ == "__main__":
  cli.run(main)
