"""Benchmark helpers that the reported numbers depend on."""

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
