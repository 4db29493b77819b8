"""Benchmark helpers that the reported numbers depend on, and their flags."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from benchmarks import fc_products
from lmser_jax import config as config_lib
from lmser_jax import parallel
from lmser_jax import train_loop
from lmser_jax import training


@pytest.mark.parametrize("model_name", ["lmser_un", "lmser_sup"])
def test_fc_products_match_step_flops(model_name):
  # The ceiling is meaningful only if the listed products are the step's.
  # XLA's count of the step adds just the elementwise work to their FLOPs.
  batch = 100
  config = config_lib.make_config("fc", model_name)
  widths = [784] + [spec.features for spec in config.layers]
  products = fc_products.step_products(batch, widths)
  listed = sum(2.0 * np.prod(lhs) * np.prod(rhs) / lhs[lhs_dim]
               for _, lhs, rhs, lhs_dim, _ in products)

  mesh = parallel.create_mesh()
  options = train_loop.TrainOptions(num_train_steps=1, batch_size=batch)
  state = train_loop.initial_state(config, options, mesh)
  step = training.make_train_step(config, mesh, microbatch_size=None)
  images = parallel.put_batch({
      "image": np.zeros((batch, 28, 28, 1), np.uint8),
      "label": np.zeros((batch,), np.int32),
  }, mesh)
  cost = step.lower(state, images).cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  counted = float(cost["flops"])
  assert len(products) == 17
  assert listed <= counted
  assert listed > 0.97 * counted


@pytest.mark.parametrize("script,flag,expected", [
    ("remat_memory", "--remat_carries=-1", "--remat_carries=-1 is invalid"),
    ("train_step", "--remat_carries=1", "--remat_carries=1 needs --remat"),
    ("train_step", "--steps_per_call=", "--steps_per_call is empty"),
])
def test_bad_benchmark_flag_is_one_line(script, flag, expected):
  completed = subprocess.run(
      [sys.executable, "-m", f"benchmarks.{script}", flag],
      capture_output=True, text=True, timeout=120,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert completed.returncode == 2, completed.stderr
  # Only the error, not absl's usage text of the whole script.
  assert "Usage:" not in completed.stderr, completed.stderr
  lines = [line for line in completed.stderr.splitlines()
           if line.startswith("error: ")]
  assert len(lines) == 1, completed.stderr
  assert lines[0].startswith(f"error: {expected}"), lines[0]
