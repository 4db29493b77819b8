"""Binomial checkpointing of a scan: reverse mode that stores few carries.

`jax.checkpoint` on a scan body recomputes each step in the backward pass,
but the scan still stores the carry of every step. For `n` steps that is `n`
carries, so the memory of a long reflection loop grows with its length.
`remat_scan` stores at most `carries` of them in a fixed buffer and
recomputes each step's input carry from the nearest stored one. Where to
store follows the binomial checkpointing recursion of Griewank and Walther
("Algorithm 799: revolve", ACM TOMS, 2000, doi:10.1145/347837.347846).
A dynamic program picks each split so that, for the given number of buffer
slots, the backward pass recomputes the fewest steps.

The backward pass is a `lax.scan` over the steps in reverse, and each of
them is a `lax.fori_loop` of recomputations and one VJP of the step. Loops
fix the order of the work. Written as straight-line code (nested
`jax.checkpoint` calls), the same schedule let XLA's CPU scheduler move the
recomputations forward, and the 8-reflection CNN step needed 52.6 MiB in
place of 19.7.

Only first-order reverse mode is defined (`jax.custom_vjp`), so `jax.jvp`
through `remat_scan` raises. Second derivatives raise too, because the
backward pass loops with traced bounds (`fori_loop`), which JAX cannot
differentiate in reverse mode.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Plan of the stored and the recomputed carries of `length` steps.

  Carry `t` is the carry after `t` steps, so carry 0 is the initial one.
  Slot 0 always contains carry 0, and slots `1..carries` are buffer rows.

  Attributes:
    length: number of steps.
    carries: number of buffer slots besides the initial carry.
    forward_stores: `(length + 1,)` int32, the slot that carry `t` is
      written to in the forward pass, 0 for none.
    restore: `(length,)` int32, the slot that the backward pass reads
      before the VJP of step `i`.
    start: `(length,)` int32, the carry index that slot `restore[i]`
      contains at that moment.
    stores: `(length, length + 1)` int32, the slot that carry `t` is written
      to while recomputing from `start[i]` up to carry `i`, 0 for none.
    recomputed_steps: the steps the backward pass recomputes before its VJPs.
  """
  length: int
  carries: int
  forward_stores: np.ndarray
  restore: np.ndarray
  start: np.ndarray
  stores: np.ndarray
  recomputed_steps: int


def _split_table(length: int, carries: int):
  """Return `(cost, split)` tables of the binomial recursion.

  `cost[s][n]` is the fewest steps recomputed to reverse `n` steps from one
  stored carry with `s` free slots, and `split[s][n]` is how many steps to
  advance before storing the next carry.
  """
  cost = [[0] * (length + 1) for _ in range(carries + 1)]
  split = [[0] * (length + 1) for _ in range(carries + 1)]
  for n in range(2, length + 1):
    # Without a free slot, step i is reached again from the stored carry.
    cost[0][n] = n * (n - 1) // 2
  for s in range(1, carries + 1):
    for n in range(2, length + 1):
      best = None
      for j in range(1, n):
        total = j + cost[s - 1][n - j] + cost[s][j]
        if best is None or total < best:
          best, split[s][n] = total, j
      cost[s][n] = best
  return cost, split


def binomial_schedule(length: int, carries: int) -> Schedule:
  """Plan the binomial checkpointing of a scan of `length` steps.

  Args:
    length: number of steps, >= 1.
    carries: buffer slots for carries besides the initial one, >= 0. More
      than `length - 1` slots are never used.

  Returns:
    A `Schedule` whose backward pass recomputes the fewest steps possible
    with `carries` slots.
  """
  if (isinstance(length, bool) or
      not isinstance(length, (int, np.integer)) or length < 1):
    raise ValueError(f"length={length!r} is invalid; expected an integer"
                     " >= 1")
  if (isinstance(carries, bool) or
      not isinstance(carries, (int, np.integer)) or carries < 0):
    raise ValueError(f"carries={carries!r} is invalid; expected an integer"
                     " >= 0")
  length = int(length)
  carries = min(int(carries), length - 1)
  _, split = _split_table(length, carries)

  # Replay the recursion with an explicit stack, as a list of events.
  # Reversing [lo, hi) from slot `slot`: with no free slot, recompute every
  # step's input from carry `lo`. Otherwise advance `split` steps to carry
  # m, store it, reverse [m, hi) with one slot fewer, then [lo, m).
  events = []
  tasks = [(0, length, 0, tuple(range(1, carries + 1)))]
  while tasks:
    lo, hi, slot, free = tasks.pop()
    if hi - lo == 1 or not free:
      for i in reversed(range(lo, hi)):
        events.append(("restore", slot, lo))
        events.append(("vjp", i))
      continue
    m = lo + split[len(free)][hi - lo]
    events.append(("restore", slot, lo))
    events.append(("store", free[0], m))
    tasks.append((lo, m, slot, free))
    tasks.append((m, hi, free[0], free[1:]))

  # Fold the events into one row per VJP: read a slot, recompute up to the
  # step's input, storing on the way. A restore of the carry just stored
  # continues the same recomputation.
  restore = np.zeros(length, np.int32)
  start = np.zeros(length, np.int32)
  stores = np.zeros((length, length + 1), np.int32)
  row = None
  position = None
  for event in events:
    if event[0] == "restore":
      _, slot, index = event
      if row is None or position != index:
        row = {"slot": slot, "start": index, "stores": {}}
      position = index
    elif event[0] == "store":
      _, slot, index = event
      row["stores"][index] = slot
      position = index
    else:
      i = event[1]
      restore[i], start[i] = row["slot"], row["start"]
      for index, slot in row["stores"].items():
        stores[i, index] = slot
      row = position = None

  # The forward pass computes every carry anyway, so it does the stores of
  # the first row (step length - 1). That row then starts from the last
  # carry stored.
  last = length - 1
  forward_stores = stores[last].copy()
  stored = np.nonzero(forward_stores[:last + 1])[0]
  if stored.size:
    start[last] = stored[-1]
    restore[last] = forward_stores[stored[-1]]
  else:
    start[last], restore[last] = 0, 0
  stores[last] = 0
  recomputed = int(np.sum(np.arange(length) - start))
  return Schedule(length, carries, forward_stores, restore, start, stores,
                  recomputed)


def _is_float(value) -> bool:
  return jnp.issubdtype(jnp.result_type(value), jnp.inexact)


def _zero_cotangent(value):
  """Return the cotangent of a non-float value (`float0` zeros)."""
  return np.zeros(np.shape(value), jax.dtypes.float0)


def remat_scan(step, init, xs, *, length: int, carries: int):
  """Return the final carry of `lax.scan(step, init, xs)`, storing few carries.

  The value equals the scan's. Its gradient equals the scan's up to float
  rounding, and the backward pass keeps at most `carries` carries besides
  `init`, recomputing the others from the nearest one stored.

  Args:
    step: `(carry, x) -> carry`, a pure function (no outputs per step).
      Closed-over float arrays, such as parameters, are differentiated too.
    init: the initial carry, a pytree. Only its float leaves get cotangents.
    xs: a pytree of arrays with leading axis `length`, or None.
    length: number of steps, >= 1.
    carries: buffer slots, >= 0. With 0 the backward pass recomputes every
      step's input from `init`, about `length**2 / 2` steps. With
      `length - 1` or more nothing is recomputed beyond the step itself,
      as with `jax.checkpoint` on the body.

  Returns:
    The final carry, with the structure of `init`.
  """
  schedule = binomial_schedule(length, carries)
  length, slots = schedule.length, schedule.carries
  # Python numbers have no shape, and the VJP needs one per leaf.
  init = jax.tree.map(jnp.asarray, init)
  for leaf in jax.tree.leaves(xs):
    if np.ndim(leaf) < 1 or np.shape(leaf)[0] != length:
      raise ValueError(
          f"xs has a leaf of shape {np.shape(leaf)}; expected a leading axis"
          f" of length {length}")
  x_first = jax.tree.map(lambda a: a[0], xs)
  # custom_vjp needs the differentiated values as arguments, so float
  # values that `step` closes over become explicit inputs.
  closed_step, consts = jax.closure_convert(step, init, x_first)

  carry_leaves, carry_tree = jax.tree.flatten(init)
  carry_is_float = [_is_float(leaf) for leaf in carry_leaves]
  x_leaves, x_tree = jax.tree.flatten(xs)
  x_is_float = [_is_float(leaf) for leaf in x_leaves]

  def x_at(xs, t):
    return jax.tree.map(
        lambda a: lax.dynamic_index_in_dim(a, t, keepdims=False), xs)

  def write(buffers, slot, carry):
    return [lax.dynamic_update_index_in_dim(buffer, leaf, slot - 1, 0)
            for buffer, leaf in zip(buffers, jax.tree.leaves(carry))]

  def read(init, buffers, slot):
    if not slots:
      return init
    return lax.cond(
        slot == 0, lambda: init, lambda: jax.tree.unflatten(carry_tree, [
            lax.dynamic_index_in_dim(buffer, slot - 1, keepdims=False)
            for buffer in buffers
        ]))

  def advance(consts, xs, carry, buffers, lo, hi, stores):
    """Run steps `lo..hi-1`, writing carry `t` to slot `stores[t]` if > 0."""
    def body(t, state):
      carry, buffers = state
      carry = closed_step(carry, x_at(xs, t), *consts)
      if slots:
        slot = stores[t + 1]
        buffers = lax.cond(slot > 0, lambda b: write(b, slot, carry),
                           lambda b: b, buffers)
      return carry, buffers

    return lax.fori_loop(lo, hi, body, (carry, buffers))

  @jax.custom_vjp
  def run(consts, init, xs):
    return lax.fori_loop(
        0, length, lambda t, carry: closed_step(carry, x_at(xs, t), *consts),
        init)

  def run_forward(consts, init, xs):
    buffers = [jnp.zeros((slots,) + leaf.shape, leaf.dtype)
               for leaf in jax.tree.leaves(init)]
    final, buffers = advance(consts, xs, init, buffers, 0, length,
                             jnp.asarray(schedule.forward_stores))
    return final, (consts, init, buffers, xs)

  def split_float(leaves, is_float):
    return [leaf for leaf, keep in zip(leaves, is_float) if keep]

  def merge_float(floats, leaves, is_float):
    floats = iter(floats)
    return [next(floats) if keep else leaf
            for leaf, keep in zip(leaves, is_float)]

  def run_backward(residuals, cotangent):
    consts, init, buffers, xs = residuals

    def reverse_step(state, row):
      buffers, carry_cotangent, consts_cotangent = state
      i, slot, first, stores = row
      carry = read(init, buffers, slot)
      carry, buffers = advance(consts, xs, carry, buffers, first, i, stores)
      carry_leaves = jax.tree.leaves(carry)
      x_leaves = jax.tree.leaves(x_at(xs, i))

      def float_step(consts, carry_floats, x_floats):
        carry = jax.tree.unflatten(
            carry_tree, merge_float(carry_floats, carry_leaves,
                                    carry_is_float))
        x = jax.tree.unflatten(
            x_tree, merge_float(x_floats, x_leaves, x_is_float))
        return split_float(
            jax.tree.leaves(closed_step(carry, x, *consts)), carry_is_float)

      _, vjp = jax.vjp(float_step, consts,
                       split_float(carry_leaves, carry_is_float),
                       split_float(x_leaves, x_is_float))
      d_consts, d_carry, d_x = vjp(carry_cotangent)
      consts_cotangent = jax.tree.map(jnp.add, consts_cotangent, d_consts)
      return (buffers, d_carry, consts_cotangent), d_x

    order = np.arange(length - 1, -1, -1)
    rows = (jnp.asarray(order, jnp.int32),
            jnp.asarray(schedule.restore[order]),
            jnp.asarray(schedule.start[order]),
            jnp.asarray(schedule.stores[order]))
    state = (buffers, split_float(jax.tree.leaves(cotangent), carry_is_float),
             jax.tree.map(jnp.zeros_like, consts))
    (_, d_init, d_consts), d_xs = lax.scan(reverse_step, state, rows)
    d_xs = [leaf[::-1] for leaf in d_xs]

    d_init = jax.tree.unflatten(carry_tree, merge_float(
        d_init, [_zero_cotangent(leaf) for leaf in carry_leaves],
        carry_is_float))
    d_xs = jax.tree.unflatten(x_tree, merge_float(
        d_xs, [_zero_cotangent(leaf) for leaf in x_leaves], x_is_float))
    return d_consts, d_init, d_xs

  run.defvjp(run_forward, run_backward)
  return run(consts, init, xs)
