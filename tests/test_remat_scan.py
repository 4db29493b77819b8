"""Binomial checkpointing of a scan: the schedule, values, gradients, memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from lmser_jax import remat_scan


def _replay(schedule):
  """Run `schedule` on carry indices; return the steps recomputed.

  Fails if a VJP would see a carry other than its step's input, if slot 0
  is overwritten or if more slots are used than the schedule has.
  """
  n = schedule.length
  slots = {0: 0}
  for t in range(1, n + 1):
    slot = int(schedule.forward_stores[t])
    if slot:
      slots[slot] = t
  recomputed = 0
  for i in reversed(range(n)):
    slot = int(schedule.restore[i])
    assert slots[slot] == schedule.start[i], (n, schedule.carries, i)
    for t in range(int(schedule.start[i]) + 1, i + 1):
      recomputed += 1
      slot = int(schedule.stores[i, t])
      if slot:
        slots[slot] = t
  assert slots[0] == 0
  assert set(slots) <= set(range(schedule.carries + 1))
  return recomputed


@pytest.mark.parametrize("length", [1, 2, 3, 7, 8, 16, 31])
@pytest.mark.parametrize("carries", [0, 1, 2, 3, 5, 40])
def test_schedule_gives_every_step_its_input(length, carries):
  schedule = remat_scan.binomial_schedule(length, carries)
  assert _replay(schedule) == schedule.recomputed_steps


def test_schedule_recomputes_less_with_more_slots():
  counts = [remat_scan.binomial_schedule(15, c).recomputed_steps
            for c in range(15)]
  # No slot: step i is recomputed from the first carry, i steps.
  assert counts[0] == 15 * 14 // 2
  assert all(a >= b for a, b in zip(counts, counts[1:]))
  # One slot per step: nothing beyond the steps themselves.
  assert counts[14] == 0
  assert counts[1] < counts[0]


@pytest.mark.parametrize("length,carries", [(0, 1), (3, -1), (2.0, 1),
                                            (3, True)])
def test_schedule_rejects_bad_sizes(length, carries):
  with pytest.raises(ValueError, match="invalid"):
    remat_scan.binomial_schedule(length, carries)


def _toy_problem(length):
  rng = np.random.default_rng(0)
  weight = jnp.asarray(rng.normal(size=(6, 6)) / 3, jnp.float32)
  init = (jnp.asarray(rng.normal(size=(4, 6)), jnp.float32),
          jnp.zeros((), bool), jnp.zeros((), jnp.int32))
  xs = {"noise": jnp.asarray(rng.normal(size=(length, 4, 6)), jnp.float32),
        "shift": jnp.arange(length, dtype=jnp.int32)}
  return weight, init, xs


def _step(weight):
  # A float, a bool and an integer leaf in the carry, and both kinds in xs.
  def step(carry, x):
    h, started, count = carry
    scale = jnp.where(started, 1.0, 0.5)
    h = jnp.tanh(h @ weight * scale + x["noise"]) + 0.01 * x["shift"]
    return (h, jnp.ones((), bool), count + 1)
  return step


def _reference(weight, init, xs, length):
  step = jax.checkpoint(_step(weight))
  return lax.scan(lambda c, x: (step(c, x), None), init, xs,
                  length=length)[0]


@pytest.mark.parametrize("length", [1, 2, 5, 9])
@pytest.mark.parametrize("carries", [0, 1, 3])
def test_remat_scan_matches_scan(length, carries):
  weight, init, xs = _toy_problem(length)

  def loss(fn, weight, h0, noise):
    inputs = dict(xs, noise=noise)
    h, _, count = fn(weight, (h0,) + init[1:], inputs)
    return jnp.sum(h ** 2) + count.astype(jnp.float32)

  def ours(weight, carry, inputs):
    return remat_scan.remat_scan(_step(weight), carry, inputs, length=length,
                                 carries=carries)

  def theirs(weight, carry, inputs):
    return _reference(weight, carry, inputs, length)

  args = (weight, init[0], xs["noise"])
  np.testing.assert_allclose(jax.jit(lambda *a: loss(ours, *a))(*args),
                             jax.jit(lambda *a: loss(theirs, *a))(*args),
                             rtol=1e-6)
  grads = jax.jit(jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2)))(
      *args)
  expected = jax.jit(
      jax.grad(lambda *a: loss(theirs, *a), argnums=(0, 1, 2)))(*args)
  for name, a, b in zip(("weight", "init", "xs"), grads, expected):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)


def test_remat_scan_without_xs():
  weight, init, _ = _toy_problem(1)

  def make_step(w):
    def step(carry, x):
      assert x is None
      return (jnp.tanh(carry[0] @ w),) + carry[1:]
    return step

  def ours(w):
    return jnp.sum(remat_scan.remat_scan(make_step(w), init, None, length=4,
                                         carries=1)[0])

  def theirs(w):
    step = make_step(w)
    return jnp.sum(lax.scan(lambda c, x: (step(c, x), None), init, None,
                            length=4)[0][0])

  np.testing.assert_allclose(jax.grad(ours)(weight), jax.grad(theirs)(weight),
                             rtol=1e-5)


def _temp_bytes(fn, *args):
  memory = jax.jit(fn).lower(*args).compile().memory_analysis()
  if memory is None:
    pytest.skip("this backend reports no memory analysis")
  return memory.temp_size_in_bytes


def test_remat_scan_stores_fewer_carries():
  # 24 steps with a 1 MiB carry: the checkpointed scan stores all 24 carries
  # for the backward pass. remat_scan with 2 slots stores those two, the
  # first and the current carry, plus a few working buffers (6 MiB in all
  # with jaxlib 0.10.2 on CPU).
  length = 24
  weight = jnp.eye(512, dtype=jnp.float32) * 0.5
  h0 = jnp.ones((512, 512), jnp.float32)

  def scanned(w, h):
    body = jax.checkpoint(lambda c, x: (jnp.sin(c @ w), None))
    return jnp.sum(lax.scan(body, h, None, length=length)[0])

  def ours(w, h):
    out = remat_scan.remat_scan(lambda c, x: jnp.sin(c @ w), h, None,
                                length=length, carries=2)
    return jnp.sum(out)

  carry_bytes = h0.size * 4
  scan_bytes = _temp_bytes(jax.grad(scanned), weight, h0)
  ours_bytes = _temp_bytes(jax.grad(ours), weight, h0)
  assert scan_bytes >= length * carry_bytes
  assert ours_bytes <= 8 * carry_bytes, (ours_bytes, scan_bytes)


def test_remat_scan_rejects_forward_mode():
  weight, init, xs = _toy_problem(3)
  with pytest.raises(TypeError, match="custom_vjp"):
    jax.jvp(lambda w: remat_scan.remat_scan(_step(w), init, xs, length=3,
                                            carries=1)[0],
            (weight,), (weight,))


def test_remat_scan_rejects_short_xs():
  weight, init, xs = _toy_problem(3)
  with pytest.raises(ValueError, match="leading axis of length 5"):
    remat_scan.remat_scan(_step(weight), init, xs, length=5, carries=1)


def test_remat_scan_python_number_carry():
  # Python numbers as carry leaves and numpy integers as sizes, as lax.scan
  # accepts them.
  def ours(a):
    carry = remat_scan.remat_scan(
        lambda c, x: (c[0] * a + x, c[1] + 1), (1.0, 0), jnp.arange(4.0),
        length=np.int64(4), carries=np.int64(1))
    return carry[0]

  def theirs(a):
    return lax.scan(lambda c, x: ((c[0] * a + x, c[1] + 1), None), (1.0, 0),
                    jnp.arange(4.0))[0][0]

  np.testing.assert_allclose(jax.grad(ours)(0.5), jax.grad(theirs)(0.5),
                             rtol=1e-6)
