"""Dataset loaders: IDX files and the MNIST / Fashion-MNIST splits."""

from lmser_jax.data.idx import DataError
from lmser_jax.data.idx import read_idx
from lmser_jax.data.mnist import DATASETS
from lmser_jax.data.mnist import load_idx_split
from lmser_jax.data.mnist import load_split
from lmser_jax.data.mnist import SPLITS
from lmser_jax.data.mnist import Split

__all__ = [
    "DATASETS",
    "DataError",
    "SPLITS",
    "Split",
    "load_idx_split",
    "load_split",
    "read_idx",
]
