"""The recall experiments (faces and digits) end to end, and their errors."""

import json
import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(binary, *args, timeout=600):
  return subprocess.run(
      [sys.executable, "-m", f"experiments.{binary}", *args],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def _check_results(out_dir, masks, models):
  results = json.loads((out_dir / "results.json").read_text())
  assert set(results["models"]) == set(models)
  for key, entry in results["models"].items():
    assert entry["status"] == "ok", key
    assert 0 < entry["recon_mse"] < 0.5, key
    for mask in masks:
      measured = entry["masks"][mask]
      assert set(measured["mse"]) == {"1", "5"}
      assert all(0 < v < 1 for v in measured["mse"].values()), (key, mask)
      assert 0 < measured["fill_mse"] < 1
  for mask in masks:
    assert (out_dir / f"panel_{mask}.png").stat().st_size > 0
  table = (out_dir / "results.md").read_text()
  assert "fill only (the training mean)" in table
  return results


@pytest.mark.slow
def test_celeba_smoke_flagfile_end_to_end(celeba_half_dir, tmp_path):
  args = ("--flagfile=experiments/configs/celeba_assoc_smoke.flags",
          f"--data_dir={celeba_half_dir}", f"--workdir={tmp_path}")
  result = _run("celeba_assoc", *args)
  assert result.returncode == 0, result.stderr[-3000:]
  out_dir = tmp_path / "celeba_32"
  results = _check_results(
      out_dir, ("eyes", "center", "random_block", "lower_half"),
      ("ae", "lmser_un_n", "lmser_un"))
  assert results["test_examples"] == 100
  assert results["train_examples"] == 500
  assert list((tmp_path / "cache").glob("celeba_32_*.npy"))

  # A rerun trains nothing and measures nothing again.
  again = _run("celeba_assoc", *args, "--models=lmser_un")
  assert again.returncode == 0, again.stderr[-3000:]
  assert "Already trained to step 10" in again.stderr
  rerun = json.loads((out_dir / "results.json").read_text())
  assert (rerun["models"]["lmser_un"]["masks"] ==
          results["models"]["lmser_un"]["masks"])


@pytest.mark.slow
def test_mnist_smoke_flagfile_end_to_end(mnist_dir, tmp_path):
  result = _run("mnist_assoc",
                "--flagfile=experiments/configs/mnist_assoc_smoke.flags",
                f"--data_dir={mnist_dir}", f"--workdir={tmp_path}")
  assert result.returncode == 0, result.stderr[-3000:]
  _check_results(tmp_path / "mnist", ("lower_half", "random_block"),
                 [f"{a}_{m}" for a in ("fc", "cnn")
                  for m in ("ae", "lmser_un_n", "lmser_un")])


@pytest.mark.parametrize("flag,expected", [
    ("--image_size=48", "--image_size=48 is invalid"),
    ("--models=ae,lmser_sup", "--models contains 'lmser_sup'"),
    ("--masks=eyes,mouth", "--masks contains 'mouth'"),
    ("--recall_reflections=0,5", "--recall_reflections=0,5 is invalid"),
    ("--test_ids=000400-000600", "overlap"),
    ("--train_ids=10-x", "--train_ids=10-x is invalid"),
    ("--train_steps=0", "--train_steps=0 is invalid"),
])
def test_bad_celeba_flags_fail_in_one_line(flag, expected, tmp_path):
  result = _run("celeba_assoc",
                "--flagfile=experiments/configs/celeba_assoc_smoke.flags",
                f"--data_dir={tmp_path}", f"--workdir={tmp_path / 'w'}", flag)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith("error: "), lines[-3:]
  assert expected in lines[-1], lines[-3:]
  assert "Traceback" not in result.stderr


def test_celeba_folder_without_images_fails_in_one_line(tmp_path):
  result = _run("celeba_assoc",
                "--flagfile=experiments/configs/celeba_assoc_smoke.flags",
                f"--data_dir={tmp_path}", f"--workdir={tmp_path / 'w'}")
  assert result.returncode == 2
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ")
  assert "has no .jpg images" in last
  assert "Traceback" not in result.stderr


def test_bad_mnist_assoc_mask_fails_in_one_line(tmp_path):
  result = _run("mnist_assoc", "--masks=eyes", f"--workdir={tmp_path}",
                f"--data_dir={tmp_path}")
  assert result.returncode == 2
  last = result.stderr.strip().splitlines()[-1]
  assert "--masks contains 'eyes'" in last
