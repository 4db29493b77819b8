"""The generation experiment binary: smoke run end to end, and flag errors."""

import json
import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE_FLAGS = "--flagfile=experiments/configs/mnist_generate_smoke.flags"
# The values set in the smoke flagfile.
SMOKE_REFLECTIONS = ("r0", "r2")
SMOKE_GRID = 3
SMOKE_SAMPLES = 5
SUPERVISED = ("fc/lmser_sup", "fc/lmser_sup_n", "cnn/lmser_sup",
              "cnn/lmser_sup_n")
UNSUPERVISED = ("fc/lmser_un", "fc/lmser_un_n", "cnn/lmser_un",
                "cnn/lmser_un_n")


def _run(*args, timeout=900):
  return subprocess.run(
      [sys.executable, "-m", "experiments.mnist_generate", *args],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
      check=False)


def _check_consistency(scores, per_label_count):
  assert 0.0 <= scores["overall"] <= 1.0
  assert scores["count"] == 10 * per_label_count
  assert scores["count_per_label"] == [per_label_count] * 10
  assert all(0.0 <= share <= 1.0 for share in scores["per_label"])


@pytest.mark.slow
def test_smoke_run_writes_grids_and_scores(mnist_dir, tmp_path):
  completed = _run(SMOKE_FLAGS, f"--data_dir={mnist_dir}",
                   f"--workdir={tmp_path}")
  assert completed.returncode == 0, completed.stderr[-3000:]

  out_dir = tmp_path / "mnist"
  results = json.loads((out_dir / "results.json").read_text())
  assert results["test_examples"] == 500
  assert results["classifier"]["status"] == "ok"
  assert sorted(results["models"]) == sorted(SUPERVISED + UNSUPERVISED)
  for key in SUPERVISED:
    entry = results["models"][key]
    assert entry["status"] == "ok", key
    assert entry["dpn"] == (not key.endswith("_n")), key
    assert tuple(sorted(entry["generated"])) == SMOKE_REFLECTIONS, key
    run_dir = out_dir / key.replace("/", "_")
    for reflections, generated in entry["generated"].items():
      _check_consistency(generated["grid"], SMOKE_GRID ** 2)
      _check_consistency(generated["random"], SMOKE_SAMPLES)
      assert 0.0 < generated["code_only_mse"] < 1.0
      for label in range(10):
        path = run_dir / f"style_grid_{reflections}_label{label}.png"
        assert path.stat().st_size > 0, path
      for unit in range(2):
        path = run_dir / f"style_unit{unit}_{reflections}.png"
        assert path.stat().st_size > 0, path
    relabel = entry["relabel"]
    assert relabel["requested"]["count"] == 10 * SMOKE_SAMPLES, key
    assert 0.0 <= relabel["requested"]["overall"] <= 1.0, key
    assert 0.0 <= relabel["kept_own_label"] <= 1.0, key
    assert (run_dir / "relabel.png").stat().st_size > 0, key
  for key in UNSUPERVISED:
    entry = results["models"][key]
    assert entry["status"] == "ok", key
    assert len(entry["code_min"]) == 10
    # Dead units are exactly those of zero observed range.
    dead = [unit for unit in range(10)
            if entry["code_max"][unit] - entry["code_min"][unit] <= 1e-6]
    assert entry["dead_units"] == dead, key
    run_dir = out_dir / key.replace("/", "_")
    for reflections, generated in entry["generated"].items():
      assert len(generated["sweep_pixel_change"]) == 10
      assert (run_dir / f"sweep_{reflections}.png").stat().st_size > 0

  markdown = (out_dir / "results.md").read_text()
  assert "Label consistency" in markdown
  assert "Lmser(sup-n)" in markdown
  assert (out_dir / "flags.txt").exists()

  # A rerun resumes: nothing is trained again and the scores are kept.
  again = _run(SMOKE_FLAGS, f"--data_dir={mnist_dir}",
               f"--workdir={tmp_path}", "--archs=fc")
  assert again.returncode == 0, again.stderr[-3000:]
  assert "Already trained to step 20" in again.stderr
  rerun = json.loads((out_dir / "results.json").read_text())
  for key in ("fc/lmser_sup", "fc/lmser_un"):
    for reflections in SMOKE_REFLECTIONS:
      assert (rerun["models"][key]["generated"][reflections] ==
              results["models"][key]["generated"][reflections]), key


@pytest.mark.slow
def test_smoke_run_on_fashion_mnist(fashion_mnist_dir, tmp_path):
  completed = _run(SMOKE_FLAGS, "--dataset=fashion_mnist",
                   f"--data_dir={fashion_mnist_dir}", f"--workdir={tmp_path}",
                   "--archs=cnn", "--models=lmser_sup,lmser_un")
  assert completed.returncode == 0, completed.stderr[-3000:]
  results = json.loads(
      (tmp_path / "fashion_mnist" / "results.json").read_text())
  assert results["dataset"] == "fashion_mnist"
  assert sorted(results["models"]) == ["cnn/lmser_sup", "cnn/lmser_un"]


@pytest.mark.parametrize("flag,name", [
    ("--gen_reflections=-1", "--gen_reflections"),
    ("--gen_reflections=two", "--gen_reflections"),
    ("--grid_size=0", "--grid_size"),
    ("--models=gan", "--models"),
    ("--num_style=0", "--num_style"),
    ("--style_sd_range=nan", "--style_sd_range"),
    ("--sweep_image_index=-2", "--sweep_image_index"),
])
def test_bad_flag_exits_with_one_line(flag, name, tmp_path):
  completed = _run(SMOKE_FLAGS, f"--workdir={tmp_path}", flag, timeout=300)
  assert completed.returncode == 2
  lines = completed.stderr.strip().splitlines()
  assert len(lines) == 1, completed.stderr
  assert lines[0].startswith("error: "), lines[0]
  assert name in lines[0]
