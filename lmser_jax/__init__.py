"""lmser_jax: Lmser, the bidirectional self-organizing network, in JAX.

The core is pure functions over parameter pytrees:

>>> import jax
>>> import lmser_jax
>>> config = lmser_jax.make_config("cnn", "lmser_sup")
>>> params = lmser_jax.init_params(jax.random.PRNGKey(0), config)
>>> x = jax.numpy.zeros((2, 28, 28, 1))
>>> out = lmser_jax.perceive(params, config, x, reflections=3)
>>> out.x_hat.shape, out.logits.shape
((2, 28, 28, 1), (2, 10))
"""

from lmser_jax.config import Conv
from lmser_jax.config import Dense
from lmser_jax.config import MODELS
from lmser_jax.config import ModelConfig
from lmser_jax.config import cnn_layers
from lmser_jax.config import face_layers
from lmser_jax.config import fc_layers
from lmser_jax.config import make_config
from lmser_jax.evaluation import evaluate
from lmser_jax.model import Perception
from lmser_jax.model import States
from lmser_jax.model import decode
from lmser_jax.model import init_params
from lmser_jax.model import perceive
from lmser_jax.train_loop import NonFiniteLossError
from lmser_jax.train_loop import TrainOptions
from lmser_jax.train_loop import train
from lmser_jax.training import TrainState
from lmser_jax.training import create_optimizer
from lmser_jax.training import create_train_state
from lmser_jax.training import make_eval_step
from lmser_jax.training import make_train_step

__all__ = [
    "Conv",
    "Dense",
    "MODELS",
    "ModelConfig",
    "NonFiniteLossError",
    "Perception",
    "States",
    "TrainOptions",
    "TrainState",
    "cnn_layers",
    "create_optimizer",
    "create_train_state",
    "decode",
    "evaluate",
    "face_layers",
    "fc_layers",
    "init_params",
    "make_config",
    "make_eval_step",
    "make_train_step",
    "perceive",
    "train",
]
