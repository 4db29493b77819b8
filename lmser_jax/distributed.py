"""Multi-process runs on JAX's own distributed runtime.

A multi-process run starts the same program once per host (or once per
accelerator), with the same settings except the process id. `initialize`
joins the processes through `jax.distributed.initialize`. After it,
`jax.devices()` lists the devices of every process, so one mesh spans them
all, and each process feeds only the rows of a batch that its own devices
hold. `differing_values` compares each process's settings, so that a
mismatch stops the run before training instead of making the processes
compute different things.
"""

import hashlib
import os
import sys
import threading
from typing import Mapping

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

TIMEOUT_EXIT_STATUS = 2
# Extra time given to JAX's own deadline, so that the watchdog's one-line
# message comes before jaxlib's abort.
_JAX_DEADLINE_MARGIN_SECONDS = 30
_DEFAULT_TIMEOUT_ADVICE = (
    "Start every process with the same coordinator address and number of"
    " processes, check that process 0 is running and that its port is"
    " reachable from this host, or allow more time.")


def _exit_unless_set(done: threading.Event, seconds: float,
                     message: str) -> None:
  if not done.wait(seconds):
    print(f"error: {message}", file=sys.stderr, flush=True)
    # The main thread is blocked inside jaxlib, so only a hard exit ends it.
    os._exit(TIMEOUT_EXIT_STATUS)  # pylint: disable=protected-access


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None,
               *,
               timeout_seconds: int = 300,
               timeout_advice: str = _DEFAULT_TIMEOUT_ADVICE) -> None:
  """Join this process to the other processes of a run.

  Call it before anything starts a JAX backend (`jax.devices()`, any
  computation or `device_put`). With the three arguments left as None, JAX
  detects them from the cluster environment (Cloud TPU pod slices, Slurm,
  Open MPI; see `jax.distributed.initialize`). A second call in the same
  process does nothing.

  On CPU, JAX 0.10.2 already connects the processes' collectives through
  gloo (`jax_cpu_collectives_implementation` defaults to "gloo"), so this
  function sets nothing else.

  If the processes have not all joined after `timeout_seconds`, this
  function ends the process: it prints `error: ...` on one line to stderr
  and exits with status `TIMEOUT_EXIT_STATUS`. It cannot raise instead,
  because the waiting call blocks inside jaxlib, and jaxlib 0.10.2 itself
  aborts the process (SIGABRT and a C++ stack trace) when its deadline
  passes. JAX's deadline is therefore set slightly later than this one.

  Args:
    coordinator_address: `host:port` of process 0, which runs the
      coordination service on that port.
    num_processes: the number of processes in the run.
    process_id: this process's index, in `[0, num_processes)`.
    timeout_seconds: how long to wait for every process to join.
    timeout_advice: a sentence appended to the timeout message, on what to
      check or change.

  Raises:
    ValueError: an argument is invalid.
  """
  if jax.distributed.is_initialized():
    logging.info("The JAX distributed runtime is already running.")
    return
  if timeout_seconds <= 0:
    raise ValueError(
        f"timeout_seconds={timeout_seconds} is invalid; expected a positive"
        " number of seconds")
  if (num_processes is not None and process_id is not None and
      not 0 <= process_id < num_processes):
    raise ValueError(
        f"process_id={process_id} is invalid for {num_processes} processes;"
        f" expected a value in [0, {num_processes})")

  this_process = ("this process" if process_id is None else
                  f"process {process_id}")
  address = coordinator_address or "the auto-detected address"
  count = "all" if num_processes is None else str(num_processes)
  message = (
      f"timed out after {timeout_seconds} s waiting for {count} processes to"
      f" join the JAX coordinator at {address} ({this_process})."
      f" {timeout_advice}")
  logging.info("Joining the JAX coordinator at %s as %s; waiting up to %d s.",
               address, this_process, timeout_seconds)
  done = threading.Event()
  watchdog = threading.Thread(
      target=_exit_unless_set, args=(done, timeout_seconds, message),
      name="coordinator-timeout", daemon=True)
  watchdog.start()
  try:
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=timeout_seconds + _JAX_DEADLINE_MARGIN_SECONDS)
  finally:
    done.set()


def _print_and_exit(kind, value, traceback) -> None:
  sys.__excepthook__(kind, value, traceback)
  sys.stderr.flush()
  sys.stdout.flush()
  os._exit(1)  # pylint: disable=protected-access


def exit_on_uncaught_exception() -> None:
  """Make an uncaught exception print its traceback and end the process.

  Without this, a process of a multi-process run that dies of an exception
  first waits in JAX's shutdown barrier for the other processes (up to
  `shutdown_timeout_seconds`, 300 s in jax 0.10.2). They in turn wait for
  it in their next collective operation, so the whole run hangs for
  minutes. Exiting with status 1 without the barrier lets the coordination
  service see the process gone and stop the others.
  """
  sys.excepthook = _print_and_exit


def _fingerprint(text: str) -> np.ndarray:
  """64 bits of SHA-256 as two int32 words (int64 needs `jax_enable_x64`)."""
  return np.frombuffer(hashlib.sha256(text.encode()).digest()[:8], np.int32)


def differences(names: list[str], gathered: np.ndarray) -> list[str]:
  """Names whose fingerprints differ between processes.

  Args:
    names: the setting names, in the order of `gathered`'s second axis.
    gathered: `(processes, len(names), 2)` int32 fingerprints, as
      `multihost_utils.process_allgather` returns them.

  Returns:
    The names whose fingerprint is not the same on every process, in the
    order of `names`.
  """
  same = np.all(gathered == gathered[:1], axis=(0, 2))
  return [name for name, equal in zip(names, same) if not equal]


def differing_values(values: Mapping[str, str]) -> list[str]:
  """Names in `values` whose value is not the same on every process.

  Every process must call this function, because it gathers from all of
  them. On one process it returns `[]` without communicating.

  Args:
    values: setting name to its value written as text.

  Returns:
    The sorted names whose values differ.

  Raises:
    ValueError: the processes pass different sets of names, which happens
      when they run different programs or versions.
  """
  if jax.process_count() == 1 or not values:
    return []
  names = sorted(values)
  header = _fingerprint("\n".join(names))
  headers = multihost_utils.process_allgather(header)
  if not np.all(headers == headers[:1]):
    raise ValueError(
        "the processes define different settings; run the same program and"
        " version in every process")
  local = np.stack([_fingerprint(values[name]) for name in names])
  return differences(names, multihost_utils.process_allgather(local))
