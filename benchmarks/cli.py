"""Command-line checks shared by the benchmark scripts."""

from typing import Sequence

from absl import app


def check_no_arguments(argv: Sequence[str]) -> None:
  """Raise `app.UsageError` when positional arguments follow the flags."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")


def check_choices(flag: str, values: Sequence[str],
                  allowed: Sequence[str]) -> None:
  """Raise `app.UsageError` unless `values` is non-empty and all `allowed`.

  Args:
    flag: the flag's name without dashes, for the message.
    values: the values given.
    allowed: the valid values.
  """
  expected = ", ".join(allowed)
  if not values:
    raise app.UsageError(f"--{flag} is empty; expected values from"
                         f" {expected}")
  for value in values:
    if value not in allowed:
      raise app.UsageError(f"--{flag}={','.join(values)} is invalid:"
                           f" {value!r} is not one of {expected}")
