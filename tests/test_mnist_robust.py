"""The robustness experiment binary: smoke run end to end, and flag errors."""

import json
import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE_FLAGS = "--flagfile=experiments/configs/mnist_robust_smoke.flags"
# The values set in the smoke flagfile.
SMOKE_EPS = ("0", "0.3")
SMOKE_REFLECTIONS = ("1", "2")
MODEL_KEYS = ("fc/feedforward", "fc/lmser_sup", "cnn/feedforward",
              "cnn/lmser_sup")


def _run(*args, timeout=900):
  return subprocess.run(
      [sys.executable, "-m", "experiments.mnist_robust", *args],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
      check=False)


@pytest.mark.slow
def test_smoke_run_writes_every_result(mnist_dir, tmp_path):
  completed = _run(SMOKE_FLAGS, f"--data_dir={mnist_dir}",
                   f"--workdir={tmp_path}")
  assert completed.returncode == 0, completed.stderr[-3000:]

  out_dir = tmp_path / "mnist"
  results = json.loads((out_dir / "results.json").read_text())
  assert results["attack_examples"] == 100
  assert results["test_examples"] == 500
  assert sorted(results["models"]) == sorted(MODEL_KEYS)
  for key, entry in results["models"].items():
    assert entry["status"] == "ok", key
    expected = ("1",) if key.endswith("feedforward") else SMOKE_REFLECTIONS
    assert tuple(sorted(entry["reflections"])) == expected, key
    for reflections, measured in entry["reflections"].items():
      clean = measured["clean"]
      assert 0.0 <= clean["accuracy"] <= 1.0, (key, reflections)
      assert clean["count"] == 500, (key, reflections)
      for attack in ("fgsm", "pgd"):
        assert tuple(sorted(measured[attack])) == SMOKE_EPS, (key, attack)
        for eps, result in measured[attack].items():
          where = (key, reflections, attack, eps)
          assert 0.0 <= result["accuracy"] <= 1.0, where
          assert result["count"] == 100, where

  assert (out_dir / "accuracy_vs_eps.png").stat().st_size > 0
  markdown = (out_dir / "results.md").read_text()
  assert "31.16%" in markdown
  assert "FGSM accuracy against eps" in markdown
  assert "PGD accuracy against eps" in markdown


@pytest.mark.parametrize("flag,name", [
    ("--eps_list=abc", "--eps_list"),
    ("--eps_list=0,1.5", "--eps_list"),
    ("--attack_examples=-1", "--attack_examples"),
    ("--test_reflections=0", "--test_reflections"),
    ("--pgd_steps=0", "--pgd_steps"),
    ("--max_shift=-1", "--max_shift"),
    ("--max_shift=8", "--max_shift"),
    ("--steps_per_call=0", "--steps_per_call"),
    ("--remat_carries=-1", "--remat_carries"),
    ("--remat_carries=2", "--remat_carries"),
])
def test_bad_flag_exits_with_one_line(flag, name, tmp_path):
  completed = _run(SMOKE_FLAGS, f"--workdir={tmp_path}", flag, timeout=300)
  assert completed.returncode == 2
  lines = completed.stderr.strip().splitlines()
  assert len(lines) == 1, completed.stderr
  assert lines[0].startswith("error: "), lines[0]
  assert name in lines[0]


def test_feed_reconstruction_is_recorded(mnist_dir, tmp_path):
  clamped = _run(SMOKE_FLAGS, f"--data_dir={mnist_dir}",
                 f"--workdir={tmp_path}", "--archs=fc", "--transfer_attack")
  assert clamped.returncode == 0, clamped.stderr[-3000:]
  out_dir = tmp_path / "mnist"
  before = json.loads((out_dir / "results.json").read_text())
  assert before["feed_reconstruction"] is False

  fed = _run(SMOKE_FLAGS, f"--data_dir={mnist_dir}", f"--workdir={tmp_path}",
             "--archs=fc", "--feed_reconstruction")
  assert fed.returncode == 0, fed.stderr[-3000:]
  after = json.loads((out_dir / "results.json").read_text())
  assert after["feed_reconstruction"] is True
  stored = json.loads(
      (out_dir / "fc_lmser_sup" / "robustness.json").read_text())
  for reflections in SMOKE_REFLECTIONS:
    assert stored[reflections]["clean"]["settings"]["feed_reconstruction"]
    for eps in SMOKE_EPS:
      assert stored[reflections]["pgd"][eps]["settings"]["feed_reconstruction"]
  # One reflection never reads the reconstruction, so it is unchanged.
  lmser_before = before["models"]["fc/lmser_sup"]["reflections"]
  lmser_after = after["models"]["fc/lmser_sup"]["reflections"]
  assert (lmser_after["1"]["clean"]["accuracy"] ==
          lmser_before["1"]["clean"]["accuracy"])
  markdown = (out_dir / "results.md").read_text()
  assert "perceives its own reconstruction" in markdown
