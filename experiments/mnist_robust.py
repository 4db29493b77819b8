r"""Recognition and adversarial robustness on MNIST / Fashion-MNIST.

Trains, for each of `--archs`, a feed-forward classifier and an Lmser(sup)
with the same optimiser and number of steps:

  feedforward   the "lmser_sup" preset with `dpn=False`, trained with
                `--baseline_recon_weight` (default 0: cross-entropy alone).
                Without DPN the logits depend on the bottom-up path only, so
                this is a plain FCN (fc) or CNN (cnn) classifier.
  lmser_sup     Lmser(sup): cross-entropy plus the reconstruction loss.

Then it measures on the test split the clean accuracy and the accuracy under
FGSM and PGD (L-inf, pixels in [0, 1]) at every eps of `--eps_list`, with
the input gradient taken through every reflection of the perception, for
each of `--test_reflections` (the feed-forward models use one reflection,
because more change nothing without DPN). It writes under
`--workdir`/`--dataset`:

  results.json          every measurement, with the number of examples
                        behind each number
  results.md            tables beside the MNIST numbers of Huang, Tu and
                        Xu (2019)
  accuracy_vs_eps.png   accuracy against eps, both attacks, every model
  <arch>_<model>/       one run: checkpoints/, metrics.jsonl,
                        robustness.json (its finished measurements)

Usage:
  python -m experiments.mnist_robust \
      --flagfile=experiments/configs/mnist_robust.flags --data_dir=DIR

Rerunning the same command resumes: a model stopped mid-way continues from
its latest checkpoint, and a single-process run keeps the measurements
finished with the same settings.
"""

import dataclasses
import functools
import io
import os
import time

import jax
from absl import flags
from absl import logging

from experiments import common
from lmser_jax import attacks
from lmser_jax import config as config_lib
from lmser_jax import evaluation
from lmser_jax import model as model_lib
from lmser_jax import parallel
from lmser_jax import train_loop
from lmser_jax.data import mnist

FLAGS = flags.FLAGS

flags.DEFINE_list("archs", ["fc", "cnn"], "Architectures: fc, cnn.")
flags.DEFINE_integer("num_train_steps", 20000,
                     "Training iterations of every model.")
flags.DEFINE_float(
    "baseline_recon_weight", 0.0,
    "Weight of the reconstruction loss when training the feed-forward"
    " baselines; 0 trains them on cross-entropy alone.")
flags.DEFINE_list("eps_list", ["0", "0.05", "0.1", "0.15", "0.2", "0.25", "0.3"],
                  "L-inf attack radii in pixel units of [0, 1].")
flags.DEFINE_list("test_reflections", ["1", "2", "3"],
                  "Reflections of Lmser(sup) at test time, for the clean"
                  " accuracy and inside the attacked perception.")
flags.DEFINE_integer(
    "attack_examples", 0,
    "Attack the first N test examples only (0: every test example that is"
    " evaluated). PGD on the full split is slow on a CPU.")
flags.DEFINE_bool(
    "transfer_attack", True,
    "For Lmser(sup) at more than one test reflection, also run PGD crafted"
    " through one reflection of the same model and judged through all of"
    " them: an attack that needs no gradient of the many-reflection"
    " perception, which tells robustness from gradient masking.")
flags.DEFINE_bool(
    "feed_reconstruction", False,
    "At test time, feed the reconstruction to the input layer of Lmser(sup)"
    " from the second reflection on, instead of keeping it clamped to the"
    " (attacked) image. Training is unchanged.")
flags.DEFINE_integer("pgd_steps", 40, "PGD steps per restart.")
flags.DEFINE_float("pgd_step_size", 0.01,
                   "L-inf size of each PGD step, in pixel units of [0, 1].")
flags.DEFINE_integer("pgd_restarts", 1,
                     "PGD restarts; per example the strongest result counts.")
flags.DEFINE_bool("pgd_random_start", True,
                  "Start PGD at a uniform random point of the eps-ball; when"
                  " false it starts at the clean image (needs"
                  " --pgd_restarts=1).")

MODELS = ("feedforward", "lmser_sup")
MODEL_NAMES = {
    ("fc", "feedforward"): "FCN",
    ("fc", "lmser_sup"): "Lmser(sup)",
    ("cnn", "feedforward"): "CNN",
    ("cnn", "lmser_sup"): "CNN-Lmser(sup)",
}
ATTACKS = ("fgsm", "pgd")
# PGD crafted through one reflection and judged through several.
TRANSFER = "pgd_from_1_reflection"
# MNIST clean test accuracy and FGSM accuracy at eps = 0.3, from the section
# "Recognition" of Huang, Tu and Xu (2019), "Revisit Lmser and its further
# development based on convolutional layers". It states only "over 98%" for
# the FC models and gives no clean accuracy for CNN-Lmser.
PAPER_EPS = 0.3
PAPER_MNIST = {
    "fc/feedforward": {"clean": "> 98%", "fgsm": "2.68%"},
    "fc/lmser_sup": {"clean": "> 98%", "fgsm": "31.16%"},
    "cnn/feedforward": {"clean": "99.48%", "fgsm": "5.2%"},
    "cnn/lmser_sup": {"clean": None, "fgsm": "47.9%"},
}


@dataclasses.dataclass(frozen=True)
class Settings:
  """The parsed flags of the measurements."""
  eps_values: tuple[float, ...]
  test_reflections: tuple[int, ...]


def _eps_key(eps: float) -> str:
  return f"{eps:g}"


def _parse_eps_list() -> tuple[float, ...]:
  text = ",".join(FLAGS.eps_list)
  message = (f"--eps_list={text} is invalid; expected comma-separated"
             " numbers in [0, 1]")
  try:
    values = [float(value) for value in FLAGS.eps_list]
  except ValueError:
    common.fail(message)
  if not values or any(not 0.0 <= value <= 1.0 for value in values):
    common.fail(message)
  return tuple(sorted(set(values)))


def _check_flags() -> Settings:
  """Reject bad flag values with a one-line error, then parse the lists."""
  # This binary's own flags come first: they need no JAX backend, so an
  # error in them is printed before JAX logs its backend search to stderr.
  for arch in FLAGS.archs:
    if arch not in config_lib.ARCHITECTURES:
      common.fail(f"--archs contains {arch!r}; expected any of"
                  f" {', '.join(config_lib.ARCHITECTURES)}")
  if not FLAGS.archs:
    common.fail("--archs is empty; expected any of"
                f" {', '.join(config_lib.ARCHITECTURES)}")
  common.require_positive(num_train_steps=FLAGS.num_train_steps,
                          pgd_steps=FLAGS.pgd_steps,
                          pgd_step_size=FLAGS.pgd_step_size,
                          pgd_restarts=FLAGS.pgd_restarts)
  if FLAGS.attack_examples < 0:
    common.fail(f"--attack_examples={FLAGS.attack_examples} is invalid;"
                " expected >= 0 (0: every evaluated test example)")
  if FLAGS.baseline_recon_weight < 0:
    common.fail(f"--baseline_recon_weight={FLAGS.baseline_recon_weight} is"
                " invalid; expected >= 0")
  if FLAGS.pgd_restarts > 1 and not FLAGS.pgd_random_start:
    common.fail(f"--pgd_restarts={FLAGS.pgd_restarts} is invalid with"
                " --nopgd_random_start: every restart would repeat the same"
                " attack. Use --pgd_restarts=1 or --pgd_random_start.")
  settings = Settings(_parse_eps_list(),
                      common.parse_int_list("test_reflections"))
  common.check_common_flags()
  return settings


def _model_config(arch: str, model: str) -> config_lib.ModelConfig:
  overrides = common.model_overrides()
  if model == "feedforward":
    overrides["dpn"] = False
  return config_lib.make_config(arch, "lmser_sup", **overrides)


def _train_options(model: str) -> train_loop.TrainOptions:
  options = common.train_options(FLAGS.num_train_steps)
  if model == "feedforward":
    options = dataclasses.replace(options,
                                  recon_weight=FLAGS.baseline_recon_weight)
  return options


def _perceived_logits(params, x, *, config, reflections):
  return model_lib.perceive(
      params, config, x, reflections=reflections,
      feed_reconstruction=FLAGS.feed_reconstruction).logits


def _with_reading(settings: dict) -> dict:
  """Add the test-time reading to `settings` when it is not the default."""
  if FLAGS.feed_reconstruction:
    return dict(settings, feed_reconstruction=True)
  return settings


def _attack_fns() -> dict:
  return {
      "fgsm": attacks.fgsm,
      "pgd": functools.partial(
          attacks.pgd, steps=FLAGS.pgd_steps, step_size=FLAGS.pgd_step_size,
          restarts=FLAGS.pgd_restarts, random_start=FLAGS.pgd_random_start),
  }


def _attack_settings(name: str, step: int, examples: int,
                     batch_size: int) -> dict:
  """Return what decides an attack's result; a stored result must match it."""
  settings = {"train_step": step, "examples": examples, "seed": FLAGS.seed,
              "batch_size": batch_size}
  if name == "pgd":
    settings.update(steps=FLAGS.pgd_steps, step_size=FLAGS.pgd_step_size,
                    restarts=FLAGS.pgd_restarts,
                    random_start=FLAGS.pgd_random_start)
  return _with_reading(settings)


def _attack_batch_size(examples: int, mesh) -> int:
  """Return `--eval_batch_size`, or less when fewer examples are attacked."""
  devices = mesh.devices.size
  needed = -(-examples // devices) * devices
  return min(FLAGS.eval_batch_size, needed)


class _Store:
  """The finished measurements of one run, saved after each new one.

  A multi-process run starts from an empty store: every process must make
  the same compiled calls, and a file that process 0 writes while the
  others read it could make them skip different measurements.
  """

  def __init__(self, path: str):
    self.path = path
    self.values = {}
    if os.path.exists(path):
      if jax.process_count() == 1:
        self.values = common.read_json(path)
      else:
        logging.info("Multi-process run: measuring again instead of reusing"
                     " %s.", path)

  def get(self, keys: tuple[str, ...], settings: dict):
    entry = self.values
    for key in keys:
      entry = entry.get(key, {})
    return entry if entry and entry.get("settings") == settings else None

  def put(self, keys: tuple[str, ...], value: dict) -> None:
    entry = self.values
    for key in keys[:-1]:
      entry = entry.setdefault(key, {})
    entry[keys[-1]] = value
    common.write_json(self.path, self.values)


def _measure(run_name, config, params, step, reflections, settings, test,
             attacked, mesh, store) -> dict:
  """Measure the clean accuracy and the accuracy under each attack and eps.

  `step` is the training step of `params`; a stored measurement is reused
  only if it was taken at the same step with the same settings.
  """
  key = str(reflections)
  clean_settings = _with_reading({"train_step": step, "examples": len(test)})
  clean = store.get((key, "clean"), clean_settings)
  if clean is None:
    metrics = evaluation.evaluate(params, config, test.images, test.labels,
                                  mesh=mesh, batch_size=FLAGS.eval_batch_size,
                                  reflections=reflections,
                                  feed_reconstruction=FLAGS.feed_reconstruction)
    clean = {"accuracy": metrics["accuracy"], "count": metrics["count"],
             "settings": clean_settings}
    store.put((key, "clean"), clean)
  logging.info("%s, %d reflection(s): clean accuracy %.4f on %d examples",
               run_name, reflections, clean["accuracy"], clean["count"])
  result = {"clean": clean}

  batch_size = _attack_batch_size(len(attacked), mesh)
  apply_fn = functools.partial(_perceived_logits, config=config,
                               reflections=reflections)
  for name, attack in _attack_fns().items():
    attack_settings = _attack_settings(name, step, len(attacked), batch_size)
    compiled_step = None
    result[name] = {}
    for eps in settings.eps_values:
      keys = (key, name, _eps_key(eps))
      entry = store.get(keys, attack_settings)
      if entry is None:
        if compiled_step is None:
          compiled_step = attacks.make_attack_step(apply_fn, attack, mesh)
        started = time.perf_counter()
        entry = attacks.accuracy_under_attack(
            compiled_step, params, attacked.images, attacked.labels, eps=eps,
            seed=FLAGS.seed, mesh=mesh,
            batch_size=batch_size)
        entry["seconds"] = time.perf_counter() - started
        entry["settings"] = attack_settings
        store.put(keys, entry)
      logging.info(
          "%s, %d reflection(s): %s eps=%g accuracy %.4f on %d examples"
          " (%.0f%% unchanged)", run_name, reflections, name.upper(), eps,
          entry["accuracy"], entry["count"], 100 * entry["unchanged"])
      result[name][_eps_key(eps)] = entry
  if FLAGS.transfer_attack and config.supervised and reflections > 1:
    result[TRANSFER] = _measure_transfer(
        run_name, config, params, step, reflections, settings, attacked, mesh,
        store, batch_size, apply_fn)
  return result


def _measure_transfer(run_name, config, params, step, reflections, settings,
                      attacked, mesh, store, batch_size, apply_fn) -> dict:
  """Measure PGD crafted through one reflection, judged through `reflections`."""
  key = str(reflections)
  attack_settings = _attack_settings("pgd", step, len(attacked), batch_size)
  attack_settings["crafted_reflections"] = 1
  craft_fn = functools.partial(_perceived_logits, config=config, reflections=1)
  compiled_step = None
  result = {}
  for eps in settings.eps_values:
    keys = (key, TRANSFER, _eps_key(eps))
    entry = store.get(keys, attack_settings)
    if entry is None:
      if compiled_step is None:
        compiled_step = attacks.make_attack_step(
            craft_fn, _attack_fns()["pgd"], mesh, eval_fn=apply_fn)
      started = time.perf_counter()
      entry = attacks.accuracy_under_attack(
          compiled_step, params, attacked.images, attacked.labels, eps=eps,
          seed=FLAGS.seed, mesh=mesh, batch_size=batch_size)
      entry["seconds"] = time.perf_counter() - started
      entry["settings"] = attack_settings
      store.put(keys, entry)
    logging.info(
        "%s, %d reflection(s): PGD crafted through 1 reflection, eps=%g"
        " accuracy %.4f on %d examples", run_name, reflections, eps,
        entry["accuracy"], entry["count"])
    result[_eps_key(eps)] = entry
  return result


def _run_model(arch, model, settings, train, test, attacked, mesh,
               out_dir) -> dict:
  """Train one model and measure it. A divergence is recorded, not raised."""
  config = _model_config(arch, model)
  options = _train_options(model)
  run_name = f"{arch}_{model}"
  run_dir = os.path.join(out_dir, run_name)
  logging.info("Model %s: %s, recon_weight %g", run_name, config,
               options.recon_weight)
  started = time.perf_counter()
  try:
    state = train_loop.train(config, options, train.images, train.labels,
                             run_dir, mesh=mesh)
  except train_loop.NonFiniteLossError as error:
    logging.error("%s diverged: %s", run_name, error)
    return {"status": "diverged", "message": str(error),
            "name": MODEL_NAMES[(arch, model)]}
  train_seconds = time.perf_counter() - started

  # Without DPN no top-down input reaches the encoder, so every reflection
  # gives the logits of the first.
  reflections = (1,) if not config.dpn else settings.test_reflections
  store = _Store(os.path.join(run_dir, "robustness.json"))
  params = jax.device_get(state.params)
  step = int(state.step)
  measurements = {
      str(k): _measure(run_name, config, params, step, k, settings, test,
                       attacked, mesh, store)
      for k in reflections
  }
  return {"status": "ok", "name": MODEL_NAMES[(arch, model)],
          "train_recon_weight": options.recon_weight,
          "train_reflections": options.reflections,
          "train_step": step,
          "train_seconds_this_run": train_seconds,
          "reflections": measurements}


def _percent(value: float) -> str:
  return f"{100 * value:.2f}%"


def _curves(results: dict):
  """Yield `(key, reflections, label, entry)` for every measured curve."""
  for key, entry in results["models"].items():
    if entry["status"] != "ok":
      continue
    for reflections, measured in entry["reflections"].items():
      label = entry["name"]
      if key.endswith("lmser_sup"):
        label += f", {reflections} refl."
      yield key, reflections, label, measured


def _summary_table(results: dict, eps: float) -> list[str]:
  paper = results.get("paper_mnist") if abs(eps - PAPER_EPS) < 1e-9 else None
  eps_key = _eps_key(eps)
  lines = [
      f"| model | test reflections | clean accuracy | FGSM, eps = {eps_key}"
      f" | PGD, eps = {eps_key} | FGSM left unchanged |",
      "| --- | --- | --- | --- | --- | --- |",
  ]
  for key, entry in results["models"].items():
    if entry["status"] != "ok":
      lines.append(f"| {entry['name']} | - | {entry['status']} | | | |")
  for key, reflections, _, measured in _curves(results):
    name = results["models"][key]["name"]
    clean = _percent(measured["clean"]["accuracy"])
    fgsm = _percent(measured["fgsm"][eps_key]["accuracy"])
    pgd = _percent(measured["pgd"][eps_key]["accuracy"])
    if paper is not None:
      clean += f" ({paper[key]['clean'] or 'not given'})"
      fgsm += f" ({paper[key]['fgsm']})"
    unchanged = _percent(measured["fgsm"][eps_key]["unchanged"])
    lines.append(f"| {name} | {reflections} | {clean} | {fgsm} | {pgd} |"
                 f" {unchanged} |")
  return lines


def _curve_table(results: dict, attack: str) -> list[str]:
  eps_keys = [_eps_key(eps) for eps in results["eps_list"]]
  lines = [
      "| model | " + " | ".join(f"eps = {e}" for e in eps_keys) + " |",
      "|" + " --- |" * (len(eps_keys) + 1),
  ]
  for _, _, label, measured in _curves(results):
    if attack not in measured:
      continue
    cells = [_percent(measured[attack][e]["accuracy"]) for e in eps_keys]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return lines


def _gap_lines(results: dict, eps: float) -> list[str]:
  """List the accuracy gaps of Lmser(sup) over its baseline, one line per
  architecture and number of test reflections."""
  eps_key = _eps_key(eps)
  models = results["models"]
  lines = []
  for arch in results["archs"]:
    baseline = models.get(f"{arch}/feedforward", {})
    lmser = models.get(f"{arch}/lmser_sup", {})
    if baseline.get("status") != "ok" or lmser.get("status") != "ok":
      continue
    base = baseline["reflections"]["1"]
    for reflections, measured in lmser["reflections"].items():
      gaps = {
          attack: 100 * (measured[attack][eps_key]["accuracy"] -
                         base[attack][eps_key]["accuracy"])
          for attack in ATTACKS
      }
      line = (f"- {lmser['name']} minus {baseline['name']}, test reflections:"
              f" {reflections}. Gap at eps = {eps_key}: FGSM"
              f" {gaps['fgsm']:+.2f} pts, PGD {gaps['pgd']:+.2f} pts.")
      if gaps["fgsm"] > 0:
        line += (" Under PGD the gap is"
                 f" {100 * gaps['pgd'] / gaps['fgsm']:.0f}% of its FGSM size.")
      lines.append(line)
  return lines


def _pgd_above_fgsm_lines(results: dict) -> list[str]:
  """Explain the curve points where PGD leaves more examples correct than FGSM."""
  pgd_flags = results["pgd"]
  travel = pgd_flags["steps"] * pgd_flags["step_size"]
  cases, short = [], False
  for _, _, label, measured in _curves(results):
    for eps_key, fgsm in measured["fgsm"].items():
      if measured["pgd"][eps_key]["accuracy"] > fgsm["accuracy"]:
        cases.append(f"{label} at eps = {eps_key}")
        short |= pgd_flags["random_start"] and travel < 2 * float(eps_key)
  if not cases:
    return []
  text = f"PGD accuracy is above FGSM accuracy for {'; '.join(cases)}."
  if short:
    text += (" A random start can put a pixel 2 eps away from where FGSM"
             f" puts it, and {pgd_flags['steps']} steps of"
             f" {pgd_flags['step_size']:g} move it by at most {travel:g}, so"
             " PGD can be the weaker attack at large eps.")
  text += (" Read the lower of the two numbers as the accuracy under attack,"
           " or rerun with more --pgd_steps or --pgd_restarts, or with"
           " --nopgd_random_start.")
  return ["", text]


def _input_sentence(results: dict) -> str:
  if results.get("feed_reconstruction"):
    return (" From the second reflection on, Lmser(sup) perceives its own"
            " reconstruction instead of the (attacked) image.")
  return ""


def _markdown(results: dict) -> str:
  """Render `results` as the tables and lines of results.md."""
  eps = max(results["eps_list"])
  pgd = results["pgd"]
  if pgd["random_start"]:
    start = "a uniform random start in the eps-ball"
  else:
    start = "the clean image"
  lines = [
      f"# Adversarial robustness on {results['dataset']}", "",
      f"Every model trained {results['num_train_steps']} steps. Clean"
      f" accuracy on the first {results['test_examples']} test examples;"
      f" attacks on the first {results['attack_examples']}. PGD:"
      f" {pgd['steps']} steps of {pgd['step_size']:g} from {start},"
      f" restarts: {pgd['restarts']}. The input gradient runs through every"
      " test reflection. The feed-forward models have no top-down input, so"
      " they use one reflection." + _input_sentence(results), "",
      f"## At eps = {_eps_key(eps)}", "",
  ]

  if results.get("paper_mnist") and abs(eps - PAPER_EPS) < 1e-9:
    lines += ["In brackets: the MNIST numbers of Huang, Tu and Xu (2019),"
              " \"Revisit Lmser and its further development based on"
              " convolutional layers\", which do not say how many"
              " reflections were used.", ""]
  lines += _summary_table(results, eps)
  lines += ["", "\"FGSM left unchanged\" is the share of attacked examples"
            " whose FGSM image equals the clean one. At eps > 0 that almost"
            " always means a cross-entropy gradient of exactly zero (a"
            " saturated softmax)."]

  for attack in ATTACKS:
    lines += ["", f"## {attack.upper()} accuracy against eps", ""]
    lines += _curve_table(results, attack)
  lines += _pgd_above_fgsm_lines(results)
  transfer = _curve_table(results, TRANSFER)
  if len(transfer) > 2:
    lines += ["", "## PGD crafted through 1 reflection, judged through"
              " several", "",
              "The same PGD, with the input gradient taken through one"
              " reflection of the same model, and the adversarial images"
              " classified through the model's test reflections. Far below"
              " the direct PGD, it means that the direct attack failed for"
              " lack of a useful gradient (gradient masking).", ""]
    lines += transfer

  gaps = _gap_lines(results, eps)
  if gaps:
    lines += ["", "## Lmser(sup) minus its feed-forward baseline", ""] + gaps
  return "\n".join(lines) + "\n"


def _plot(results: dict, path: str) -> None:
  """Plot accuracy against eps, one row per architecture and one column per
  attack, and write the PNG at `path`."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top

  archs = results["archs"]
  figure, axes = pyplot.subplots(
      len(archs), len(ATTACKS), figsize=(5 * len(ATTACKS), 3.5 * len(archs)),
      squeeze=False, sharey=True)
  eps_values = results["eps_list"]
  for row, arch in enumerate(archs):
    for column, attack in enumerate(ATTACKS):
      axis = axes[row][column]
      for key, _, label, measured in _curves(results):
        if not key.startswith(f"{arch}/"):
          continue
        accuracy = [measured[attack][_eps_key(e)]["accuracy"]
                    for e in eps_values]
        style = "k--" if key.endswith("feedforward") else "-"
        axis.plot(eps_values, accuracy, style, marker="o", markersize=3,
                  label=label)
      axis.set_title(f"{arch.upper()}, {attack.upper()}")
      axis.set_xlabel("eps (L-inf, pixels in [0, 1])")
      axis.set_ylabel("test accuracy")
      axis.set_ylim(0.0, 1.0)
      axis.grid(alpha=0.3)
      axis.legend(fontsize="small")
  figure.tight_layout()
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=100)
  pyplot.close(figure)
  if not common.is_writer():
    return
  temporary = path + ".tmp"
  with open(temporary, "wb") as stream:
    stream.write(buffer.getvalue())
  os.replace(temporary, path)


def main(argv):
  if len(argv) > 1:
    common.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  common.quiet_library_logs()
  settings = _check_flags()
  out_dir = os.path.join(FLAGS.workdir, FLAGS.dataset)
  common.write_flags(out_dir)
  logging.info("Flags:\n%s", FLAGS.flags_into_string())
  train, test = common.load_data()
  attack_examples = FLAGS.attack_examples or len(test)
  attacked = mnist.Split(test.images[:attack_examples],
                         test.labels[:attack_examples])
  mesh = parallel.create_mesh()
  logging.info("Running on %d device(s): %s", mesh.devices.size,
               jax.devices()[0].platform)

  started = time.perf_counter()
  results = {
      "dataset": FLAGS.dataset,
      "archs": list(dict.fromkeys(FLAGS.archs)),
      "num_train_steps": FLAGS.num_train_steps,
      "baseline_recon_weight": FLAGS.baseline_recon_weight,
      "eps_list": list(settings.eps_values),
      "test_reflections": list(settings.test_reflections),
      "feed_reconstruction": FLAGS.feed_reconstruction,
      "test_examples": len(test),
      "attack_examples": len(attacked),
      "pgd": {"steps": FLAGS.pgd_steps, "step_size": FLAGS.pgd_step_size,
              "restarts": FLAGS.pgd_restarts,
              "random_start": FLAGS.pgd_random_start},
      "models": {},
  }
  if FLAGS.dataset == "mnist":
    results["paper_mnist"] = dict(PAPER_MNIST, eps=PAPER_EPS)
  for arch in results["archs"]:
    for model in MODELS:
      results["models"][f"{arch}/{model}"] = _run_model(
          arch, model, settings, train, test, attacked, mesh, out_dir)
      results["wall_seconds_this_run"] = time.perf_counter() - started
      # Written after every model, so a long run shows its progress.
      common.write_json(os.path.join(out_dir, "results.json"), results)

  markdown = _markdown(results)
  common.write_text(os.path.join(out_dir, "results.md"), markdown)
  _plot(results, os.path.join(out_dir, "accuracy_vs_eps.png"))
  if common.is_writer():
    logging.info("Results written to %s:\n%s", out_dir, markdown)
  common.fail_if_diverged(results, out_dir)


if __name__ == "__main__":
  common.run(main)
