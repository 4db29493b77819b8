"""Model configuration: layer specs, the DCW/DPN switches and the paper's models.

The paper is Huang, Tu and Xu (2019), "Revisit Lmser and its further
development based on convolutional layers".

A `ModelConfig` is a frozen, hashable dataclass, so it can be a static argument
of `jax.jit`. Layers are listed bottom-up: connection `l` (1-based) maps layer
`l-1` to layer `l`; the last connection ends at the top (code) layer.
"""

import dataclasses
import math
import numbers
from typing import Sequence

ACTIVATIONS = ("relu", "sigmoid")
CODE_ACTIVATIONS = ("hidden", "linear")
DPN_MODES = ("sum", "average")
CONV_IMPLS = ("patches", "xla")
KERNEL_INITS = ("he", "glorot")
ARCHITECTURES = ("fc", "cnn")
# The four models of the paper, as points of the (DCW, DPN, label loss) table.
MODELS = ("ae", "lmser_un_n", "lmser_un", "lmser_sup")
_MODEL_SWITCHES = {
    "ae": dict(dcw=False, dpn=False, supervised=False),
    "lmser_un_n": dict(dcw=True, dpn=False, supervised=False),
    "lmser_un": dict(dcw=True, dpn=True, supervised=False),
    "lmser_sup": dict(dcw=True, dpn=True, supervised=True),
}


@dataclasses.dataclass(frozen=True)
class Dense:
  """A fully connected connection to a layer of `features` units.

  When it follows a spatial layer (the input image or a convolution), that
  layer is flattened first and the top-down map is reshaped back.
  """
  features: int

  def __post_init__(self):
    _check_sizes(self, features=1)


@dataclasses.dataclass(frozen=True)
class Conv:
  """A 2D convolution to a feature map of `features` channels.

  The top-down map is the exact adjoint of this convolution, so it returns
  the lower layer's shape for any size and stride.
  """
  features: int
  kernel_size: int = 3
  stride: int = 2
  padding: int = 1

  def __post_init__(self):
    _check_sizes(self, features=1, kernel_size=1, stride=1, padding=0)


def _check_sizes(spec, **minimums):
  """Raise ValueError unless each named field is an int of at least its minimum."""
  for name, minimum in minimums.items():
    value = getattr(spec, name)
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral) or
        value < minimum):
      raise ValueError(
          f"{type(spec).__name__}({name}={value!r}) is invalid; expected an"
          f" integer >= {minimum}")


LayerSpec = Dense | Conv


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything that fixes the network's shapes and dynamics.

  Attributes:
    input_shape: shape of one input, `(H, W, C)`, pixels in [0, 1].
    layers: connections bottom-up; the last one ends at the code layer.
    dcw: duality in connection weights. On, the top-down path uses the
      transpose of the bottom-up weights; off, it has its own weights.
    dpn: duality in paired neurons. On, a top-down neuron adds the bottom-up
      input of its paired neuron, and the encoder receives the top-down input
      of the previous reflection.
    dpn_mode: "sum" adds inputs before the activation, `f(y + u)`; "average"
      averages activities after it, `(f(u) + z) / 2`, as in the authors'
      later code (without its batch normalisation).
    activation: hidden activation `f`, "relu" or "sigmoid".
    code_activation: "hidden" applies `f` to the free code units, "linear"
      leaves them linear.
    num_classes: label units at the start of the code (0: unsupervised).
      The decoder receives their softmax.
    num_style: Gaussian style units after the label units, linear, with
      noise of standard deviation `style_noise_std` added during training.
    style_noise_std: standard deviation of the training noise on style units.
    kernel_init: "he" (He-uniform, fan-in) or "glorot" (Glorot-uniform, fan
      average). With ReLU and the paper's learning rate of 0.01, the CNN
      autoencoder collapses to a constant output from a Glorot start and
      trains from a He start.
    conv_impl: how convolutions are computed, "patches" (matrix products
      over image patches, the faster on CPU) or "xla"
      (`lax.conv_general_dilated`); both give the same numbers up to float
      rounding.
  """
  input_shape: tuple[int, ...]
  layers: tuple[LayerSpec, ...]
  dcw: bool = True
  dpn: bool = True
  dpn_mode: str = "sum"
  activation: str = "relu"
  code_activation: str = "hidden"
  num_classes: int = 0
  num_style: int = 0
  style_noise_std: float = 1.0
  kernel_init: str = "he"
  conv_impl: str = "patches"

  def __post_init__(self):
    if self.activation not in ACTIVATIONS:
      raise ValueError(
          f"activation={self.activation!r} is invalid; expected one of"
          f" {ACTIVATIONS}")
    if self.code_activation not in CODE_ACTIVATIONS:
      raise ValueError(
          f"code_activation={self.code_activation!r} is invalid; expected one"
          f" of {CODE_ACTIVATIONS}")
    if self.dpn_mode not in DPN_MODES:
      raise ValueError(
          f"dpn_mode={self.dpn_mode!r} is invalid; expected one of {DPN_MODES}")
    if self.kernel_init not in KERNEL_INITS:
      raise ValueError(
          f"kernel_init={self.kernel_init!r} is invalid; expected one of"
          f" {KERNEL_INITS}")
    if self.conv_impl not in CONV_IMPLS:
      raise ValueError(
          f"conv_impl={self.conv_impl!r} is invalid; expected one of"
          f" {CONV_IMPLS}")
    if len(self.input_shape) != 3:
      raise ValueError(
          f"input_shape={self.input_shape} is invalid; expected (H, W, C)")
    if not self.layers:
      raise ValueError("layers is empty; expected at least one connection")
    if not isinstance(self.layers[-1], Dense):
      raise ValueError("the last connection must be Dense (it ends at the code)")
    if self.num_classes < 0 or self.num_style < 0:
      raise ValueError("num_classes and num_style must be >= 0")
    if self.num_classes + self.num_style > self.code_dim:
      raise ValueError(
          f"num_classes + num_style = {self.num_classes + self.num_style}"
          f" exceeds the code size {self.code_dim}")
    # Shapes are checked here so that a bad stack fails before any tracing.
    self.layer_shapes  # pylint: disable=pointless-statement

  @property
  def code_dim(self) -> int:
    return self.layers[-1].features

  @property
  def depth(self) -> int:
    """Number of connections `L`; layer `L` is the code."""
    return len(self.layers)

  @property
  def supervised(self) -> bool:
    return self.num_classes > 0

  @property
  def layer_shapes(self) -> tuple[tuple[int, ...], ...]:
    """Per-example shapes of layers `0..L` (layer 0 is the input)."""
    shapes = [tuple(self.input_shape)]
    for index, spec in enumerate(self.layers, start=1):
      below = shapes[-1]
      if isinstance(spec, Dense):
        shapes.append((spec.features,))
        continue
      if len(below) != 3:
        raise ValueError(
            f"layer {index} is a Conv after a Dense layer; convolutions must"
            " come before the dense layers")
      height, width, _ = below
      out_h = (height + 2 * spec.padding - spec.kernel_size) // spec.stride + 1
      out_w = (width + 2 * spec.padding - spec.kernel_size) // spec.stride + 1
      if out_h < 1 or out_w < 1:
        raise ValueError(
            f"layer {index}: a {spec.kernel_size}x{spec.kernel_size} kernel"
            f" with stride {spec.stride} does not fit a {height}x{width} map")
      shapes.append((out_h, out_w, spec.features))
    return tuple(shapes)

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)


def fc_layers(hidden: Sequence[int] = (300, 100), code_dim: int = 10):
  """Fully connected stack; the paper's MNIST network is 784-300-100-10."""
  return tuple(Dense(n) for n in hidden) + (Dense(code_dim),)


def cnn_layers(channels: Sequence[int] = (16, 32, 64, 64),
               strides: Sequence[int] | None = None,
               code_dim: int = 10,
               kernel_size: int = 3,
               padding: int = 1):
  """Convolution stack followed by a dense layer to the code.

  The paper's MNIST network uses 3x3 kernels with stride 2 and channels
  16-32-64-64 (28 -> 14 -> 7 -> 4 -> 2), then a tied dense layer to the code.
  """
  strides = tuple(strides) if strides is not None else (2,) * len(channels)
  if len(strides) != len(channels):
    raise ValueError(
        f"{len(strides)} strides given for {len(channels)} conv layers")
  convs = tuple(
      Conv(c, kernel_size=kernel_size, stride=s, padding=padding)
      for c, s in zip(channels, strides))
  return convs + (Dense(code_dim),)


FACE_CHANNELS = (16, 32, 64, 128, 256, 256, 256)


def face_layers(image_size: int = 128, code_dim: int = 256):
  """Build the paper's CelebA stack for `image_size`, then a dense code layer.

  3x3 kernels with padding 1 and channels 16-32-64-128-256-256-256 with
  strides 1-2-2-2-2-2-2 at 128x128 (128 -> 128 -> 64 -> ... -> 2), the
  stack of the authors' public code. Every halving of the image size drops
  the last stride-2 layer, so the top map stays 2x2 (at 64x64: channels
  16-32-64-128-256-256).

  Args:
    image_size: side of the square input, 128 divided by a power of two,
      at least 8.
    code_dim: units of the code layer.

  Raises:
    ValueError: `image_size` is not 128 / 2^k for some k >= 0, or below 8.
  """
  halvings = 0
  size = 128
  while size > image_size and size % 2 == 0:
    size //= 2
    halvings += 1
  if size != image_size or image_size < 8:
    raise ValueError(
        f"image_size={image_size} is invalid; expected 128 divided by a"
        " power of two (128, 64, 32, ...), at least 8")
  channels = FACE_CHANNELS[:len(FACE_CHANNELS) - halvings]
  strides = (1,) + (2,) * (len(channels) - 1)
  return cnn_layers(channels, strides, code_dim=code_dim)


def make_config(arch: str = "fc",
                model: str = "lmser_un",
                *,
                input_shape: tuple[int, ...] = (28, 28, 1),
                num_classes: int = 10,
                **overrides) -> ModelConfig:
  """Build one of the paper's four models for the FC or CNN architecture.

  Args:
    arch: "fc" (784-300-100-code) or "cnn" (16-32-64-64 then dense).
    model: one of `MODELS`; it sets `dcw`, `dpn` and whether label units
      exist.
    input_shape: `(H, W, C)` of one image.
    num_classes: label units for "lmser_sup" (ignored otherwise).
    **overrides: any other `ModelConfig` field (`activation`, `num_style`,
      `dpn_mode`, `layers`, ...); these win over the model's switches.

  Returns:
    The `ModelConfig`. The code has 10 units, plus `num_style` for a
    supervised model with style units.
  """
  if arch not in ARCHITECTURES:
    raise ValueError(f"arch={arch!r} is invalid; expected one of {ARCHITECTURES}")
  if model not in MODELS:
    raise ValueError(f"model={model!r} is invalid; expected one of {MODELS}")
  switches = dict(_MODEL_SWITCHES[model])
  supervised = switches.pop("supervised")
  num_style = overrides.get("num_style", 0)
  classes = num_classes if supervised else 0
  code_dim = max(10, classes + num_style)
  if "layers" not in overrides:
    if arch == "fc":
      overrides["layers"] = fc_layers(code_dim=code_dim)
    else:
      overrides["layers"] = cnn_layers(code_dim=code_dim)
  fields = dict(input_shape=tuple(input_shape), num_classes=classes)
  fields.update(switches)
  fields.update(overrides)
  return ModelConfig(**fields)


def num_units(shape: Sequence[int]) -> int:
  return math.prod(shape)
