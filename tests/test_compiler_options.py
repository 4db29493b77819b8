"""Compiler options of forward-only programs: applied on CPU, same results."""

import jax
import numpy as np
import pytest

from lmser_jax import compiler_options
from lmser_jax import config as config_lib
from lmser_jax import model
from lmser_jax import parallel
from lmser_jax import training


def test_cpu_mesh_gets_forward_options():
  mesh = parallel.create_mesh()
  options = compiler_options.forward_options(mesh)
  assert options == {"xla_cpu_experimental_ynn_fusion_type": ""}


def test_unknown_option_rejected():
  assert not compiler_options._accepted((("xla_cpu_no_such_option", ""),))


@pytest.mark.parametrize("arch", ["fc", "cnn"])
def test_eval_sums_match_default_options(arch, monkeypatch):
  config = config_lib.make_config(arch, "lmser_sup")
  mesh = parallel.create_mesh()
  params = model.init_params(jax.random.PRNGKey(0), config)
  rng = np.random.default_rng(0)
  batch = parallel.put_batch({
      "image": rng.integers(0, 256, (40, 28, 28, 1), np.uint8),
      "label": rng.integers(0, 10, (40,), np.int32),
      "weight": np.ones((40,), np.float32),
  }, mesh)
  tuned = training.make_eval_step(config, mesh, reflections=2)
  monkeypatch.setattr(compiler_options, "forward_options", lambda mesh: None)
  default = training.make_eval_step(config, mesh, reflections=2)

  # The option must reach XLA, or this test compares a program with itself.
  tuned_text = tuned.lower(params, batch).compile().as_text()
  default_text = default.lower(params, batch).compile().as_text()
  assert tuned_text != default_text
  tuned_sums = tuned(params, batch)
  default_sums = default(params, batch)
  assert tuned_sums.keys() == default_sums.keys()
  for name in default_sums:
    np.testing.assert_allclose(tuned_sums[name], default_sums[name],
                               rtol=1e-5, err_msg=name)
