"""Multi-process data parallelism: batch rows per process, and loopback runs.

The loopback tests start real processes of `experiments.mnist_recon` on
127.0.0.1, each with 2 forced CPU devices, and kill every process they
started before they return.
"""

import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from experiments import common

from lmser_jax import checkpointing
from lmser_jax import config as config_lib
from lmser_jax import distributed
from lmser_jax import parallel
from lmser_jax import train_loop
from lmser_jax.data import batches

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# Every launch of a loopback test must finish within this time.
LAUNCH_TIMEOUT_SECONDS = 150
# A small run of the reconstruction binary: one model, 6 steps.
RUN_FLAGS = [
    "--archs=fc", "--models=lmser_sup", "--eval_steps=6", "--batch_size=20",
    "--eval_batch_size=100", "--eval_examples=250", "--log_every_steps=3",
    "--checkpoint_every_steps=3", "--grid_images=4",
    "--coordinator_timeout_seconds=60",
]


# Which example each row of a batch holds, read back from the batch itself.
def _indices_dataset(num_examples):
  images = np.arange(num_examples, dtype=np.int64).reshape(-1, 1, 1, 1)
  labels = np.arange(num_examples, dtype=np.int64)
  return images, labels


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_train_rows_partition_global_batch(process_count):
  images, labels = _indices_dataset(50)
  batch_size, seed, start_step, steps = 12, 3, 2, 9  # crosses two epochs
  streams = [
      batches.train_batches(
          images, labels, batch_size=batch_size, seed=seed,
          start_step=start_step, process_index=p, process_count=process_count)
      for p in range(process_count)
  ]
  for step in range(start_step, start_step + steps):
    parts = [next(stream)["label"] for stream in streams]
    for part in parts:
      assert part.shape == (batch_size // process_count,)
    joined = np.concatenate(parts)
    expected = batches.batch_indices(seed, step, len(images), batch_size)
    np.testing.assert_array_equal(joined, expected)
    assert len(set(joined.tolist())) == batch_size


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_eval_rows_cover_each_example_once(process_count):
  num_examples, batch_size = 23, 8  # the last global batch is 7/8 padding
  images, labels = _indices_dataset(num_examples)
  seen = []
  batch_counts = set()
  for p in range(process_count):
    local = list(batches.eval_batches(
        images, labels, batch_size=batch_size, process_index=p,
        process_count=process_count))
    batch_counts.add(len(local))
    for batch in local:
      assert batch["weight"].shape == (batch_size // process_count,)
      assert batch["image"].shape[0] == batch_size // process_count
      real = batch["weight"] == 1.0
      assert np.all(batch["weight"][~real] == 0.0)
      seen.extend(batch["label"][real].tolist())
  assert batch_counts == {3}
  assert sorted(seen) == list(range(num_examples))


def test_process_rows_rejects_invalid_layouts():
  with pytest.raises(ValueError, match="not a multiple of the 4 processes"):
    batches.process_rows(10, 0, 4)
  with pytest.raises(ValueError, match="process index 2 is invalid"):
    batches.process_rows(10, 2, 2)


def test_process_layout_single_process():
  assert parallel.process_layout(parallel.create_mesh()) == (0, 1)


def test_differences_names_differing_settings():
  names = ["batch_size", "seed", "workdir"]
  same = np.stack([distributed._fingerprint(v)  # pylint: disable=protected-access
                   for v in ("20", "0", "/runs/a")])
  other = same.copy()
  other[1] = distributed._fingerprint("1")  # pylint: disable=protected-access
  assert distributed.differences(names, np.stack([same, same])) == []
  assert distributed.differences(names, np.stack([same, other])) == ["seed"]


@pytest.mark.parametrize("overrides, message", [
    (dict(process_id=1), "--process_id needs --coordinator_address"),
    (dict(num_processes=2), "--num_processes needs --coordinator_address"),
    (dict(coordinator_address="127.0.0.1:1234", process_id=0),
     "--coordinator_address needs --num_processes"),
    (dict(coordinator_address="127.0.0.1", num_processes=2, process_id=0),
     "--coordinator_address=127.0.0.1 is invalid; expected host:port"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2,
          process_id=2), "--process_id=2 is invalid"),
    (dict(num_processes=0), "--num_processes=0 is invalid"),
    (dict(coordinator_timeout_seconds=0),
     "--coordinator_timeout_seconds=0 is invalid"),
])
def test_distributed_flags_rejected(overrides, message, capsys):
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(**overrides):
    with pytest.raises(SystemExit) as exit_info:
      common.setup_runtime()
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err


def test_single_process_starts_nothing():
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  common.setup_runtime()
  assert not jax.distributed.is_initialized()


def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


def _environment(devices: int, port: int | None = None) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  if port is not None:
    # JAX's coordinator binds every interface by default; keep it local.
    env["JAX_COORDINATOR_BIND_ADDRESS"] = f"127.0.0.1:{port}"
  return env


def _binary(flags: list[str]) -> list[str]:
  return [sys.executable, "-m", "experiments.mnist_recon"] + flags


def _run_all(launches, log_dir: pathlib.Path) -> list[tuple[int, str]]:
  """Run `(command, env)` pairs at once; return each `(exit status, stderr)`.

  Kills every process still running after `LAUNCH_TIMEOUT_SECONDS`.
  """
  processes, logs = [], []
  try:
    for number, (command, env) in enumerate(launches):
      log = log_dir / f"process{number}.log"
      logs.append(log)
      with open(log, "wb") as stream:
        processes.append(subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
            stderr=stream))
    deadline = time.monotonic() + LAUNCH_TIMEOUT_SECONDS
    for process in processes:
      process.wait(timeout=max(1.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    pytest.fail(f"a process ran longer than {LAUNCH_TIMEOUT_SECONDS} s; logs"
                f" in {log_dir}")
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.wait(timeout=30)
  return [(process.returncode, log.read_text(errors="replace"))
          for process, log in zip(processes, logs)]


def _two_processes(flags: list[str], *, per_process=None):
  """Launch 2 processes of 2 CPU devices each on a free loopback port."""
  port = _free_port()
  per_process = per_process or [[], []]
  launches = []
  for process_id in range(2):
    command = _binary(flags + per_process[process_id] + [
        f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
        f"--process_id={process_id}"])
    launches.append((command, _environment(2, port)))
  return launches


def _restore(workdir: pathlib.Path, step: int):
  """The state of `step` from a run of `RUN_FLAGS`, on this process's device."""
  config = config_lib.make_config("fc", "lmser_sup", activation="relu",
                                  kernel_init="he", code_activation="hidden")
  options = train_loop.TrainOptions(num_train_steps=step, batch_size=20)
  mesh = parallel.create_mesh(jax.devices()[:1])
  template = train_loop.initial_state(config, options, mesh)
  checkpointer = checkpointing.Checkpointer(
      str(workdir / "mnist" / "fc_lmser_sup" / "checkpoints"))
  try:
    assert checkpointer.all_steps() == [step]
    return jax.device_get(checkpointer.restore(step, template))
  finally:
    checkpointer.close()


def test_two_processes_match_four_devices(mnist_dir, tmp_path):
  """2 processes x 2 devices train as 1 process x 4 devices; 1 restores it."""
  flags = RUN_FLAGS + [f"--data_dir={mnist_dir}"]
  multi, single = tmp_path / "multi", tmp_path / "single"
  launches = _two_processes(flags + [f"--workdir={multi}"])
  launches.append((_binary(flags + [f"--workdir={single}"]), _environment(4)))
  results = _run_all(launches, tmp_path)
  for number, (status, stderr) in enumerate(results):
    assert status == 0, f"process {number}:\n{stderr[-3000:]}"

  run = pathlib.Path("mnist") / "fc_lmser_sup"
  # Process 0 alone appends to metrics.jsonl: 2 records, not 4.
  for workdir in (multi, single):
    records = (workdir / run / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 2, records
  multi_eval = (multi / run / "eval_step6.json").read_text()
  single_eval = (single / run / "eval_step6.json").read_text()
  assert '"count": 250.0' in multi_eval
  assert '"count": 250.0' in single_eval

  # Both checkpoints restore on this test's single CPU device.
  multi_state, single_state = _restore(multi, 6), _restore(single, 6)
  assert int(multi_state.step) == int(single_state.step) == 6
  worst = max(
      float(np.max(np.abs(a - b))) for a, b in zip(
          jax.tree.leaves(multi_state.params),
          jax.tree.leaves(single_state.params)))
  assert worst < 1e-4


def test_flag_mismatch_stops_every_process(mnist_dir, tmp_path):
  flags = RUN_FLAGS + [f"--data_dir={mnist_dir}",
                       f"--workdir={tmp_path / 'run'}"]
  launches = _two_processes(flags, per_process=[["--seed=0"], ["--seed=1"]])
  started = time.monotonic()
  results = _run_all(launches, tmp_path)
  for process_id, (status, stderr) in enumerate(results):
    assert status == 2, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: flags differ between processes"), last
    assert f"--seed={process_id}" in last
  assert time.monotonic() - started < 60
  assert not (tmp_path / "run" / "mnist").exists()


def test_global_batch_must_divide_all_devices(mnist_dir, tmp_path):
  # 6 rows divide each process's 2 devices but not the 4 devices in all.
  flags = RUN_FLAGS + [f"--data_dir={mnist_dir}",
                       f"--workdir={tmp_path / 'run'}", "--batch_size=6"]
  results = _run_all(_two_processes(flags), tmp_path)
  for status, stderr in results:
    assert status == 2, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: --batch_size=6 is invalid"), last
    assert "(4, in 2 processes)" in last


def test_unreachable_coordinator_times_out(tmp_path):
  port = _free_port()  # closed again, so no process listens on it
  command = _binary([
      f"--workdir={tmp_path / 'run'}", f"--coordinator_address=127.0.0.1:{port}",
      "--num_processes=2", "--process_id=1", "--coordinator_timeout_seconds=2"])
  started = time.monotonic()
  [(status, stderr)] = _run_all([(command, _environment(1))], tmp_path)
  elapsed = time.monotonic() - started
  assert status == 2, stderr[-3000:]
  last = stderr.strip().splitlines()[-1]
  assert last.startswith("error: timed out after 2 s"), last
  assert f"127.0.0.1:{port}" in last
  assert "--coordinator_timeout_seconds" in last
  assert elapsed < 30
