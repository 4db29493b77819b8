r"""Generation on MNIST / Fashion-MNIST from top codes set by hand.

Trains, for each of `--archs`:

  lmser_sup     Lmser(sup) with 10 label units and `--num_style` Gaussian
                style units, whose training noise (`--style_noise_std`) is
                drawn in training only;
  lmser_sup_n   the same with DPN off (DCW on): the decoder receives
                nothing but the code, so everything it draws must pass
                through the label and style units;
  lmser_un      Lmser(un) with a 10-unit code (the other unsupervised
                models of `lmser_jax.config.MODELS` work the same way);

and, when a supervised model is asked for, an independent CNN classifier
(the CNN stack with DPN off, trained on cross-entropy alone). Then, for each
number of `--gen_reflections` (0: the decoder alone; k > 0: the decoder,
then k reflections with the chosen code units clamped, see
`lmser_jax.generation.decode_codes`), it draws:

  supervised    for every label, a grid over the first two style units
                (`style_grid_r<k>_label<c>.png`), and for every style unit
                one sweep per label (`style_unit<j>_r<k>.png`, a row per
                label). The classifier labels the grid images and images of
                random styles; the share that gets the requested label is
                the label consistency. Test images are also redrawn with
                another label clamped (`relabel.png`: test images, then
                the redrawn images).
  unsupervised  every code unit swept over its range on the test images,
                the others fixed at one test image's code
                (`sweep_r<k>.png`: a row per unit, the test image first).
                Units whose range is zero (dead) are listed.

It writes under `--workdir`/`--dataset`:

  results.json, results.md    every measurement, and the tables
  <arch>_<model>/             one run: checkpoints/, metrics.jsonl, the
                              PNG grids, generation.json (its finished
                              measurements)
  cnn_classifier/             the independent classifier's run

Usage:
  python -m experiments.mnist_generate \
      --flagfile=experiments/configs/mnist_generate.flags --data_dir=DIR

Rerunning the same command resumes: a model stopped mid-way continues from
its latest checkpoint, and measurements finished with the same settings are
kept (in a single-process run).
"""

import dataclasses
import functools
import math
import os
import time

import jax
import numpy as np
from absl import flags
from absl import logging

from experiments import common
from lmser_jax import config as config_lib
from lmser_jax import evaluation
from lmser_jax import generation
from lmser_jax import images as images_lib
from lmser_jax import model as model_lib
from lmser_jax import parallel
from lmser_jax import train_loop
from lmser_jax import training

FLAGS = flags.FLAGS

flags.DEFINE_list("archs", ["fc", "cnn"], "Architectures: fc, cnn.")
# Lmser(sup) with DPN off, as "lmser_un_n" is Lmser(un) with DPN off.
SUPERVISED_MODELS = ("lmser_sup", "lmser_sup_n")
MODELS = config_lib.MODELS + ("lmser_sup_n",)

flags.DEFINE_list(
    "models", ["lmser_sup", "lmser_sup_n", "lmser_un", "lmser_un_n"],
    f"Models, any of {', '.join(MODELS)}. The supervised ones"
    f" ({', '.join(SUPERVISED_MODELS)}) get style units and style grids;"
    " the others get unit sweeps.")
flags.DEFINE_integer("num_train_steps", 20000,
                     "Training iterations of every generating model.")
flags.DEFINE_integer("num_style", 2,
                     "Gaussian style units of Lmser(sup), after the 10 label"
                     " units.")
flags.DEFINE_float("style_noise_std", 1.0,
                   "Standard deviation of the Gaussian noise added to the"
                   " style units in training.")
flags.DEFINE_integer(
    "classifier_steps", 10000,
    "Training iterations of the independent CNN classifier that labels the"
    " generated images.")
flags.DEFINE_list(
    "gen_reflections", ["0", "3"],
    "Ways to generate, as numbers of reflections after decoding the chosen"
    " code: 0 is the decoder alone; k > 0 perceives the decoded image k"
    " more times with the chosen code units clamped.")
flags.DEFINE_integer("grid_size", 9,
                     "Values per style unit in a style grid, and per sweep.")
flags.DEFINE_float(
    "style_sd_range", 2.0,
    "Style grids span the mean +- this many standard deviations of what the"
    " decoder receives in training (the encoder's style value plus the"
    " training noise), estimated on the test images.")
flags.DEFINE_integer(
    "samples_per_label", 100,
    "Images of random style per label for the label consistency. A random"
    " style is the style of a random test image plus the training noise.")
flags.DEFINE_integer("sweep_values", 11,
                     "Values per code unit in a sweep of an unsupervised"
                     " code.")
flags.DEFINE_integer("sweep_image_index", 0,
                     "Test image whose code the unit sweeps start from.")
flags.DEFINE_integer("figure_scale", 2,
                     "Each pixel of a PNG grid becomes a block of this size.")

MODEL_NAMES = {
    "ae": "AE",
    "lmser_un_n": "Lmser(un-n)",
    "lmser_un": "Lmser(un)",
    "lmser_sup": "Lmser(sup)",
    "lmser_sup_n": "Lmser(sup-n)",
}
CLASSIFIER_RUN = "cnn_classifier"


@dataclasses.dataclass(frozen=True)
class Settings:
  """The parsed list flags."""
  gen_reflections: tuple[int, ...]


def _check_flags() -> Settings:
  """Reject bad flag values with a one-line error, then parse the lists."""
  # This binary's own flags come first: they need no JAX backend, so an
  # error in them is printed before JAX logs its backend search to stderr.
  for name, allowed in (("archs", config_lib.ARCHITECTURES),
                        ("models", MODELS)):
    values = getattr(FLAGS, name)
    if not values:
      common.fail(f"--{name} is empty; expected any of {', '.join(allowed)}")
    if len(set(values)) != len(values):
      common.fail(f"--{name}={','.join(values)} names a value twice")
    for value in values:
      if value not in allowed:
        common.fail(f"--{name} contains {value!r}; expected any of"
                    f" {', '.join(allowed)}")
  common.require_positive(
      num_train_steps=FLAGS.num_train_steps,
      style_noise_std=FLAGS.style_noise_std, grid_size=FLAGS.grid_size,
      style_sd_range=FLAGS.style_sd_range,
      samples_per_label=FLAGS.samples_per_label,
      sweep_values=FLAGS.sweep_values, figure_scale=FLAGS.figure_scale)
  if set(SUPERVISED_MODELS) & set(FLAGS.models):
    common.require_positive(num_style=FLAGS.num_style,
                            classifier_steps=FLAGS.classifier_steps)
  for name in ("style_noise_std", "style_sd_range"):
    value = getattr(FLAGS, name)
    if not math.isfinite(value):
      common.fail(f"--{name}={value} is invalid; expected a finite number")
  if FLAGS.sweep_image_index < 0:
    common.fail(f"--sweep_image_index={FLAGS.sweep_image_index} is invalid;"
                " expected an index >= 0 into the test split")
  settings = Settings(common.parse_int_list("gen_reflections", minimum=0))
  common.check_common_flags()
  return settings


def _model_config(arch: str, model: str) -> config_lib.ModelConfig:
  overrides = common.model_overrides()
  if model in SUPERVISED_MODELS:
    overrides.update(num_style=FLAGS.num_style,
                     style_noise_std=FLAGS.style_noise_std)
  if model == "lmser_sup_n":
    return config_lib.make_config(arch, "lmser_sup", dpn=False, **overrides)
  return config_lib.make_config(arch, model, **overrides)


def _classifier_config() -> config_lib.ModelConfig:
  # Without DPN the logits depend on the bottom-up path only, so with
  # recon_weight=0 this trains a plain CNN classifier.
  overrides = common.model_overrides()
  overrides["dpn"] = False
  return config_lib.make_config("cnn", "lmser_sup", **overrides)


@functools.partial(jax.jit, static_argnames=("config",))
def _perceive_batch(params, x, *, config):
  out = model_lib.perceive(params, config, x)
  return out.code, out.logits


@functools.partial(jax.jit, static_argnames=("config", "reflections"))
def _decode_batch(params, codes, clamped, *, config, reflections):
  return generation.decode_codes(params, config, codes,
                                 reflections=reflections, clamped=clamped)


def _pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
  padding = rows - len(array)
  if not padding:
    return array
  return np.concatenate(
      [array, np.zeros((padding,) + array.shape[1:], array.dtype)])


@functools.partial(jax.jit, static_argnames=("config",))
def _perceive_clamped_batch(params, x, codes, clamped, *, config):
  return generation.perceive_clamped(params, config, x, codes, clamped)


def _batched(fn, *inputs: np.ndarray, batch_size: int):
  """Apply `fn` to the rows of `inputs` in padded batches of `batch_size`.

  Every call gets the same shapes, so `fn` compiles once. Returns `fn`'s
  outputs (a tuple of arrays or one array) for the real rows only.
  """
  outputs = []
  for start in range(0, len(inputs[0]), batch_size):
    chunks = [array[start:start + batch_size] for array in inputs]
    count = len(chunks[0])
    result = jax.device_get(
        fn(*[_pad_rows(chunk, batch_size) for chunk in chunks]))
    outputs.append(jax.tree.map(lambda a, n=count: a[:n], result))
  return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)


def _perceive_test(params, config, images: np.ndarray):
  """Noise-free codes `(N, D)` and logits `(N, classes)` of uint8 images."""
  return _batched(
      lambda chunk: _perceive_batch(params, training.images_to_float(chunk),
                                    config=config),
      images, batch_size=FLAGS.eval_batch_size)


def _decode(params, config, codes: np.ndarray, reflections: int,
            clamped=None) -> np.ndarray:
  if clamped is None:
    clamped = np.ones((config.code_dim,), bool)
  return _batched(
      lambda chunk: _decode_batch(params, chunk, clamped, config=config,
                                  reflections=reflections),
      np.asarray(codes, np.float32), batch_size=FLAGS.eval_batch_size)


def _perceive_clamped(params, config, images: np.ndarray, codes: np.ndarray,
                      clamped: np.ndarray) -> np.ndarray:
  """Reconstructions of uint8 images with the `clamped` units set to `codes`."""
  return _batched(
      lambda x, chunk: _perceive_clamped_batch(
          params, training.images_to_float(x), chunk, clamped, config=config),
      images, np.asarray(codes, np.float32),
      batch_size=FLAGS.eval_batch_size)


def _classify(classifier, images: np.ndarray) -> np.ndarray:
  """Classifier labels `(N,)` of float images `(N, H, W, C)` in [0, 1]."""
  params, config = classifier
  logits = _batched(
      lambda chunk: _perceive_batch(params, chunk, config=config)[1],
      np.asarray(images, np.float32), batch_size=FLAGS.eval_batch_size)
  return np.argmax(logits, axis=-1)


def _code_only_mse(params, config, codes, test_images, reflections) -> float:
  """Mean squared error of test images generated from their own codes."""
  x = training.images_to_float(test_images)
  x_gen = _decode(params, config, codes, reflections)
  return float(np.mean((np.asarray(x) - x_gen) ** 2))


def _save(path: str, pictures: np.ndarray, columns: int) -> None:
  if common.is_writer():
    images_lib.save_grid(path, pictures, columns=columns,
                         scale=FLAGS.figure_scale)


class _Store:
  """The finished measurements of one run, saved after each new one.

  A multi-process run starts from an empty store, so that every process
  makes the same compiled calls.
  """

  def __init__(self, path: str):
    self.path = path
    self.values = {}
    if os.path.exists(path) and jax.process_count() == 1:
      self.values = common.read_json(path)

  def get(self, key: str, settings: dict, files: list[str]):
    entry = self.values.get(key)
    if not entry or entry.get("settings") != settings:
      return None
    if not all(os.path.exists(path) for path in files):
      return None
    return entry

  def put(self, key: str, value: dict) -> None:
    self.values[key] = value
    common.write_json(self.path, self.values)


def _style_statistics(config, styles: np.ndarray) -> dict:
  """Centre and spread of what the decoder receives in the style units.

  In training the decoder receives the encoder's style value plus noise of
  standard deviation `style_noise_std`, so the spread adds both variances.
  """
  mean = styles.mean(axis=0)
  spread = np.sqrt(styles.var(axis=0) + config.style_noise_std ** 2)
  return {"mean": mean.tolist(), "encoder_sd": styles.std(axis=0).tolist(),
          "decoder_input_sd": spread.tolist(),
          "min": styles.min(axis=0).tolist(),
          "max": styles.max(axis=0).tolist()}


def _measure_supervised(run_dir, config, params, step, test, classifier,
                        reflections_list, store) -> dict:
  """Draw the style grids of Lmser(sup) and measure their label consistency."""
  codes, logits = _perceive_test(params, config, test.images)
  test_accuracy = float(np.mean(np.argmax(logits, -1) == test.labels))
  num_classes, num_style = config.num_classes, config.num_style
  styles = codes[:, num_classes:num_classes + num_style]
  statistics = _style_statistics(config, styles)
  mean = np.asarray(statistics["mean"], np.float32)
  spread = np.asarray(statistics["decoder_input_sd"], np.float32)
  offsets = np.linspace(-FLAGS.style_sd_range, FLAGS.style_sd_range,
                        FLAGS.grid_size, dtype=np.float32)
  unit_values = mean[:, None] + spread[:, None] * offsets[None, :]

  # Every label's grid over the first two style units, the others at their
  # mean.
  grid_styles = np.asarray(generation.style_grid(
      mean, unit_values[0], unit_values[1] if num_style > 1 else None))
  labels = np.arange(num_classes)
  grid_labels = np.repeat(labels, len(grid_styles))
  grid_codes = generation.label_style_codes(
      config, grid_labels, np.tile(grid_styles, (num_classes, 1)))
  # Every style unit swept alone, a row per label.
  sweep_codes, sweep_labels = [], []
  for unit in range(num_style):
    values = np.repeat(mean[None, :], FLAGS.grid_size, axis=0)
    values[:, unit] = unit_values[unit]
    sweep_labels.append(np.repeat(labels, FLAGS.grid_size))
    sweep_codes.append(generation.label_style_codes(
        config, sweep_labels[-1], np.tile(values, (num_classes, 1))))
  # Random styles as in training: a test image's style plus the noise.
  rng = np.random.default_rng(FLAGS.seed)
  random_labels = np.repeat(labels, FLAGS.samples_per_label)
  picked = rng.integers(0, len(styles), len(random_labels))
  random_styles = styles[picked] + config.style_noise_std * rng.standard_normal(
      (len(random_labels), num_style)).astype(np.float32)
  random_codes = generation.label_style_codes(config, random_labels,
                                              random_styles)

  all_codes = np.concatenate(
      [np.asarray(grid_codes)] + [np.asarray(c) for c in sweep_codes] +
      [np.asarray(random_codes)])
  sizes = np.cumsum([len(grid_codes)] + [len(c) for c in sweep_codes])
  settings_base = {
      "train_step": step, "test_examples": len(test), "seed": FLAGS.seed,
      "grid_size": FLAGS.grid_size, "style_sd_range": FLAGS.style_sd_range,
      "samples_per_label": FLAGS.samples_per_label,
      "classifier_steps": FLAGS.classifier_steps,
  }
  results = {"test_accuracy": test_accuracy, "style": statistics,
             "grid_values": unit_values.tolist(), "generated": {}}
  for reflections in reflections_list:
    key = f"r{reflections}"
    files = [os.path.join(run_dir, f"style_grid_{key}_label{c}.png")
             for c in labels]
    files += [os.path.join(run_dir, f"style_unit{j}_{key}.png")
              for j in range(num_style)]
    settings = dict(settings_base, reflections=reflections)
    entry = store.get(key, settings, files)
    if entry is None:
      started = time.perf_counter()
      generated = _decode(params, config, all_codes, reflections)
      parts = np.split(generated, sizes)
      grid_images, sweep_images = parts[0], parts[1:-1]
      random_images = parts[-1]
      per_grid = len(grid_styles)
      for label in labels:
        _save(files[label], grid_images[label * per_grid:(label + 1) * per_grid],
              columns=FLAGS.grid_size)
      for unit in range(num_style):
        _save(files[num_classes + unit], sweep_images[unit],
              columns=FLAGS.grid_size)
      predicted_grid = _classify(classifier, grid_images)
      predicted_random = _classify(classifier, random_images)
      entry = {
          "settings": settings,
          "grid": generation.label_consistency(predicted_grid, grid_labels,
                                               num_classes),
          "random": generation.label_consistency(
              predicted_random, random_labels, num_classes),
          "code_only_mse": _code_only_mse(params, config, codes, test.images,
                                          reflections),
          "seconds": time.perf_counter() - started,
      }
      store.put(key, entry)
    logging.info(
        "%s, %d reflection(s) after decoding: label consistency %.4f on the"
        " style grids, %.4f on random styles; test images regenerated from"
        " their codes, mse %.5f", os.path.basename(run_dir), reflections,
        entry["grid"]["overall"], entry["random"]["overall"],
        entry["code_only_mse"])
    results["generated"][key] = entry
  results["relabel"] = _measure_relabel(run_dir, config, params, codes, test,
                                        classifier, settings_base, store)
  return results


def _measure_relabel(run_dir, config, params, codes, test, classifier,
                     settings_base, store) -> dict:
  """Redraw test images as another label and score them with the classifier.

  The label units are clamped to a one-hot label other than the image's
  own, and the style units keep the encoder's values. With DPN the decoder
  also receives the image's paired bottom-up inputs, so this measures how
  far the label units steer the output when the image itself is present.
  """
  num_classes = config.num_classes
  count = min(len(test), num_classes * FLAGS.samples_per_label)
  path = os.path.join(run_dir, "relabel.png")
  entry = store.get("relabel", dict(settings_base, count=count), [path])
  if entry is None:
    rng = np.random.default_rng([FLAGS.seed, 1])
    own = test.labels[:count]
    requested = (own + rng.integers(1, num_classes, count)) % num_classes
    clamped_codes = generation.label_style_codes(
        config, requested,
        codes[:count, num_classes:num_classes + config.num_style])
    clamped = np.arange(config.code_dim) < num_classes
    redrawn = _perceive_clamped(params, config, test.images[:count],
                                clamped_codes, clamped)
    predicted = _classify(classifier, redrawn)
    # Rows alternate: test images, then the same images redrawn.
    columns = min(count, 16)
    comparison = np.concatenate([
        training.images_to_float(test.images[:columns]), redrawn[:columns]])
    _save(path, comparison, columns=columns)
    entry = {
        "settings": dict(settings_base, count=count),
        "requested": generation.label_consistency(predicted, requested,
                                                  num_classes),
        "kept_own_label": float(np.mean(predicted == own)),
        "shown_requested_labels": requested[:columns].tolist(),
    }
    store.put("relabel", entry)
  logging.info(
      "%s, test images redrawn with another label clamped: %.4f get the"
      " requested label, %.4f keep their own", os.path.basename(run_dir),
      entry["requested"]["overall"], entry["kept_own_label"])
  return entry


def _measure_unsupervised(run_dir, config, params, step, test,
                          reflections_list, store) -> dict:
  """Sweep every code unit of an unsupervised model over its observed range."""
  codes, _ = _perceive_test(params, config, test.images)
  low, high = generation.code_ranges(codes)
  dead = generation.dead_units(low, high)
  if dead:
    logging.warning(
        "%s: code unit(s) %s are dead (the same value on every test image);"
        " their sweeps show one image.", os.path.basename(run_dir), dead)
  base = codes[FLAGS.sweep_image_index]
  values = np.asarray(generation.sweep_values(low, high, FLAGS.sweep_values))
  sweep_codes = np.asarray(generation.unit_sweeps(base, values))
  image = training.images_to_float(test.images[FLAGS.sweep_image_index])
  settings_base = {"train_step": step, "test_examples": len(test),
                   "sweep_values": FLAGS.sweep_values,
                   "sweep_image_index": FLAGS.sweep_image_index}
  results = {"code_min": low.tolist(), "code_max": high.tolist(),
             "dead_units": dead, "sweep_code": base.tolist(),
             "generated": {}}
  for reflections in reflections_list:
    key = f"r{reflections}"
    path = os.path.join(run_dir, f"sweep_{key}.png")
    settings = dict(settings_base, reflections=reflections)
    entry = store.get(key, settings, [path])
    if entry is None:
      started = time.perf_counter()
      generated = _decode(params, config, sweep_codes, reflections)
      rows = generated.reshape((config.code_dim, FLAGS.sweep_values) +
                               generated.shape[1:])
      # The test image heads every row, so a row shows where it starts.
      heads = np.broadcast_to(np.asarray(image),
                              (config.code_dim, 1) + generated.shape[1:])
      _save(path, np.concatenate([heads, rows], axis=1).reshape(
          (-1,) + generated.shape[1:]), columns=FLAGS.sweep_values + 1)
      # How much each sweep changes the picture: the mean absolute pixel
      # difference between its two ends.
      change = np.abs(rows[:, -1] - rows[:, 0]).mean(axis=(1, 2, 3))
      entry = {
          "settings": settings,
          "sweep_pixel_change": change.tolist(),
          "code_only_mse": _code_only_mse(params, config, codes, test.images,
                                          reflections),
          "seconds": time.perf_counter() - started,
      }
      store.put(key, entry)
    logging.info(
        "%s, %d reflection(s) after decoding: mean pixel change along a"
        " sweep %s; test images regenerated from their codes, mse %.5f",
        os.path.basename(run_dir), reflections,
        " ".join(f"{c:.3f}" for c in entry["sweep_pixel_change"]),
        entry["code_only_mse"])
    results["generated"][key] = entry
  return results


def _train(config, options, train, run_dir, mesh):
  """Train one model; return its state, or None if it diverged."""
  logging.info("Model %s: %s, recon_weight %g", os.path.basename(run_dir),
               config, options.recon_weight)
  try:
    return train_loop.train(config, options, train.images, train.labels,
                            run_dir, mesh=mesh)
  except train_loop.NonFiniteLossError as error:
    logging.error("%s diverged: %s", os.path.basename(run_dir), error)
    return None


def _train_classifier(train, test, mesh, out_dir) -> tuple[dict, tuple | None]:
  """Train the independent CNN classifier and measure its test accuracy."""
  config = _classifier_config()
  options = dataclasses.replace(common.train_options(FLAGS.classifier_steps),
                                recon_weight=0.0)
  started = time.perf_counter()
  state = _train(config, options, train, os.path.join(out_dir, CLASSIFIER_RUN),
                 mesh)
  if state is None:
    return {"status": "diverged"}, None
  metrics = evaluation.evaluate(state.params, config, test.images,
                                test.labels, mesh=mesh,
                                batch_size=FLAGS.eval_batch_size)
  logging.info("Classifier: test accuracy %.4f on %d examples",
               metrics["accuracy"], metrics["count"])
  entry = {"status": "ok", "name": "CNN classifier",
           "train_step": int(state.step),
           "train_seconds_this_run": time.perf_counter() - started,
           "test_accuracy": metrics["accuracy"]}
  return entry, (jax.device_get(state.params), config)


def _run_model(arch, model, settings, train, test, classifier, mesh,
               out_dir) -> dict:
  """Train one generating model and measure it. A divergence is recorded."""
  config = _model_config(arch, model)
  run_dir = os.path.join(out_dir, f"{arch}_{model}")
  name = MODEL_NAMES[model]
  started = time.perf_counter()
  state = _train(config, common.train_options(FLAGS.num_train_steps), train,
                 run_dir, mesh)
  if state is None:
    return {"status": "diverged", "name": name}
  entry = {"status": "ok", "name": name, "supervised": config.supervised,
           "dpn": config.dpn, "train_step": int(state.step),
           "train_seconds_this_run": time.perf_counter() - started,
           "code_dim": config.code_dim}
  store = _Store(os.path.join(run_dir, "generation.json"))
  params = jax.device_get(state.params)
  if config.supervised:
    entry.update(_measure_supervised(run_dir, config, params, entry[
        "train_step"], test, classifier, settings.gen_reflections, store))
  else:
    entry.update(_measure_unsupervised(run_dir, config, params, entry[
        "train_step"], test, settings.gen_reflections, store))
  return entry


def _decoding_name(key: str) -> str:
  reflections = int(key[1:])
  if reflections == 0:
    return "decoder alone"
  return f"decoder + {reflections} refl."


def _percent(value) -> str:
  return "-" if value is None else f"{100 * value:.1f}%"


def _markdown(results: dict) -> str:
  """Render `results` as the tables of results.md."""
  lines = [f"# Generation on {results['dataset']}", ""]
  classifier = results.get("classifier")
  if classifier:
    accuracy = (_percent(classifier["test_accuracy"])
                if classifier["status"] == "ok" else classifier["status"])
    lines += [
        "## Label consistency of the supervised models", "",
        "Share of generated images that the independent CNN classifier"
        f" (trained {classifier.get('train_step', '-')} steps, test accuracy"
        f" {accuracy}) gives the requested label. \"grid\": the style grids"
        f" ({results['grid_size']} x {results['grid_size']} styles per label,"
        f" mean +- {results['style_sd_range']:g} sd); \"random\":"
        f" {results['samples_per_label']} random styles per label. \"decoder"
        " alone\" decodes the code once; \"decoder + k refl.\" then perceives"
        " the image k more times with the label and style units clamped.", "",
        "| model | decoding | images | " +
        " | ".join(str(c) for c in range(10)) + " | all |",
        "|" + " --- |" * 14,
    ]
    for key, entry in results["models"].items():
      if entry["status"] != "ok" or not entry["supervised"]:
        continue
      arch = key.split("/")[0].upper()
      for gen_key, generated in entry["generated"].items():
        for images in ("grid", "random"):
          scores = generated[images]
          cells = [_percent(v) for v in scores["per_label"]]
          lines.append(
              f"| {arch} {entry['name']} | {_decoding_name(gen_key)} |"
              f" {images} | " + " | ".join(cells) +
              f" | **{_percent(scores['overall'])}** |")
    lines += [
        "", "## Test images redrawn as another label", "",
        "Test images perceived with the label units clamped to a one-hot"
        " label other than their own (style units from the encoder; one"
        " reflection, input clamped to the image). With DPN the decoder also"
        " receives the image's paired bottom-up inputs.", "",
        "| model | images | get the requested label | keep their own label |",
        "| --- | --- | --- | --- |",
    ]
    for key, entry in results["models"].items():
      if entry["status"] != "ok" or not entry["supervised"]:
        continue
      relabel = entry["relabel"]
      lines.append(
          f"| {key.split('/')[0].upper()} {entry['name']} |"
          f" {relabel['requested']['count']} |"
          f" {_percent(relabel['requested']['overall'])} |"
          f" {_percent(relabel['kept_own_label'])} |")
    lines.append("")

  lines += [
      "## Test images regenerated from their own codes", "",
      "Mean over test images and pixels of (x - x_gen)^2, where x_gen is"
      " generated from the code that perception gives x (no style noise),"
      " without the paired bottom-up inputs of x. Low values mean the code"
      " alone carries the image.", "",
      "| model | arch | " + " | ".join(
          _decoding_name(f"r{k}") for k in results["gen_reflections"]) + " |",
      "|" + " --- |" * (2 + len(results["gen_reflections"])),
  ]
  for key, entry in results["models"].items():
    arch = key.split("/")[0].upper()
    if entry["status"] != "ok":
      lines.append(f"| {entry['name']} | {arch} | {entry['status']} |")
      continue
    cells = [f"{entry['generated'][f'r{k}']['code_only_mse']:.4f}"
             for k in results["gen_reflections"]]
    lines.append(f"| {entry['name']} | {arch} | " + " | ".join(cells) + " |")

  unsupervised = [(key, entry) for key, entry in results["models"].items()
                  if entry["status"] == "ok" and not entry["supervised"]]
  if unsupervised:
    lines += [
        "", "## Code units of the unsupervised models", "",
        "Observed range of each code unit over the test images, and the mean"
        " absolute pixel change between the two ends of its sweep. A dead"
        " unit has the same value on every test image.", "",
        "| model | arch | dead units | unit: range (pixel change, " +
        ", ".join(_decoding_name(f"r{k}") for k in results["gen_reflections"])
        + ") |",
        "| --- | --- | --- | --- |",
    ]
    for key, entry in unsupervised:
      units = []
      for unit in range(entry["code_dim"]):
        changes = "/".join(
            f"{entry['generated'][f'r{k}']['sweep_pixel_change'][unit]:.3f}"
            for k in results["gen_reflections"])
        units.append(f"{unit}: [{entry['code_min'][unit]:.2f},"
                     f" {entry['code_max'][unit]:.2f}] ({changes})")
      dead = ", ".join(map(str, entry["dead_units"])) or "none"
      lines.append(f"| {entry['name']} | {key.split('/')[0].upper()} |"
                   f" {len(entry['dead_units'])} of {entry['code_dim']}:"
                   f" {dead} | " + "; ".join(units) + " |")
  return "\n".join(lines) + "\n"


def main(argv):
  if len(argv) > 1:
    common.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  common.quiet_library_logs()
  settings = _check_flags()
  out_dir = os.path.join(FLAGS.workdir, FLAGS.dataset)
  common.write_flags(out_dir)
  logging.info("Flags:\n%s", FLAGS.flags_into_string())
  train, test = common.load_data()
  if FLAGS.sweep_image_index >= len(test):
    common.fail(f"--sweep_image_index={FLAGS.sweep_image_index} is invalid;"
                f" expected an index below the {len(test)} test images")
  mesh = parallel.create_mesh()
  logging.info("Running on %d device(s): %s", mesh.devices.size,
               jax.devices()[0].platform)

  started = time.perf_counter()
  results = {
      "dataset": FLAGS.dataset,
      "num_train_steps": FLAGS.num_train_steps,
      "gen_reflections": list(settings.gen_reflections),
      "grid_size": FLAGS.grid_size,
      "style_sd_range": FLAGS.style_sd_range,
      "samples_per_label": FLAGS.samples_per_label,
      "sweep_values": FLAGS.sweep_values,
      "test_examples": len(test),
      "models": {},
  }
  classifier = None
  if set(SUPERVISED_MODELS) & set(FLAGS.models):
    results["classifier"], classifier = _train_classifier(train, test, mesh,
                                                          out_dir)
  for arch in FLAGS.archs:
    for model in FLAGS.models:
      key = f"{arch}/{model}"
      if model in SUPERVISED_MODELS and classifier is None:
        results["models"][key] = {"status": "no classifier",
                                  "name": MODEL_NAMES[model]}
        continue
      results["models"][key] = _run_model(arch, model, settings, train, test,
                                          classifier, mesh, out_dir)
      results["wall_seconds_this_run"] = time.perf_counter() - started
      # Written after every model, so a long run shows its progress.
      common.write_json(os.path.join(out_dir, "results.json"), results)

  results["wall_seconds_this_run"] = time.perf_counter() - started
  common.write_json(os.path.join(out_dir, "results.json"), results)
  markdown = _markdown(results)
  common.write_text(os.path.join(out_dir, "results.md"), markdown)
  if common.is_writer():
    logging.info("Results written to %s:\n%s", out_dir, markdown)
  if results.get("classifier", {}).get("status") == "diverged":
    common.fail(f"the independent classifier diverged; see {out_dir}/"
                f"{CLASSIFIER_RUN}/metrics.jsonl")
  common.fail_if_diverged(results, out_dir)


if __name__ == "__main__":
  common.run(main)
