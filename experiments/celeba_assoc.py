r"""Associative recall of faces on CelebA: AE, Lmser(un-n) and Lmser(un).

Trains each model on aligned CelebA faces (the centre crop, resized to
`--image_size`). Then it hides part of each held-out face (an eye band, a
central square, a random block, the lower half) and measures how well the
model recalls it: the error and PSNR on the hidden pixels after each of
`--recall_reflections` reflections. A baseline fills the hidden pixels with
the training mean. Writes under `--workdir`/celeba_<size>:

  results.json, results.md      every measurement and the table
  panel_<mask>.png              masked input, each model's recall, the truth
  <model>/                      one run: checkpoints/, metrics.jsonl,
                                recall.json

Usage:
  python -m experiments.celeba_assoc \
      --flagfile=experiments/configs/celeba_assoc.flags --data_dir=DIR

DIR is a folder of aligned CelebA images (`img_align_celeba` layout, full
size or uniformly scaled, such as ../shared/datasets/celeba-aligned-half).
Without --data_dir the faces come from tensorflow-datasets' `celeb_a`.
Rerunning the same command resumes.
"""

import os

import jax
from absl import flags
from absl import logging

from experiments import common
from experiments import recall_report
from lmser_jax import config as config_lib
from lmser_jax import masks as masks_lib
from lmser_jax import parallel
from lmser_jax.data import celeba
from lmser_jax.data import idx

FLAGS = flags.FLAGS

_MODELS = ("ae", "lmser_un_n", "lmser_un")

flags.DEFINE_integer("image_size", 64,
                     "Side of the square face crop: 128, 64 or 32.")
flags.DEFINE_list("models", list(_MODELS),
                  f"Models, any of {', '.join(_MODELS)}.")
flags.DEFINE_integer("train_steps", 1000, "Training steps of every model.")
flags.DEFINE_integer("code_dim", 256, "Units of the code layer.")
flags.DEFINE_list("masks", list(masks_lib.FACE_MASKS),
                  f"Masks, any of {', '.join(masks_lib.FACE_MASKS)}.")
flags.DEFINE_list("recall_reflections", ["1", "5"],
                  "Reflection counts after which recall is measured.")
flags.DEFINE_enum("fill", "mean", ["mean", "zero"],
                  "Start value of hidden pixels: the training mean image, or"
                  " zero.")
flags.DEFINE_string("train_ids", "000001-009000",
                    "CelebA ids of the training faces, FIRST-LAST inclusive"
                    " (with --data_dir).")
flags.DEFINE_string("test_ids", "009001-010000",
                    "CelebA ids of the held-out faces, FIRST-LAST inclusive"
                    " (with --data_dir).")
flags.DEFINE_string("tfds_train_split", "train",
                    "celeb_a split of the training faces (without"
                    " --data_dir).")
flags.DEFINE_string("tfds_test_split", "test[:1000]",
                    "celeb_a split of the held-out faces (without"
                    " --data_dir).")
flags.DEFINE_string("cache_dir", None,
                    "Folder of the decoded-face cache (default:"
                    " --workdir/cache).")
flags.DEFINE_integer("panel_images", 8, "Held-out faces shown per panel.")


def _check_flags():
  common.check_common_flags(data_description="aligned CelebA JPEG images")
  common.check_list_flag("models", _MODELS)
  common.check_list_flag("masks", masks_lib.FACE_MASKS)
  common.require_positive(train_steps=FLAGS.train_steps,
                          code_dim=FLAGS.code_dim,
                          panel_images=FLAGS.panel_images)
  try:
    config_lib.face_layers(FLAGS.image_size)
  except ValueError as error:
    common.fail(f"--{error}")
  ids = {}
  for name in ("train_ids", "test_ids"):
    try:
      ids[name] = celeba.parse_id_range(getattr(FLAGS, name))
    except ValueError as error:
      common.fail(f"--{name}={getattr(FLAGS, name)} is invalid: {error}")
  (_, train_last), (test_first, test_last) = ids["train_ids"], ids["test_ids"]
  if test_first <= train_last and ids["train_ids"][0] <= test_last:
    common.fail(f"--train_ids={FLAGS.train_ids} and --test_ids="
                f"{FLAGS.test_ids} overlap; expected disjoint ranges")
  return ids, common.parse_int_list("recall_reflections")


def _load(ids):
  cache_dir = FLAGS.cache_dir or os.path.join(FLAGS.workdir, "cache")
  if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
    common.fail(f"--cache_dir={cache_dir} is a file; expected a directory for"
                " the decoded faces")
  try:
    if FLAGS.data_dir is not None:
      train = celeba.load_folder_split(FLAGS.data_dir, ids["train_ids"],
                                       FLAGS.image_size, cache_dir)
      test = celeba.load_folder_split(FLAGS.data_dir, ids["test_ids"],
                                      FLAGS.image_size, cache_dir)
    else:
      train = celeba.load_tfds_split(FLAGS.tfds_train_split,
                                     FLAGS.image_size, cache_dir)
      test = celeba.load_tfds_split(FLAGS.tfds_test_split, FLAGS.image_size,
                                    cache_dir)
  except idx.DataError as error:
    common.fail(str(error))
  except OSError as error:
    common.fail(f"--cache_dir={cache_dir}: could not write the face cache"
                f" ({error.strerror or error})")
  test_images = test.images
  if FLAGS.eval_examples:
    test_images = test_images[:FLAGS.eval_examples]
  if FLAGS.batch_size > len(train):
    common.fail(f"--batch_size={FLAGS.batch_size} is larger than the"
                f" {len(train)} training faces")
  logging.info("Faces %dx%d: %d for training, %d held out (cache %s).",
               FLAGS.image_size, FLAGS.image_size, len(train),
               len(test_images), cache_dir)
  return train.images, test_images


def main(argv):
  if len(argv) > 1:
    common.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  common.quiet_library_logs()
  ids, reflections = _check_flags()
  out_dir = os.path.join(FLAGS.workdir, f"celeba_{FLAGS.image_size}")
  common.write_flags(out_dir)
  logging.info("Flags:\n%s", FLAGS.flags_into_string())
  train_images, test_images = _load(ids)
  mesh = parallel.create_mesh()
  logging.info("Training on %d device(s): %s", mesh.devices.size,
               jax.devices()[0].platform)
  fill = celeba.mean_image(train_images)
  if FLAGS.fill == "zero":
    fill = fill * 0
  size = FLAGS.image_size
  models = []
  for model in FLAGS.models:
    config = config_lib.make_config(
        "cnn", model, input_shape=(size, size, 3),
        layers=config_lib.face_layers(size, FLAGS.code_dim),
        **common.model_overrides())
    models.append((model, recall_report.MODEL_NAMES[model], config))
  setup = recall_report.Setup(
      train_images=train_images, test_images=test_images, fill=fill,
      fill_name="the training mean" if FLAGS.fill == "mean" else "zero", mask_names=tuple(FLAGS.masks),
      reflections=reflections, num_train_steps=FLAGS.train_steps,
      eval_batch_size=FLAGS.eval_batch_size, panel_images=FLAGS.panel_images,
      seed=FLAGS.seed, out_dir=out_dir)
  recall_report.run(models, setup, f"CelebA {size}x{size}", mesh)


if __name__ == "__main__":
  common.run(main)
