"""The training loop: resumable, data-parallel, with progress and NaN checks.

Values leave the devices only on logging and checkpoint steps. On those
steps every per-step loss since the last check is fetched at once, so a NaN
or infinite loss is reported with its exact step, before any checkpoint of a
broken state is written.
"""

import dataclasses
import fcntl
import hashlib
import json
import math
import os
import time

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from lmser_jax import checkpointing
from lmser_jax import config as config_lib
from lmser_jax import metric_writer
from lmser_jax import model
from lmser_jax import parallel
from lmser_jax import training
from lmser_jax.data import batches as batches_lib


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


class SettingsMismatchError(ValueError):
  """A run directory contains a model trained with other settings."""


class RunDirInUseError(RuntimeError):
  """Another process is training in the same run directory."""


def data_fingerprint(images: np.ndarray, labels: np.ndarray,
                     chunk: int = 4096) -> str:
  """SHA-1 of the training images and labels, read `chunk` rows at a time.

  Recorded with a run's settings, so that resuming on other data (another
  folder, dataset or id range) is refused instead of mixed in. It took
  0.03 s for the 60,000 MNIST training images on a 2-core CPU; a memory
  map is never loaded whole.
  """
  digest = hashlib.sha1()
  digest.update(repr((images.shape, str(images.dtype))).encode())
  for start in range(0, len(images), chunk):
    digest.update(np.ascontiguousarray(images[start:start + chunk]).data)
  digest.update(np.ascontiguousarray(labels).data)
  return digest.hexdigest()


def _lock_run_dir(workdir: str):
  """Take an exclusive lock on `workdir/.lock`, or raise RunDirInUseError.

  The lock lives as long as the returned file; the operating system drops
  it when the process ends, also on a crash.
  """
  os.makedirs(workdir, exist_ok=True)
  stream = open(os.path.join(workdir, ".lock"), "w", encoding="utf-8")
  try:
    fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    stream.close()
    raise RunDirInUseError(
        f"{workdir} is in use by another training process; wait for it to"
        " finish or use another --workdir") from None
  return stream


@dataclasses.dataclass(frozen=True)
class TrainOptions:
  """Hyperparameters of one training run.

  The defaults are the protocol of Huang, Tu and Xu (2019): Adam, batch 50,
  learning rate 0.01 multiplied by 0.9999 after every step.

  Attributes:
    num_train_steps: optimiser steps (iterations) in total.
    batch_size: global batch size, a multiple of the device count.
    seed: fixes initialisation, data order and style noise.
    learning_rate: Adam's initial learning rate.
    decay_rate: factor applied to the learning rate after every step.
    b1, b2, eps: Adam's moment decays and epsilon.
    reflections: reflections per perception during training.
    label_weight: weight of the cross-entropy term (supervised models).
    recon_weight: weight of the reconstruction term; 0 trains the
      bottom-up path as a plain classifier.
    remat: recompute reflections in the backward pass to save memory.
    remat_carries: with `remat`, the most carries (states passed between
      reflections) the backward pass stores besides the first; None stores
      one per reflection. Fewer carries take less memory and more time
      (`model.perceive`).
    steps_per_call: training steps per compiled call
      (`training.make_multi_train_step`), so that the host dispatches one
      program for several steps. Calls are cut short at logging and
      checkpoint steps, so the results equal those of one step per call up
      to float rounding.
    max_shift: the largest random translation of a training image in
      pixels, for data augmentation (`batches.shift_images`). With 0 the
      images are used as they are.
    log_every_steps: steps between progress lines and metric records.
    checkpoint_every_steps: steps between rolling checkpoints.
    keep_steps: steps whose checkpoints are always written and never
      deleted (the steps that are measured later).
  """
  num_train_steps: int
  batch_size: int = 50
  seed: int = 0
  learning_rate: float = 0.01
  decay_rate: float = 0.9999
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  reflections: int = 1
  label_weight: float = 1.0
  recon_weight: float = 1.0
  remat: bool = False
  remat_carries: int | None = None
  steps_per_call: int = 1
  max_shift: int = 0
  log_every_steps: int = 500
  checkpoint_every_steps: int = 2000
  keep_steps: tuple[int, ...] = ()

  def __post_init__(self):
    positive_counts = dict(
        num_train_steps=self.num_train_steps, batch_size=self.batch_size,
        reflections=self.reflections, steps_per_call=self.steps_per_call,
        log_every_steps=self.log_every_steps,
        checkpoint_every_steps=self.checkpoint_every_steps)
    counts = dict(positive_counts, seed=self.seed, max_shift=self.max_shift)
    for name, value in counts.items():
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}={value!r} is invalid; expected an integer")
    positive = dict(positive_counts, learning_rate=self.learning_rate,
                    decay_rate=self.decay_rate, eps=self.eps)
    for name, value in positive.items():
      if not (math.isfinite(float(value)) and value > 0):
        raise ValueError(f"{name}={value} is invalid; expected a positive"
                         " finite number")
    if self.seed < 0:
      raise ValueError(f"seed={self.seed} is invalid; expected >= 0")
    if self.max_shift < 0:
      raise ValueError(f"max_shift={self.max_shift} is invalid; expected >= 0")
    model.check_remat_carries(self.remat, self.remat_carries)
    if self.label_weight < 0 or self.recon_weight < 0:
      raise ValueError("label_weight and recon_weight must be >= 0, got"
                       f" {self.label_weight} and {self.recon_weight}")

  def training_settings(self) -> dict:
    """Return the fields that change the trained parameters.

    The schedule of logs and checkpoints, `remat`, `remat_carries`,
    `steps_per_call` and the length of training are left out, because they
    change no parameter of a given step. `max_shift` appears only when it is
    set, so that runs recorded before it existed still resume.
    """
    # `.item()` turns numpy scalars into Python numbers for the JSON file.
    settings = {
        name: np.asarray(getattr(self, name)).item()
        for name in ("batch_size", "seed", "learning_rate", "decay_rate", "b1",
                     "b2", "eps", "reflections", "label_weight",
                     "recon_weight")
    }
    if self.max_shift:
      settings["max_shift"] = int(self.max_shift)
    return settings


def _format_seconds(seconds: float) -> str:
  seconds = int(round(seconds))
  minutes, seconds = divmod(seconds, 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else (
      f"{minutes}m{seconds:02d}s")


def _check_finite(window: list[tuple[int, dict]]) -> None:
  for step, metrics in window:
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
      raise NonFiniteLossError(
          f"training loss is {loss} at step {step}; stopped without saving"
          " this state. Lower --learning_rate or check the input data.")


# Settings recorded only when they differ from these values, so that runs
# recorded before they existed compare equal.
_OPTIONAL_SETTINGS = {"training": {"max_shift": 0}}


def _call_sizes(start: int, options: TrainOptions):
  """Yield the step count of each compiled call from `start` on.

  Each count is `steps_per_call` or 1, so at most two programs compile. A
  call ends at every step that logs, checkpoints or is kept, so those steps
  see the same state as with one step per call, and the steps left before
  such a step run one per call.
  """
  step, total = start, options.num_train_steps
  keep = sorted(options.keep_steps)
  while step < total:
    stops = [total,
             (step // options.log_every_steps + 1) * options.log_every_steps,
             (step // options.checkpoint_every_steps + 1) *
             options.checkpoint_every_steps]
    stops += [k for k in keep if k > step][:1]
    if min(stops) - step >= options.steps_per_call:
      size = options.steps_per_call
    else:
      size = 1
    yield size
    step += size


def _device_calls(host_batches, sizes, mesh):
  """Yield `(size, batch)`: one placed batch, or `size` stacked ones."""
  for size in sizes:
    if size == 1:
      yield size, parallel.put_batch(next(host_batches), mesh)
      continue
    group = [next(host_batches) for _ in range(size)]
    stacked = {name: np.stack([batch[name] for batch in group])
               for name in group[0]}
    yield size, parallel.put_stacked_batches(stacked, mesh)


def _per_step(window: list[tuple[int, int, dict]]) -> list[tuple[int, dict]]:
  """Split the stacked metrics of multi-step calls into one entry per step."""
  entries = []
  for done, size, metrics in window:
    if size == 1:
      entries.append((done, metrics))
      continue
    for offset in range(size):
      entries.append((done - size + 1 + offset,
                      {name: value[offset] for name, value in metrics.items()}))
  return entries


def _check_settings(config: config_lib.ModelConfig, options: TrainOptions,
                    workdir: str, fingerprint: str) -> None:
  """Record the run's settings in `workdir`, or compare with those recorded.

  Raises:
    SettingsMismatchError: `workdir` contains a model trained with another
      configuration or other hyperparameters, which resuming would mix.
  """
  current = json.loads(json.dumps({
      "model": dataclasses.asdict(config),
      "training": options.training_settings(),
      "data": {"fingerprint": fingerprint},
  }))
  path = os.path.join(workdir, "train_settings.json")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as stream:
      recorded = json.load(stream)
    recorded_data = recorded.get("data", current["data"])
    if recorded_data != current["data"]:
      raise SettingsMismatchError(
          f"{workdir} contains a model trained on other data (training-set"
          f" fingerprint {recorded_data.get('fingerprint')} recorded,"
          f" {fingerprint} now: another --data_dir, --dataset or id range?);"
          " use another --workdir or delete that folder to start afresh")
    # Runs recorded before data fingerprints existed are compared without.
    recorded["data"] = current["data"]
    for group, defaults in _OPTIONAL_SETTINGS.items():
      for name, default in defaults.items():
        recorded.setdefault(group, {}).setdefault(name, default)
        current[group].setdefault(name, default)
    differences = [
        f"{group}.{name}: {recorded[group].get(name)!r} recorded,"
        f" {current[group].get(name)!r} now"
        for group in current
        for name in sorted(set(current[group]) | set(recorded.get(group, {})))
        if recorded.get(group, {}).get(name) != current[group].get(name)
    ]
    if differences:
      raise SettingsMismatchError(
          f"{workdir} contains a model trained with other settings ("
          + "; ".join(differences[:3]) +
          "); use another --workdir or delete that folder to start afresh")
    return
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as stream:
      json.dump(current, stream, indent=2, sort_keys=True)
    os.replace(temporary, path)


def initial_state(config: config_lib.ModelConfig, options: TrainOptions,
                  mesh: Mesh) -> training.TrainState:
  """Create a fresh training state, replicated over `mesh`."""
  tx = training.create_optimizer(
      options.learning_rate, options.decay_rate, options.b1, options.b2,
      options.eps)
  state = training.create_train_state(options.seed, config, tx)
  return jax.device_put(state, parallel.replicated(mesh))


def train(config: config_lib.ModelConfig,
          options: TrainOptions,
          images: np.ndarray,
          labels: np.ndarray,
          workdir: str,
          mesh: Mesh | None = None) -> training.TrainState:
  """Train `config` to `options.num_train_steps`, resuming from `workdir`.

  Checkpoints go to `workdir/checkpoints` and metric records to
  `workdir/metrics.jsonl`. If a checkpoint exists, training continues from
  the latest one and reaches the same state as a run that never stopped,
  also when the checkpoint was written on another number of devices or
  processes.

  In a multi-process run every process calls this function with the same
  arguments and the full dataset. Each process reads only its rows of each
  batch, all processes take part in saving checkpoints, and only process 0
  writes `metrics.jsonl`. `workdir` must be on a file system that every
  process shares.

  Args:
    config: the model.
    options: hyperparameters.
    images: `(N, H, W, C)` uint8 training images.
    labels: `(N,)` int32 labels.
    workdir: the run's directory.
    mesh: devices (default: all).

  Returns:
    The final `TrainState`, replicated over the mesh.

  Raises:
    NonFiniteLossError: the loss became NaN or infinite.
    SettingsMismatchError: `workdir` contains a model trained with other
      settings or on other data (`data_fingerprint`).
    RunDirInUseError: another process is training in `workdir`.
    ValueError: the batch size does not fit the devices or the data, or
      images, labels and the model disagree.
  """
  mesh = parallel.create_mesh() if mesh is None else mesh
  parallel.check_batch_size(options.batch_size, mesh)
  if len(images) != len(labels):
    raise ValueError(f"{len(images)} images but {len(labels)} labels; expected"
                     " one label per image")
  if tuple(images.shape[1:]) != tuple(config.input_shape):
    raise ValueError(f"images of shape {images.shape[1:]} do not match the"
                     f" model's input_shape {config.input_shape}")
  if options.max_shift >= min(images.shape[1:3]):
    raise ValueError(
        f"max_shift={options.max_shift} is invalid for"
        f" {images.shape[1]}x{images.shape[2]} images; expected fewer pixels"
        " than the image's height and width")
  if config.supervised and len(labels) and not (
      0 <= labels.min() and labels.max() < config.num_classes):
    raise ValueError(f"labels span [{labels.min()}, {labels.max()}]; expected"
                     f" values in [0, {config.num_classes})")
  batches_lib.steps_per_epoch(len(images), options.batch_size)
  # In a multi-process run the folder is shared and process 0 holds the lock.
  lock = _lock_run_dir(workdir) if jax.process_index() == 0 else None
  try:
    _check_settings(config, options, workdir,
                    data_fingerprint(images, labels))
    return _train_locked(config, options, images, labels, workdir, mesh)
  finally:
    if lock is not None:
      lock.close()


def _train_locked(config, options, images, labels, workdir, mesh):
  """Run the body of `train` while the run directory's lock is held."""

  state = initial_state(config, options, mesh)
  checkpointer = checkpointing.Checkpointer(
      os.path.join(workdir, "checkpoints"), keep_steps=options.keep_steps)
  latest = checkpointer.latest_step()
  if latest is not None:
    state = checkpointer.restore(latest, state)
    logging.info("Resumed from the checkpoint of step %d in %s", latest,
                 checkpointer.directory)
  start = int(state.step)
  total = options.num_train_steps
  if start >= total:
    logging.info("Already trained to step %d (asked for %d).", start, total)
    checkpointer.close()
    return state

  step_args = dict(reflections=options.reflections,
                   label_weight=options.label_weight, remat=options.remat,
                   recon_weight=options.recon_weight,
                   remat_carries=options.remat_carries)
  train_step = training.make_train_step(config, mesh, **step_args)
  multi_step = (training.make_multi_train_step(config, mesh, **step_args)
                if options.steps_per_call > 1 else None)
  # Each process gathers only the rows that its own devices hold.
  process_index, process_count = parallel.process_layout(mesh)
  host_batches = batches_lib.train_batches(
      images, labels, batch_size=options.batch_size, seed=options.seed,
      start_step=start, process_index=process_index,
      process_count=process_count, max_shift=options.max_shift)
  device_calls = batches_lib.prefetch(
      _device_calls(host_batches, _call_sizes(start, options), mesh))
  writer = metric_writer.JsonlWriter(os.path.join(workdir, "metrics.jsonl"))
  # Records after the restored step were written by the interrupted run and
  # are written again now.
  writer.drop_after(start)
  keep_steps = set(options.keep_steps)

  window: list[tuple[int, int, dict]] = []
  window_start_time = time.perf_counter()
  window_start_step = start
  done = start
  for size, batch in device_calls:
    if size == 1:
      state, metrics = train_step(state, batch)
    else:
      state, metrics = multi_step(state, batch)
    first_call = done == start
    done += size
    window.append((done, size, metrics))
    if first_call:
      jax.block_until_ready(metrics)
      logging.info("Compiled and ran the first %d step(s) in %.1f s.", size,
                   time.perf_counter() - window_start_time)
      window_start_time, window_start_step = time.perf_counter(), done

    save = (done % options.checkpoint_every_steps == 0 or done in keep_steps or
            done == total)
    if done % options.log_every_steps == 0 or save:
      per_step = _per_step(jax.device_get(window))
      _check_finite(per_step)
      means = {k: float(np.mean([m[k] for _, m in per_step]))
               for k in per_step[-1][1]}
      elapsed = time.perf_counter() - window_start_time
      steps = done - window_start_step
      if steps > 0 and elapsed > 0:
        rate = steps / elapsed
        writer.write_scalars(done, dict(means, steps_per_second=rate))
        logging.info(
            "step %d/%d  loss %.4f  mse %.5f  %.0f images/s  %s left", done,
            total, means["loss"], means["mse"], rate * options.batch_size,
            _format_seconds((total - done) / rate))
      else:
        # Only the first call, whose time is mostly compilation, ran since
        # the last record, so no throughput is recorded.
        writer.write_scalars(done, means)
        logging.info("step %d/%d  loss %.4f  mse %.5f", done, total,
                     means["loss"], means["mse"])
      window = []
      window_start_time, window_start_step = time.perf_counter(), done
    if save:
      checkpointer.save(done, state)
  checkpointer.close()
  return state
