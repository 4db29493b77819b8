r"""Associative recall of digits on MNIST / Fashion-MNIST: AE, Lmser(un-n), Lmser(un).

Trains each model for the FC and CNN architectures. Then it hides part of
every test image (the lower half, or a random block of half the height and
width) and measures recall: the error and PSNR on the hidden pixels after
each of `--recall_reflections` reflections. A baseline fills the hidden
pixels with the training mean. Writes under `--workdir`/`--dataset`:

  results.json, results.md      every measurement and the table
  panel_<mask>.png              masked input, each model's recall, the truth
  <arch>_<model>/               one run: checkpoints/, metrics.jsonl,
                                recall.json

Usage:
  python -m experiments.mnist_assoc \
      --flagfile=experiments/configs/mnist_assoc.flags --data_dir=DIR

Rerunning the same command resumes.
"""

import os

import jax
import numpy as np
from absl import flags
from absl import logging

from experiments import common
from experiments import recall_report
from lmser_jax import config as config_lib
from lmser_jax import masks as masks_lib
from lmser_jax import parallel

FLAGS = flags.FLAGS

_MODELS = ("ae", "lmser_un_n", "lmser_un")

flags.DEFINE_list("archs", ["fc", "cnn"], "Architectures: fc, cnn.")
flags.DEFINE_list("models", list(_MODELS),
                  f"Models, any of {', '.join(_MODELS)}.")
flags.DEFINE_integer("train_steps", 5000, "Training steps of every model.")
flags.DEFINE_list("masks", list(masks_lib.DIGIT_MASKS),
                  f"Masks, any of {', '.join(masks_lib.DIGIT_MASKS)}.")
flags.DEFINE_list("recall_reflections", ["1", "5"],
                  "Reflection counts after which recall is measured.")
flags.DEFINE_enum("fill", "mean", ["mean", "zero"],
                  "Start value of hidden pixels: the training mean image, or"
                  " zero.")
flags.DEFINE_integer("panel_images", 12, "Test images shown per panel.")


def main(argv):
  if len(argv) > 1:
    common.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  common.quiet_library_logs()
  common.check_common_flags()
  common.check_list_flag("archs", config_lib.ARCHITECTURES)
  common.check_list_flag("models", _MODELS)
  common.check_list_flag("masks", masks_lib.DIGIT_MASKS)
  common.require_positive(train_steps=FLAGS.train_steps,
                          panel_images=FLAGS.panel_images)
  reflections = common.parse_int_list("recall_reflections")

  out_dir = os.path.join(FLAGS.workdir, FLAGS.dataset)
  common.write_flags(out_dir)
  logging.info("Flags:\n%s", FLAGS.flags_into_string())
  train, test = common.load_data()
  mesh = parallel.create_mesh()
  logging.info("Training on %d device(s): %s", mesh.devices.size,
               jax.devices()[0].platform)

  fill = train.images.mean(axis=0, dtype=np.float64).astype(np.float32) / 255
  if FLAGS.fill == "zero":
    fill = fill * 0

  models = []
  for arch in FLAGS.archs:
    for model in FLAGS.models:
      config = config_lib.make_config(arch, model, **common.model_overrides())
      models.append((f"{arch}_{model}",
                     f"{recall_report.MODEL_NAMES[model]} {arch.upper()}",
                     config))
  setup = recall_report.Setup(
      train_images=train.images, test_images=test.images, fill=fill,
      fill_name="the training mean" if FLAGS.fill == "mean" else "zero",
      mask_names=tuple(FLAGS.masks), reflections=reflections,
      num_train_steps=FLAGS.train_steps,
      eval_batch_size=FLAGS.eval_batch_size, panel_images=FLAGS.panel_images,
      seed=FLAGS.seed, out_dir=out_dir)
  recall_report.run(models, setup, FLAGS.dataset, mesh)


if __name__ == "__main__":
  common.run(main)
