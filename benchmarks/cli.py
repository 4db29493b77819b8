"""Command-line checks shared by the benchmark scripts."""

import sys
from typing import Sequence

from absl import app


def run(main) -> None:
  """Run `main` under `absl.app.run`, with `app.UsageError` as one line.

  absl prints the module's whole usage text before a `UsageError`. Here the
  error alone goes to stderr as `error: ...`, and the exit status is 2, as
  in the experiment binaries.
  """
  def main_with_short_errors(argv):
    try:
      return main(argv)
    except app.UsageError as error:
      print(f"error: {error}", file=sys.stderr)
      sys.exit(2)

  app.run(main_with_short_errors)


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
