"""Checkpoints across device counts, leftovers of killed saves, one save a step.

The 4-device side runs in a subprocess with 4 forced CPU devices; this test
process keeps its single default CPU device.
"""

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmser_jax import checkpointing
from lmser_jax import config as config_lib
from lmser_jax import parallel
from lmser_jax import train_loop
from lmser_jax import training
from lmser_jax.data import batches
from lmser_jax.data import mnist

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_EXAMPLES = 2000

CONFIG = config_lib.make_config("fc", "lmser_sup")


def options(num_train_steps: int) -> train_loop.TrainOptions:
  return train_loop.TrainOptions(
      num_train_steps=num_train_steps, batch_size=20, log_every_steps=5,
      checkpoint_every_steps=5)


def next_step(state, images, labels, mesh):
  """`(loss, params)` of the training step that follows `state`."""
  chosen = batches.batch_indices(0, int(state.step), len(images), 20)
  batch = parallel.put_batch(
      {"image": images[chosen], "label": labels[chosen]}, mesh)
  state, metrics = training.make_train_step(CONFIG, mesh)(state, batch)
  return float(metrics["loss"]), jax.device_get(state.params)


def flat(params) -> dict[str, np.ndarray]:
  return {str(i): np.asarray(leaf)
          for i, leaf in enumerate(jax.tree.leaves(params))}


# Runs with 4 forced devices; it imports the helpers above from this file.
_FOUR_DEVICES = textwrap.dedent("""
    import sys
    import jax, numpy as np
    sys.path.insert(0, sys.argv[1])
    import test_checkpoint_topology as helpers
    from lmser_jax import checkpointing, parallel, train_loop
    from lmser_jax.data import mnist

    data_dir, one_device_dir, workdir, output = sys.argv[2:6]
    assert jax.device_count() == 4, jax.devices()
    mesh = parallel.create_mesh()
    data = mnist.load_split("mnist", "train", data_dir)
    images, labels = data.images[:2000], data.labels[:2000]

    # A checkpoint written on 1 device restores onto the 4 devices.
    template = train_loop.initial_state(helpers.CONFIG, helpers.options(5), mesh)
    checkpointer = checkpointing.Checkpointer(one_device_dir)
    restored = checkpointer.restore(5, template)
    checkpointer.close()
    for leaf in jax.tree.leaves(restored):
      assert leaf.sharding == parallel.replicated(mesh), leaf.sharding

    # Train to step 10 here, then take step 11 from the saved checkpoint.
    train_loop.train(helpers.CONFIG, helpers.options(10), images, labels,
                     workdir, mesh=mesh)
    checkpointer = checkpointing.Checkpointer(workdir + "/checkpoints")
    state = checkpointer.restore(10, train_loop.initial_state(
        helpers.CONFIG, helpers.options(10), mesh))
    checkpointer.close()
    loss, params = helpers.next_step(state, images, labels, mesh)
    arrays = {"loss": np.asarray(loss)}
    for key, value in helpers.flat(jax.device_get(restored.params)).items():
      arrays["restored_" + key] = value
    for key, value in helpers.flat(params).items():
      arrays["next_" + key] = value
    np.savez(output, **arrays)
""")


@pytest.fixture(scope="module")
def train_subset(mnist_dir):
  split = mnist.load_split("mnist", "train", mnist_dir)
  return split.images[:NUM_EXAMPLES], split.labels[:NUM_EXAMPLES]


def _one_device_mesh():
  return parallel.create_mesh(jax.devices()[:1])


def test_four_device_checkpoint_resumes_on_one(mnist_dir, train_subset,
                                               tmp_path):
  images, labels = train_subset
  mesh = _one_device_mesh()
  one_device_state = train_loop.train(CONFIG, options(5), images, labels,
                                      str(tmp_path / "one"), mesh=mesh)

  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  output = tmp_path / "four.npz"
  result = subprocess.run(
      [sys.executable, "-c", _FOUR_DEVICES, str(REPO_ROOT / "tests"),
       str(mnist_dir),
       str(tmp_path / "one" / "checkpoints"), str(tmp_path / "four"),
       str(output)],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  four = np.load(output)

  # The 1-device checkpoint came back unchanged on 4 devices.
  expected = flat(jax.device_get(one_device_state.params))
  for key, value in expected.items():
    np.testing.assert_array_equal(four["restored_" + key], value)

  # The 4-device checkpoint restores onto this process's single device.
  checkpointer = checkpointing.Checkpointer(
      str(tmp_path / "four" / "checkpoints"))
  state = checkpointer.restore(
      10, train_loop.initial_state(CONFIG, options(10), mesh))
  checkpointer.close()
  for leaf in jax.tree.leaves(state):
    assert leaf.sharding == parallel.replicated(mesh)
  assert int(state.step) == 10

  loss, params = next_step(state, images, labels, mesh)
  np.testing.assert_allclose(loss, float(four["loss"]), rtol=1e-5)
  for key, value in flat(params).items():
    np.testing.assert_allclose(value, four["next_" + key], atol=1e-4)


def _train(images, labels, workdir, num_train_steps):
  return train_loop.train(CONFIG, options(num_train_steps), images, labels,
                          str(workdir), mesh=_one_device_mesh())


def test_leftover_temporary_directory_is_removed(train_subset, tmp_path):
  """A save killed half-way leaves a directory that resuming ignores."""
  images, labels = train_subset
  _train(images, labels, tmp_path, 5)
  checkpoints = tmp_path / "checkpoints"
  leftover = checkpoints / "10.orbax-checkpoint-tmp-1700000000000000"
  leftover.mkdir()
  (leftover / "partial").write_bytes(b"half a checkpoint")

  checkpointer = checkpointing.Checkpointer(str(checkpoints))
  assert checkpointer.latest_step() == 5
  assert checkpointer.all_steps() == [5]
  checkpointer.close()

  # Orbax removes leftovers in the background and waits for that before
  # the next save, so step 10 is written afresh.
  state = _train(images, labels, tmp_path, 10)
  assert int(state.step) == 10
  assert not leftover.exists()
  assert sorted(p.name for p in checkpoints.iterdir()) == ["10"]


def test_same_step_saved_once(train_subset, tmp_path):
  """Saving a step that exists keeps the first state and rewrites nothing."""
  images, labels = train_subset
  state = _train(images, labels, tmp_path, 5)
  saved = tmp_path / "checkpoints" / "5"
  before = saved.stat().st_mtime_ns, sorted(os.listdir(saved))

  checkpointer = checkpointing.Checkpointer(str(tmp_path / "checkpoints"))
  checkpointer.save(5, jax.tree.map(jnp.zeros_like, state))
  assert checkpointer.all_steps() == [5]
  restored = checkpointer.restore(5, state)
  checkpointer.close()
  assert (saved.stat().st_mtime_ns, sorted(os.listdir(saved))) == before
  for key, value in flat(jax.device_get(state.params)).items():
    np.testing.assert_array_equal(flat(restored.params)[key], value)
