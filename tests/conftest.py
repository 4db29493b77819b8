"""Shared pytest fixtures: where the real datasets are, and forced devices."""

import os
import pathlib

import pytest

# Tests that need several devices run in a subprocess with XLA_FLAGS set, so
# the main test process keeps the single default CPU device.

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO_ROOT.parent / "shared" / "datasets"


def _datasets_root() -> pathlib.Path:
  override = os.environ.get("LMSER_DATASETS_DIR")
  return pathlib.Path(override) if override else SHARED_DATASETS


def _require_dir(name: str) -> pathlib.Path:
  path = _datasets_root() / name
  if path.is_dir():
    return path
  message = (
      f"dataset folder {path} not found; set LMSER_DATASETS_DIR to the folder"
      " that holds mnist/, fashion-mnist/ and celeba-aligned-half/")
  if os.environ.get("CI") == "true":
    pytest.fail(message)
  pytest.skip(message)


@pytest.fixture(scope="session")
def mnist_dir() -> pathlib.Path:
  """Folder with the four MNIST IDX files (gzip)."""
  return _require_dir("mnist")


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> pathlib.Path:
  """Folder with the four Fashion-MNIST IDX files (gzip)."""
  return _require_dir("fashion-mnist")


@pytest.fixture(scope="session")
def celeba_half_dir() -> pathlib.Path:
  """Folder with 10,000 aligned CelebA faces at 89x109."""
  return _require_dir("celeba-aligned-half")


@pytest.fixture(scope="session")
def celeba_full_dir() -> pathlib.Path:
  """Folder with the first 32 aligned CelebA faces at 178x218."""
  return _require_dir("celeba-aligned-full")
