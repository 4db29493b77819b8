"""Train, measure and report associative recall; shared by the recall binaries.

Used by `experiments.celeba_assoc` and `experiments.mnist_assoc`. It defines
no flags: the binaries pass every setting in.

For every model it trains (or resumes) and measures the plain
reconstruction error. Then, for every mask, it measures the error and PSNR
on the hidden pixels after each chosen number of reflections. A baseline
leaves the fill value (the training mean) in the hidden pixels. Measurements are kept in the
run folder, so a rerun only measures what is missing.
"""

import dataclasses
import functools
import os
import time

import jax
import numpy as np
from absl import logging

from experiments import common
from lmser_jax import config as config_lib
from lmser_jax import evaluation
from lmser_jax import images as images_lib
from lmser_jax import masks as masks_lib
from lmser_jax import recall
from lmser_jax import train_loop

MODEL_NAMES = {
    "ae": "AE",
    "lmser_un_n": "Lmser(un-n)",
    "lmser_un": "Lmser(un)",
    "lmser_sup": "Lmser(sup)",
}


@dataclasses.dataclass(frozen=True)
class Setup:
  """Settings and data shared by every model of one recall experiment.

  Attributes:
    train_images: uint8 `(N, H, W, C)` training images (may be a memory map).
    test_images: uint8 `(M, H, W, C)` held-out images.
    fill: float32 `(H, W, C)`: start value of hidden pixels.
    fill_name: what the fill is, for the report ("the training mean").
    mask_names: masks of `lmser_jax.masks`.
    reflections: reflection counts at which recall is reported.
    num_train_steps: training steps of every model.
    eval_batch_size: images per compiled recall call.
    panel_images: test images shown in each panel.
    seed: seed of training and of random masks.
    out_dir: folder of this experiment's results.
  """
  train_images: np.ndarray
  test_images: np.ndarray
  fill: np.ndarray
  fill_name: str
  mask_names: tuple[str, ...]
  reflections: tuple[int, ...]
  num_train_steps: int
  eval_batch_size: int
  panel_images: int
  seed: int
  out_dir: str


def mask_fn(name: str) -> recall.MaskFn:
  return functools.partial(masks_lib.make_mask, name)


def _measure(run_dir: str, config, params, setup: Setup, mesh) -> dict:
  """Measure reconstruction and recall of one model, or read them back."""
  path = os.path.join(run_dir, "recall.json")
  key = {"count": len(setup.test_images), "masks": list(setup.mask_names),
         "reflections": list(setup.reflections), "fill": setup.fill_name,
         "seed": setup.seed, "step": setup.num_train_steps}
  if os.path.exists(path):
    stored = common.read_json(path)
    if stored.get("key") == key:
      return stored

  started = time.perf_counter()
  labels = np.zeros(len(setup.test_images), np.int32)
  recon = evaluation.evaluate(
      params, config, np.asarray(setup.test_images), labels, mesh=mesh,
      batch_size=setup.eval_batch_size)
  params = jax.device_get(params)

  largest = max(setup.reflections)
  by_mask = {}
  for name in setup.mask_names:
    measured = recall.evaluate_recall(
        params, config, setup.test_images, mask_fn(name), setup.fill,
        reflections=largest, batch_size=setup.eval_batch_size,
        seed=setup.seed)
    by_mask[name] = {
        "hidden_fraction": measured["hidden_fraction"],
        "fill_mse": measured["fill_mse"],
        "fill_psnr": measured["fill_psnr"],
        "mse": {str(k): measured["mse"][k - 1] for k in setup.reflections},
        "psnr": {str(k): measured["psnr"][k - 1] for k in setup.reflections},
        "mse_every_reflection": measured["mse"],
    }
  result = {"key": key, "recon_mse": recon["mse"], "masks": by_mask,
            "measure_seconds": time.perf_counter() - started}
  common.write_json(path, result)
  return result


def _panels(trained: dict, setup: Setup) -> list[str]:
  """Write one PNG per mask: masked input, each model's recall, the truth."""
  count = min(setup.panel_images, len(setup.test_images))
  x = np.asarray(setup.test_images[:count], np.float32) / 255.0
  _, height, width, _ = x.shape
  largest = max(setup.reflections)
  scale = 2 if height <= 64 else 1
  written = []
  for name in setup.mask_names:
    observed = recall.batch_masks(mask_fn(name), 0, count, height, width,
                                  setup.seed)
    rows = [observed * x + (1 - observed) * setup.fill]
    for config, params in trained.values():
      rows.append(np.asarray(recall.complete(
          params, config, x, observed, setup.fill,
          reflections=largest))[-1])
    rows.append(x)
    path = os.path.join(setup.out_dir, f"panel_{name}.png")
    if common.is_writer():
      images_lib.save_grid(path, np.concatenate(rows), columns=count,
                           scale=scale)
    written.append(path)
  return written


def _table(results: dict, setup: Setup) -> str:
  steps = setup.reflections
  header = (["mask", "model", "reconstruction MSE (no mask)"] +
            [f"hidden MSE, {k} refl." for k in steps] +
            [f"PSNR dB, {k} refl." for k in steps])
  lines = [
      f"Recall on {results['test_examples']} held-out images of"
      f" {results['dataset']}: mean squared error over the hidden pixels"
      " (pixels in [0, 1]) and PSNR = -10 log10(MSE), after each number of"
      f" reflections. Hidden pixels start at {setup.fill_name};"
      " 'fill only' leaves that value there (no model).", "",
      "| " + " | ".join(header) + " |",
      "|" + " --- |" * len(header),
  ]
  for mask in setup.mask_names:
    first = True
    for key, entry in results["models"].items():
      if entry["status"] != "ok":
        lines.append(f"| {mask} | {key} | {entry['status']} |")
        continue
      measured = entry["masks"][mask]
      if first:
        lines.append(
            f"| {mask} | fill only ({setup.fill_name}) | |" +
            f" {measured['fill_mse']:.4f} |" * len(steps) +
            f" {measured['fill_psnr']:.2f} |" * len(steps))
        first = False
      cells = [mask, entry["name"], f"{entry['recon_mse']:.4f}"]
      cells += [f"{measured['mse'][str(k)]:.4f}" for k in steps]
      cells += [f"{measured['psnr'][str(k)]:.2f}" for k in steps]
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def run(models: list[tuple[str, str, config_lib.ModelConfig]], setup: Setup,
        dataset: str, mesh) -> dict:
  """Train every `(run folder, display name, config)`, measure, report.

  Writes `results.json`, `results.md` and `panel_<mask>.png` in
  `setup.out_dir`, and the run folders below it. A model whose loss
  diverges is recorded as such, and the others are still measured.

  Returns:
    The results, as written to `results.json`.
  """
  results = {"dataset": dataset, "test_examples": len(setup.test_images),
             "train_examples": len(setup.train_images),
             "train_steps": setup.num_train_steps, "fill": setup.fill_name,
             "reflections": list(setup.reflections), "models": {}}
  started = time.perf_counter()
  trained = {}
  labels = np.zeros(len(setup.train_images), np.int32)
  for run_name, display_name, config in models:
    run_dir = os.path.join(setup.out_dir, run_name)
    logging.info("Model %s: %s", run_name, config)
    train_started = time.perf_counter()
    try:
      state = train_loop.train(
          config, common.train_options(setup.num_train_steps),
          setup.train_images, labels, run_dir, mesh=mesh)
    except train_loop.NonFiniteLossError as error:
      logging.error("%s diverged: %s", run_name, error)
      results["models"][run_name] = {"status": "diverged",
                                     "message": str(error)}
      continue
    train_seconds = time.perf_counter() - train_started
    measured = _measure(run_dir, config, state.params, setup, mesh)
    params = jax.device_get(state.params)
    trained[run_name] = (config, params)
    results["models"][run_name] = dict(
        status="ok", name=display_name, train_seconds_this_run=train_seconds, **measured)
    for mask in setup.mask_names:
      logging.info(
          "%s, mask %s: hidden MSE %s (fill only %.4f)", run_name, mask,
          ", ".join(f"{v:.4f} after {k}" for k, v in
                    measured["masks"][mask]["mse"].items()),
          measured["masks"][mask]["fill_mse"])
  if trained:
    results["panels"] = [os.path.basename(p) for p in _panels(trained, setup)]
  results["wall_seconds_this_run"] = time.perf_counter() - started
  common.write_json(os.path.join(setup.out_dir, "results.json"), results)
  table = _table(results, setup)
  common.write_text(os.path.join(setup.out_dir, "results.md"), table)
  if common.is_writer():
    logging.info("Results written to %s:\n%s", setup.out_dir, table)
  common.fail_if_diverged(results, setup.out_dir)
  return results
