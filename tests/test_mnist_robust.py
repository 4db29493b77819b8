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
])
def test_bad_flag_exits_with_one_line(flag, name, tmp_path):
  completed = _run(SMOKE_FLAGS, f"--workdir={tmp_path}", flag, timeout=300)
  assert completed.returncode == 2
  lines = completed.stderr.strip().splitlines()
  assert len(lines) == 1, completed.stderr
  assert lines[0].startswith("error: "), lines[0]
  assert name in lines[0]
