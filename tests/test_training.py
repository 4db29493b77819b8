"""The training loop on real MNIST: learning, resuming, devices, recompiles."""

import dataclasses
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from lmser_jax import config as config_lib
from lmser_jax import evaluation
from lmser_jax import parallel
from lmser_jax import train_loop
from lmser_jax import training
from lmser_jax.data import mnist

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL_CNN = config_lib.cnn_layers(channels=(4, 8), code_dim=12)


@pytest.fixture(scope="module")
def mnist_train(mnist_dir):
  return mnist.load_split("mnist", "train", mnist_dir)


@pytest.fixture(scope="module")
def mnist_test(mnist_dir):
  return mnist.load_split("mnist", "test", mnist_dir)


def _options(**overrides):
  fields = dict(num_train_steps=30, batch_size=20, log_every_steps=10,
                checkpoint_every_steps=10)
  fields.update(overrides)
  return train_loop.TrainOptions(**fields)


def _leaves(state):
  return [np.asarray(leaf) for leaf in jax.tree.leaves(jax.device_get(state))]


def test_training_lowers_test_error(mnist_train, mnist_test, tmp_path):
  config = config_lib.make_config("fc", "lmser_sup")
  mesh = parallel.create_mesh()
  test_images = mnist_test.images[:2000]
  test_labels = mnist_test.labels[:2000]
  before = training.create_train_state(
      0, config, training.create_optimizer())
  before_metrics = evaluation.evaluate(
      before.params, config, test_images, test_labels, mesh=mesh)
  state = train_loop.train(
      config, _options(num_train_steps=300, batch_size=50,
                       log_every_steps=100, checkpoint_every_steps=300),
      mnist_train.images, mnist_train.labels, str(tmp_path))
  after_metrics = evaluation.evaluate(
      state.params, config, test_images, test_labels, mesh=mesh)
  assert after_metrics["mse"] < 0.5 * before_metrics["mse"]
  assert after_metrics["accuracy"] > 0.8
  assert after_metrics["count"] == 2000


def test_resume_equals_uninterrupted(mnist_train, tmp_path):
  config = config_lib.make_config("cnn", "lmser_sup", layers=SMALL_CNN,
                                  num_style=2)
  images, labels = mnist_train.images[:2000], mnist_train.labels[:2000]
  straight = train_loop.train(config, _options(), images, labels,
                              str(tmp_path / "straight"))
  train_loop.train(config, _options(num_train_steps=20), images, labels,
                   str(tmp_path / "resumed"))
  resumed = train_loop.train(config, _options(), images, labels,
                             str(tmp_path / "resumed"))
  assert int(resumed.step) == 30
  for a, b in zip(_leaves(straight), _leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def test_call_sizes_stop_at_boundaries():
  options = _options(num_train_steps=37, steps_per_call=8, log_every_steps=10,
                     checkpoint_every_steps=15, keep_steps=(12,))
  sizes = list(train_loop._call_sizes(3, options))  # pylint: disable=protected-access
  ends = np.cumsum([3] + sizes)[1:].tolist()
  # Calls of 8 where they fit before the next stop, single steps elsewhere.
  assert ends == [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19,
                  20, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37]
  assert set(sizes) == {1, 8}


def test_multi_step_calls_equal_single(mnist_train, tmp_path):
  """Multi-step calls give the same parameters, metrics and checkpoints."""
  config = config_lib.make_config("cnn", "lmser_sup", layers=SMALL_CNN,
                                  num_style=2)
  images, labels = mnist_train.images[:2000], mnist_train.labels[:2000]
  options = _options(num_train_steps=27, log_every_steps=10,
                     checkpoint_every_steps=20, max_shift=2)
  single = train_loop.train(config, options, images, labels,
                            str(tmp_path / "single"))
  # This run saves at step 12 and stops; the next call resumes from there.
  train_loop.train(config, _options(num_train_steps=12, steps_per_call=4,
                                    log_every_steps=10,
                                    checkpoint_every_steps=20, max_shift=2),
                   images, labels, str(tmp_path / "multi"))
  multi = train_loop.train(
      config, dataclasses.replace(options, steps_per_call=4), images, labels,
      str(tmp_path / "multi"))
  assert int(multi.step) == 27
  for a, b in zip(_leaves(single), _leaves(multi)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

  def records(name):
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]

  single_records = {r["step"]: r for r in records("single")}
  multi_records = {r["step"]: r for r in records("multi")}
  # The stop at step 12 adds a record. Those of 10 and 27 average the same
  # steps in both runs.
  assert sorted(multi_records) == [10, 12, 20, 27]
  assert sorted(single_records) == [10, 20, 27]
  for step in (10, 27):
    np.testing.assert_allclose(multi_records[step]["loss"],
                               single_records[step]["loss"], rtol=1e-4)


def test_first_call_on_logging_step_is_recorded(mnist_train, tmp_path):
  config = config_lib.make_config("fc", "lmser_un")
  images, labels = mnist_train.images[:2000], mnist_train.labels[:2000]
  train_loop.train(config, _options(num_train_steps=20, steps_per_call=10),
                   images, labels, str(tmp_path))
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  steps = [json.loads(line)["step"] for line in lines]
  assert steps == [10, 20]


@pytest.mark.parametrize("field,value", [
    ("steps_per_call", 2.5),
    ("steps_per_call", "4"),
    ("steps_per_call", None),
    ("max_shift", 1.5),
    ("max_shift", True),
    ("num_train_steps", 3.0),
])
def test_options_reject_non_integer_counts(field, value):
  with pytest.raises(ValueError, match=f"{field}=.*expected an integer"):
    _options(**{field: value})


@pytest.mark.parametrize("overrides,message", [
    (dict(remat_carries=1), "needs remat=True"),
    (dict(remat=True, remat_carries=-2), "remat_carries=-2 is invalid"),
    (dict(remat=True, remat_carries=0.5), "remat_carries=0.5 is invalid"),
])
def test_options_reject_bad_remat_carries(overrides, message):
  with pytest.raises(ValueError, match=message):
    _options(**overrides)


def test_training_settings_are_plain_numbers():
  settings = _options(reflections=np.int64(3), seed=np.int32(2),
                      learning_rate=np.float32(0.5)).training_settings()
  assert json.loads(json.dumps(settings))["reflections"] == 3
  assert type(settings["seed"]) is int
  assert type(settings["learning_rate"]) is float


def test_options_accept_numpy_and_huge_integers(mnist_train, tmp_path):
  options = _options(num_train_steps=4, steps_per_call=10**20,
                     max_shift=np.int64(2), log_every_steps=2)
  config = config_lib.make_config("fc", "lmser_un")
  state = train_loop.train(config, options, mnist_train.images[:200],
                           mnist_train.labels[:200], str(tmp_path))
  assert int(state.step) == 4
  recorded = json.loads((tmp_path / "train_settings.json").read_text())
  assert recorded["training"]["max_shift"] == 2


def test_max_shift_must_fit_image(mnist_train, tmp_path):
  config = config_lib.make_config("fc", "lmser_un")
  with pytest.raises(ValueError, match="max_shift=28 is invalid for 28x28"):
    train_loop.train(config, _options(max_shift=28), mnist_train.images[:200],
                     mnist_train.labels[:200], str(tmp_path))


def test_eval_feed_reconstruction(mnist_train):
  config = config_lib.make_config("fc", "lmser_sup")
  params = training.create_train_state(
      0, config, training.create_optimizer()).params
  mesh = parallel.create_mesh()
  images, labels = mnist_train.images[:500], mnist_train.labels[:500]

  def mse(reflections, feed):
    return evaluation.evaluate(params, config, images, labels, mesh=mesh,
                               reflections=reflections,
                               feed_reconstruction=feed)["mse"]

  assert mse(1, True) == mse(1, False)
  assert mse(2, True) != mse(2, False)


def test_multi_step_nonfinite_names_step(mnist_train, tmp_path):
  config = config_lib.make_config("fc", "lmser_un")
  options = _options(num_train_steps=40, learning_rate=1e30, decay_rate=1.0)
  with pytest.raises(train_loop.NonFiniteLossError,
                     match=r"at step \d+") as single:
    train_loop.train(config, options, mnist_train.images[:2000],
                     mnist_train.labels[:2000], str(tmp_path / "single"))
  with pytest.raises(train_loop.NonFiniteLossError) as multi:
    train_loop.train(config, dataclasses.replace(options, steps_per_call=7),
                     mnist_train.images[:2000], mnist_train.labels[:2000],
                     str(tmp_path / "multi"))
  assert str(multi.value) == str(single.value)


_KILLABLE_RUN = textwrap.dedent("""
    import sys
    from lmser_jax import config as config_lib, train_loop
    from lmser_jax.data import mnist
    data = mnist.load_split("mnist", "train", sys.argv[1])
    config = config_lib.make_config("fc", "lmser_un")
    options = train_loop.TrainOptions(
        num_train_steps=100000, batch_size=20, log_every_steps=5,
        checkpoint_every_steps=5)
    train_loop.train(config, options, data.images[:2000], data.labels[:2000],
                     sys.argv[2])
""")


def test_killed_run_resumes_to_same_state(mnist_dir, mnist_train, tmp_path):
  """SIGKILL during training loses no saved step and changes no result."""
  workdir = tmp_path / "killed"
  process = subprocess.Popen(
      [sys.executable, "-c", _KILLABLE_RUN, str(mnist_dir), str(workdir)],
      cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  checkpoints = workdir / "checkpoints"
  deadline = time.monotonic() + 120
  try:
    while time.monotonic() < deadline:
      steps = [p.name for p in checkpoints.glob("*") if p.name.isdigit()]
      if steps and max(int(s) for s in steps) >= 15:
        break
      time.sleep(0.05)
    else:
      pytest.fail("the training subprocess wrote no checkpoint in 120 s")
  finally:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)

  config = config_lib.make_config("fc", "lmser_un")
  images, labels = mnist_train.images[:2000], mnist_train.labels[:2000]
  latest = train_loop.train(
      config, _options(num_train_steps=1, checkpoint_every_steps=5), images,
      labels, str(workdir))
  target = int(latest.step) + 7
  options = _options(num_train_steps=target, checkpoint_every_steps=5,
                     log_every_steps=5)
  resumed = train_loop.train(config, options, images, labels, str(workdir))
  straight = train_loop.train(config, options, images, labels,
                              str(tmp_path / "straight"))
  assert int(resumed.step) == target
  for a, b in zip(_leaves(straight), _leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def test_nonfinite_loss_names_step(mnist_train, tmp_path):
  config = config_lib.make_config("fc", "lmser_un")
  options = _options(num_train_steps=40, learning_rate=1e30, decay_rate=1.0)
  with pytest.raises(train_loop.NonFiniteLossError, match=r"at step \d+"):
    train_loop.train(config, options, mnist_train.images[:2000],
                     mnist_train.labels[:2000], str(tmp_path))
  # No checkpoint of a broken state was written.
  checkpoints = tmp_path / "checkpoints"
  saved = [p for p in checkpoints.glob("*") if p.name.isdigit()]
  for path in saved:
    assert int(path.name) < 40


def test_train_step_compiles_once(mnist_train):
  config = config_lib.make_config("cnn", "lmser_sup", layers=SMALL_CNN)
  mesh = parallel.create_mesh()
  state = train_loop.initial_state(config, _options(), mesh)
  step = training.make_train_step(config, mesh)
  for start in range(0, 60, 20):
    batch = {"image": mnist_train.images[start:start + 20],
             "label": mnist_train.labels[start:start + 20]}
    state, _ = step(state, parallel.put_batch(batch, mesh))
  assert step._cache_size() == 1  # pylint: disable=protected-access


def test_eval_pads_last_batch_without_recompiling(mnist_train):
  config = config_lib.make_config("fc", "lmser_sup")
  mesh = parallel.create_mesh()
  params = training.create_train_state(
      0, config, training.create_optimizer()).params
  images, labels = mnist_train.images[:250], mnist_train.labels[:250]
  whole = evaluation.evaluate(params, config, images, labels, mesh=mesh,
                              batch_size=250)
  padded = evaluation.evaluate(params, config, images, labels, mesh=mesh,
                               batch_size=100)
  assert padded["count"] == 250
  for key in ("mse", "recon_loss", "accuracy", "cross_entropy"):
    np.testing.assert_allclose(padded[key], whole[key], rtol=1e-5)
  step = evaluation._eval_step(config, mesh, 1, False)  # pylint: disable=protected-access
  compiled = step._cache_size()  # pylint: disable=protected-access
  # Another split size pads differently but reuses the batch-100 program.
  evaluation.evaluate(params, config, images[:130], labels[:130], mesh=mesh,
                      batch_size=100)
  assert step._cache_size() == compiled  # pylint: disable=protected-access


_FOUR_DEVICES = textwrap.dedent("""
    import sys, tempfile
    import jax, numpy as np
    from lmser_jax import config as config_lib, parallel, train_loop
    from lmser_jax.data import mnist
    assert jax.device_count() == 4, jax.devices()
    data = mnist.load_split("mnist", "train", sys.argv[1])
    images, labels = data.images[:2000], data.labels[:2000]
    for arch in ("fc", "cnn"):
      layers = None
      if arch == "cnn":
        layers = config_lib.cnn_layers(channels=(4, 8), code_dim=12)
      extra = {"layers": layers} if layers else {}
      config = config_lib.make_config(arch, "lmser_sup", num_style=2, **extra)
      options = train_loop.TrainOptions(num_train_steps=15, batch_size=20,
                                        log_every_steps=5)
      states = []
      for devices in (jax.devices()[:1], jax.devices()):
        mesh = parallel.create_mesh(devices)
        states.append(jax.device_get(train_loop.train(
            config, options, images, labels, tempfile.mkdtemp(), mesh=mesh)))
      one, four = (jax.tree.leaves(s.params) for s in states)
      worst = max(float(np.max(np.abs(a - b))) for a, b in zip(one, four))
      print(arch, "max difference", worst)
      assert worst < 1e-4, (arch, worst)
    print("OK")
""")


def test_four_devices_equal_one(mnist_dir):
  env = dict(os.environ,
             XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-c", _FOUR_DEVICES, str(mnist_dir)], cwd=REPO_ROOT,
      env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "OK" in result.stdout


def test_batch_size_must_divide_devices(mnist_train, tmp_path):
  config = config_lib.make_config("fc", "lmser_un")
  with pytest.raises(ValueError, match="batch_size"):
    train_loop.train(config, _options(batch_size=0), mnist_train.images[:100],
                     mnist_train.labels[:100], str(tmp_path))


def test_other_settings_in_same_workdir_raise(mnist_train, tmp_path):
  config = config_lib.make_config("fc", "lmser_un")
  images, labels = mnist_train.images[:200], mnist_train.labels[:200]
  train_loop.train(config, _options(num_train_steps=5), images, labels,
                   str(tmp_path))
  with pytest.raises(train_loop.SettingsMismatchError, match="learning_rate"):
    train_loop.train(config, _options(num_train_steps=5, learning_rate=0.5),
                     images, labels, str(tmp_path))
  with pytest.raises(train_loop.SettingsMismatchError, match="activation"):
    train_loop.train(config.replace(activation="sigmoid"),
                     _options(num_train_steps=5), images, labels,
                     str(tmp_path))
  # Training longer with the same settings is a resume, not a mismatch.
  state = train_loop.train(config, _options(num_train_steps=10), images,
                           labels, str(tmp_path))
  assert int(state.step) == 10


def test_other_data_in_same_workdir_raise(mnist_train, tmp_path):
  config = config_lib.make_config("fc", "lmser_un")
  images, labels = mnist_train.images[:200], mnist_train.labels[:200]
  train_loop.train(config, _options(num_train_steps=5), images, labels,
                   str(tmp_path))
  with pytest.raises(train_loop.SettingsMismatchError, match="other data"):
    train_loop.train(config, _options(num_train_steps=5),
                     mnist_train.images[200:400], labels, str(tmp_path))
  with pytest.raises(train_loop.SettingsMismatchError, match="other data"):
    train_loop.train(config, _options(num_train_steps=5), images,
                     (labels + 1) % 10, str(tmp_path))


def test_run_dir_in_use_raises(mnist_train, tmp_path):
  import fcntl  # pylint: disable=g-import-not-at-top
  config = config_lib.make_config("fc", "lmser_un")
  images, labels = mnist_train.images[:200], mnist_train.labels[:200]
  with open(tmp_path / ".lock", "w", encoding="utf-8") as held:
    fcntl.flock(held, fcntl.LOCK_EX)
    with pytest.raises(train_loop.RunDirInUseError, match="in use"):
      train_loop.train(config, _options(num_train_steps=5), images, labels,
                       str(tmp_path))
  # Released: the same call now trains.
  state = train_loop.train(config, _options(num_train_steps=5), images,
                           labels, str(tmp_path))
  assert int(state.step) == 5


def test_resume_rewrites_no_metric_twice(mnist_train, tmp_path):
  config = config_lib.make_config("fc", "lmser_un")
  images, labels = mnist_train.images[:400], mnist_train.labels[:400]
  options = _options(num_train_steps=30, keep_steps=(20,))
  train_loop.train(config, options, images, labels, str(tmp_path))
  # Pretend the run was killed after logging step 30 but before its save.
  checkpoints = tmp_path / "checkpoints"
  for path in checkpoints.glob("30*"):
    shutil.rmtree(path)
  resumed = train_loop.train(config, options, images, labels, str(tmp_path))
  assert int(resumed.step) == 30
  steps = [json.loads(line)["step"]
           for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert steps == sorted(set(steps))
  assert steps[-1] == 30


def test_mismatched_inputs_raise(mnist_train, tmp_path):
  config = config_lib.make_config("fc", "lmser_sup")
  images, labels = mnist_train.images[:100], mnist_train.labels[:100]
  with pytest.raises(ValueError, match="labels"):
    train_loop.train(config, _options(), images, labels[:50], str(tmp_path))
  with pytest.raises(ValueError, match=r"expected values in \[0, 10\)"):
    train_loop.train(config, _options(), images, labels + 42, str(tmp_path))
  with pytest.raises(ValueError, match="input_shape"):
    train_loop.train(config, _options(), images[:, :14], labels,
                     str(tmp_path))
  with pytest.raises(ValueError, match="seed"):
    _options(seed=-1)
  with pytest.raises(ValueError, match="learning_rate"):
    _options(learning_rate=float("nan"))
