"""The reconstruction experiment end to end, and its one-line errors."""

import json
import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE_FLAGS = "--flagfile=experiments/configs/mnist_recon_smoke.flags"


def _run(*args, timeout=600):
  return subprocess.run(
      [sys.executable, "-m", "experiments.mnist_recon", *args],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_smoke_flagfile_end_to_end(mnist_dir, tmp_path):
  result = _run(SMOKE_FLAGS, f"--data_dir={mnist_dir}",
                f"--workdir={tmp_path}")
  assert result.returncode == 0, result.stderr[-3000:]

  out_dir = tmp_path / "mnist"
  results = json.loads((out_dir / "results.json").read_text())
  assert results["eval_steps"] == [10, 20]
  assert len(results["models"]) == 8
  for key, entry in results["models"].items():
    assert entry["status"] == "ok", key
    for step in ("10", "20"):
      measurement = entry["measurements"][step]
      assert 0 < measurement["mse"] < 0.25, (key, step)
      assert measurement["count"] == 1000
    run_dir = out_dir / key.replace("/", "_")
    assert (run_dir / "recon_step20.png").stat().st_size > 0
    assert (run_dir / "train_settings.json").exists()
  assert "Lmser(sup)" in (out_dir / "results.md").read_text()
  assert (out_dir / "flags.txt").exists()

  # A rerun resumes: nothing is trained again and the numbers are kept.
  again = _run(SMOKE_FLAGS, f"--data_dir={mnist_dir}", f"--workdir={tmp_path}",
               "--archs=fc")
  assert again.returncode == 0, again.stderr[-3000:]
  assert "Already trained to step 20" in again.stderr
  rerun = json.loads((out_dir / "results.json").read_text())
  assert (rerun["models"]["fc/lmser_un"]["measurements"] ==
          results["models"]["fc/lmser_un"]["measurements"])

  # Other hyperparameters in the same folder are rejected, not mixed in.
  changed = _run(SMOKE_FLAGS, f"--data_dir={mnist_dir}",
                 f"--workdir={tmp_path}", "--archs=fc", "--models=ae",
                 "--learning_rate=0.001")
  assert changed.returncode == 2
  assert "trained with other settings" in changed.stderr
  assert "learning_rate" in changed.stderr


@pytest.mark.parametrize("flag,expected", [
    ("--batch_size=0", "--batch_size=0 is invalid"),
    ("--seed=-1", "--seed=-1 is invalid"),
    ("--learning_rate=nan", "--learning_rate=nan is invalid"),
    ("--archs=rnn", "--archs contains 'rnn'"),
    ("--archs=", "--archs is empty"),
    ("--eval_steps=abc", "--eval_steps=abc is invalid"),
    ("--dataset=cifar", "--dataset=cifar"),
    ("--no_such_flag=1", "no_such_flag"),
])
def test_bad_flag_is_one_line_error(flag, expected, tmp_path):
  result = _run(SMOKE_FLAGS, "--data_dir=.", f"--workdir={tmp_path}", flag,
                timeout=120)
  assert result.returncode == 2
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith("error: ")
  assert expected in lines[0]


def test_bad_data_dir_is_one_line_error(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  result = _run(SMOKE_FLAGS, f"--data_dir={empty}",
                f"--workdir={tmp_path / 'work'}", timeout=120)
  assert result.returncode == 2
  lines = [line for line in result.stderr.splitlines()
           if line.startswith("error: ")]
  assert len(lines) == 1, result.stderr
  assert "IDX file not found" in lines[0]


def test_workdir_that_is_a_file_is_rejected(tmp_path):
  path = tmp_path / "file"
  path.write_text("not a folder")
  result = _run(SMOKE_FLAGS, "--data_dir=.", f"--workdir={path}", timeout=120)
  assert result.returncode == 2
  assert "--workdir" in result.stderr
  assert "is a file" in result.stderr
