"""Lmser perception: reflections of bottom-up and top-down passes.

Layers are `0..L`; layer 0 is the input, layer `L` the code. One reflection:

1. bottom-up, `l = 1..L-1`: `y_l = W_l z_{l-1} + b_l`, `z_l = f(y_l + u_l)`
   with DPN (`u_l` left by the previous reflection, zero in the first), and
   `z_l = f(y_l)` without; then the top pre-activation `a_L = W_L z_{L-1} + b_L`;
2. the code `h_L` from `a_L`: softmax of the label logits, style units (plus
   noise in training), then `f` or identity on the remaining units;
3. top-down, `l = L-1..1`: `u_l = W_{l+1}^T h_{l+1} + c_l`, and
   `h_l = f(y_l + u_l)` with DPN ("sum"), `(f(u_l) + z_l) / 2` with DPN
   ("average"), `f(u_l)` without;
4. the reconstruction `x_hat = sigmoid(W_1^T h_1 + c_0)`.

The first `k - 1` reflections run as one `lax.scan` and the last after it,
so `k` costs one compilation. The scan carries the input layer (unless it
is clamped) and what the next top-down inputs `u_l` need.
"""

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lmser_jax import config as config_lib
from lmser_jax import connections
from lmser_jax import remat_scan

Params = dict


class States(NamedTuple):
  """Every intermediate state, each with a leading reflection axis `(k, B, ...)`.

  Tuples are indexed by hidden layer: entry `i` is layer `i + 1`.
  """
  inputs: jax.Array
  bottom_up: tuple[jax.Array, ...]
  encoder: tuple[jax.Array, ...]
  top_down: tuple[jax.Array, ...]
  decoder: tuple[jax.Array, ...]
  top: jax.Array
  code: jax.Array
  x_hat: jax.Array


class Perception(NamedTuple):
  """Outputs of the last reflection.

  Attributes:
    x_hat: `(B, H, W, C)` reconstruction in (0, 1).
    code: `(B, D)` top activity `h_L` that the decoder received.
    top: `(B, D)` top pre-activation `a_L`.
    logits: `(B, num_classes)` label logits, the first units of `a_L`
      (`(B, 0)` for an unsupervised model).
    states: `States` of every reflection, or None unless requested.
  """
  x_hat: jax.Array
  code: jax.Array
  top: jax.Array
  logits: jax.Array
  states: States | None = None


def init_params(key: jax.Array, config: config_lib.ModelConfig,
                dtype=jnp.float32) -> Params:
  """Draw the parameters of every connection with one random call.

  Returns:
    `{"layers": [connection_1, ..., connection_L]}`, each a dict as in
    `lmser_jax.connections.connection_from_noise`.
  """
  shapes = config.layer_shapes
  counts = [
      connections.num_noise_values(spec, shapes[i], dcw=config.dcw)
      for i, spec in enumerate(config.layers)
  ]
  noise = jax.random.uniform(key, (sum(counts),), dtype, minval=-1.0,
                             maxval=1.0)
  layers, offset = [], 0
  for i, spec in enumerate(config.layers):
    layers.append(
        connections.connection_from_noise(
            noise[offset:offset + counts[i]], spec, shapes[i], dcw=config.dcw,
            kernel_init=config.kernel_init))
    offset += counts[i]
  return {"layers": layers}


def activation_fn(name: str):
  return jax.nn.relu if name == "relu" else jax.nn.sigmoid


def code_from_top(config: config_lib.ModelConfig, top: jax.Array,
                  noise_key: jax.Array | None = None,
                  *,
                  style_noise: jax.Array | None = None) -> jax.Array:
  """Form the code `h_L` that the decoder receives from `a_L`.

  Args:
    config: the model.
    top: `(B, D)` top pre-activation.
    noise_key: when given, Gaussian noise of std `config.style_noise_std`
      is added to the style units (training only).
    style_noise: `(B, num_style)` standard normal noise to use in place of
      drawing it from `noise_key`.

  Returns:
    `(B, D)`: `softmax(logits)`, then style units, then `f` (or identity)
    of the free units.
  """
  num_classes, num_style = config.num_classes, config.num_style
  parts = []
  if num_classes:
    parts.append(jax.nn.softmax(top[:, :num_classes], axis=-1))
  if num_style:
    style = top[:, num_classes:num_classes + num_style]
    if style_noise is None and noise_key is not None:
      style_noise = jax.random.normal(noise_key, style.shape, style.dtype)
    if style_noise is not None:
      style = style + config.style_noise_std * style_noise
    parts.append(style)
  free = top[:, num_classes + num_style:]
  if free.shape[-1]:
    if config.code_activation == "hidden":
      free = activation_fn(config.activation)(free)
    parts.append(free)
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def bottom_up_pass(params: Params, config: config_lib.ModelConfig,
                   x: jax.Array, top_down_inputs: Sequence[jax.Array],
                   first_bottom_up: jax.Array | None = None):
  """Run the encoder once.

  Args:
    params: model parameters.
    config: the model.
    x: `(B, H, W, C)` input layer.
    top_down_inputs: `u_l` for hidden layers `1..L-1`; ignored without DPN.
    first_bottom_up: `y_1 = W_1 x + b_1` `(B, *shape of layer 1)` when the
      caller has it already (the same `x` in every reflection); computed
      from `x` when None.

  Returns:
    `(ys, zs, top)`: bottom-up inputs and activities of the hidden layers,
    and the top pre-activation `(B, D)`.
  """
  f = activation_fn(config.activation)
  layers = params["layers"]
  ys, zs = [], []
  z = x
  for i, spec in enumerate(config.layers[:-1]):
    if i == 0 and first_bottom_up is not None:
      y = first_bottom_up
    else:
      y = connections.bottom_up(layers[i], spec, z, config.conv_impl)
    z = f(y + top_down_inputs[i]) if config.dpn else f(y)
    ys.append(y)
    zs.append(z)
  top = connections.bottom_up(layers[-1], config.layers[-1], z,
                            config.conv_impl)
  return ys, zs, top


def top_down_pass(params: Params, config: config_lib.ModelConfig,
                  code: jax.Array,
                  bottom_up_inputs: Sequence[jax.Array] | None = None,
                  encoder_activities: Sequence[jax.Array] | None = None):
  """Run the decoder once from the code.

  Args:
    params: model parameters.
    config: the model.
    code: `(B, D)` top activity `h_L`.
    bottom_up_inputs: `y_l` of the paired neurons (DPN "sum"); None decodes
      from the code alone, `h_l = f(u_l)`.
    encoder_activities: `z_l` of the paired neurons (DPN "average").

  Returns:
    `(us, hs, x_hat)`: top-down inputs and activities of hidden layers
    `1..L-1` (bottom first) and the reconstruction `(B, H, W, C)`.
  """
  f = activation_fn(config.activation)
  layers, shapes = params["layers"], config.layer_shapes
  num_hidden = config.depth - 1
  us, hs = [None] * num_hidden, [None] * num_hidden
  h = code
  for i in reversed(range(num_hidden)):
    # Connection i + 1 links hidden layer i + 1 (0-based index i) to the one
    # above it.
    u = connections.top_down(
        layers[i + 1], config.layers[i + 1], h, shapes[i + 1], dcw=config.dcw,
        conv_impl=config.conv_impl)
    if not config.dpn:
      h = f(u)
    elif config.dpn_mode == "sum" and bottom_up_inputs is not None:
      h = f(bottom_up_inputs[i] + u)
    elif config.dpn_mode == "average" and encoder_activities is not None:
      h = 0.5 * (f(u) + encoder_activities[i])
    else:
      h = f(u)
    us[i], hs[i] = u, h
  out = connections.top_down(
      layers[0], config.layers[0], h, shapes[0], dcw=config.dcw,
      conv_impl=config.conv_impl)
  return us, hs, jax.nn.sigmoid(out)


def top_down_input(params: Params, config: config_lib.ModelConfig, i: int,
                   h: jax.Array) -> jax.Array:
  """Compute the top-down input `u = W^T h + c` of hidden layer `i + 1`.

  Args:
    params: model parameters.
    config: the model.
    i: 0-based index of the hidden layer (layer `i + 1`).
    h: `(B, *shape of layer i + 2)`, the activity above it.

  Returns:
    `(B, *shape of layer i + 1)`, as `top_down_pass` computes it.
  """
  return connections.top_down(
      params["layers"][i + 1], config.layers[i + 1], h,
      config.layer_shapes[i + 1], dcw=config.dcw, conv_impl=config.conv_impl)


def _carries_sources(config: config_lib.ModelConfig) -> tuple[bool, ...]:
  """Return, per hidden layer, whether the scan carries the activity above.

  True: the reflection scan carries the activity above the layer. False: it
  carries the layer's top-down input `u_l`. Above a dense connection the
  activity is smaller than `u_l` (FC: 100 and 10 units against 300 and
  100), and one small product recomputes `u_l`. So carrying the activity
  shrinks what a remat scan stores per reflection.

  For a convolution, recomputing `u_l` costs a whole transposed convolution
  per reflection. Carrying the activities above convolutions cut the CNN's
  8-reflection remat step from 19.7 to 17.1 MiB at batch 50, but made it
  18% slower (24% at 3 reflections without remat), so `u_l` is carried.
  """
  return tuple(isinstance(config.layers[i + 1], config_lib.Dense)
               for i in range(config.depth - 1))


def decode(params: Params, config: config_lib.ModelConfig,
           code: jax.Array) -> jax.Array:
  """Map a chosen code `(B, D)` to images `(B, H, W, C)` in (0, 1).

  The decoder alone: no paired bottom-up input reaches the hidden layers, so
  `h_l = f(u_l)` at every layer. For a supervised model, pass a one-hot
  label (or any distribution) in the label units.
  """
  _, _, x_hat = top_down_pass(params, config, code)
  return x_hat


def draw_style_noise(config: config_lib.ModelConfig, noise_key: jax.Array,
                     batch_size: int, reflections: int,
                     dtype=jnp.float32) -> jax.Array | None:
  """Draw the style noise that `perceive` adds for `noise_key`.

  Returns:
    `(reflections, batch_size, num_style)` standard normal values, the
    same ones `perceive(..., noise_key=noise_key)` uses, or None for a model
    without style units. Slicing rows of it lets a caller perceive parts of
    a batch with the noise of the whole batch.
  """
  if not config.num_style:
    return None
  keys = jax.random.split(noise_key, reflections)
  # A vmap over keys draws the same values as one `normal` call per key.
  return jax.vmap(
      lambda key: jax.random.normal(key, (batch_size, config.num_style),
                                    dtype))(keys)


def check_remat_carries(remat: bool, remat_carries: int | None) -> None:
  """Raise ValueError unless `remat` is a bool and `remat_carries` is None
  or an int >= 0 with `remat` True."""
  if not isinstance(remat, (bool, np.bool_)):
    raise ValueError(f"remat={remat!r} is invalid; expected True or False")
  if remat_carries is None:
    return
  if (isinstance(remat_carries, bool) or
      not isinstance(remat_carries, (int, np.integer)) or remat_carries < 0):
    raise ValueError(f"remat_carries={remat_carries!r} is invalid; expected"
                     " an integer >= 0 or None")
  if not remat:
    raise ValueError(f"remat_carries={remat_carries} needs remat=True; pass"
                     " remat=True or leave remat_carries None")


def perceive(params: Params,
             config: config_lib.ModelConfig,
             x: jax.Array,
             *,
             reflections: int = 1,
             noise_key: jax.Array | None = None,
             style_noise: jax.Array | None = None,
             observed: jax.Array | None = None,
             feed_reconstruction: bool = False,
             return_states: bool = False,
             remat: bool = False,
             remat_carries: int | None = None) -> Perception:
  """Perceive `x` through `reflections` bottom-up/top-down reflections.

  Args:
    params: model parameters from `init_params`.
    config: the model.
    x: `(B, H, W, C)` float input, pixels in [0, 1].
    reflections: number of reflections `k >= 1` (a Python int).
    noise_key: PRNG key for the style-unit noise; pass it in training only.
    style_noise: `(reflections, B, num_style)` noise from `draw_style_noise`,
      used in place of drawing it from `noise_key`.
    observed: optional mask broadcastable to `x`, 1 where a pixel is
      observed. After each reflection the input layer becomes
      `observed * x + (1 - observed) * x_hat` (associative recall), so
      observed pixels never change. Fill the masked pixels of `x` before
      calling.
    feed_reconstruction: with no mask, feed `x_hat` to the input layer of
      the next reflection instead of keeping it clamped to `x`.
    return_states: also return every intermediate state.
    remat: recompute each reflection in the backward pass instead of storing
      its activations. The scan still stores one carry (the state passed
      between reflections) per reflection.
    remat_carries: with `remat`, store at most this many carries besides
      the first and recompute the others from the nearest one stored
      (`lmser_jax.remat_scan`), so memory no longer grows with `k`. Each
      carry fewer costs recomputed reflections. Only first-order reverse
      mode is defined then: `jax.jvp`, `jax.linearize` and second
      derivatives (`jax.hessian`, grad of grad) through `perceive` raise.
      None stores one carry per reflection. Ignored with `return_states`,
      which stores every state anyway, and with one reflection.

  Returns:
    A `Perception` with the outputs of the last reflection.
  """
  if (isinstance(reflections, bool) or
      not isinstance(reflections, (int, np.integer)) or reflections < 1):
    raise ValueError(f"reflections={reflections!r} is invalid; expected an"
                     " integer >= 1")
  reflections = int(reflections)
  check_remat_carries(remat, remat_carries)
  if x.ndim != 4 or tuple(x.shape[1:]) != tuple(config.input_shape):
    raise ValueError(
        f"x has shape {tuple(x.shape)}; expected (batch,"
        f" {', '.join(map(str, config.input_shape))}) for this model")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(
        f"x has dtype {x.dtype}; expected floating-point pixels in [0, 1]"
        " (divide uint8 images by 255)")
  batch = x.shape[0]
  if style_noise is None and noise_key is not None:
    style_noise = draw_style_noise(config, noise_key, batch, reflections,
                                   x.dtype)
  if not config.num_style:
    style_noise = None

  # With the input clamped to `x`, it is read from the closure instead of
  # the carry, so that a remat scan does not store one copy per reflection.
  carries_input = observed is not None or feed_reconstruction

  # A clamped input gives the same `y_1 = W_1 x + b_1` in every reflection,
  # so it is computed once per step. Only for a dense first layer, because
  # it made the 3-reflection CNN step slower (benchmarks/README.md).
  first_bottom_up = None
  if (reflections > 1 and not carries_input and len(config.layers) > 1 and
      isinstance(config.layers[0], config_lib.Dense)):
    first_bottom_up = connections.bottom_up(
        params["layers"][0], config.layers[0], x, config.conv_impl)

  def reflect(carry, noise):
    """One reflection: `(carry, noise) -> (carry, (x_hat, code, top, states))`.

    The carry contains the input layer (when it is not clamped), for each
    hidden layer either its top-down input `u_l` or the activity above it
    that `u_l` is computed from (see `_carries_sources`), and whether a
    reflection has run.
    """
    carried_input, carried, started = carry
    x_in = carried_input if carries_input else x
    top_down_inputs = []
    for i, value in enumerate(carried):
      if from_source[i]:
        if isinstance(started, bool):
          # Outside the scan the flag is a Python bool, so the first
          # reflection skips the product on zeros and its gradient.
          value = (top_down_input(params, config, i, value) if started else
                   jnp.zeros((batch,) + config.layer_shapes[i + 1], x.dtype))
        else:
          # Every `u_l` is zero in the first reflection. The `where` keeps
          # that exact with one scan body for all reflections.
          u = top_down_input(params, config, i, value)
          value = jnp.where(started, u, jnp.zeros_like(u))
      top_down_inputs.append(value)
    ys, zs, top = bottom_up_pass(params, config, x_in, top_down_inputs,
                                 first_bottom_up)
    code = code_from_top(config, top, style_noise=noise)
    us, hs, x_hat = top_down_pass(params, config, code, ys, zs)
    if observed is not None:
      x_next = observed * x + (1 - observed) * x_hat
    elif feed_reconstruction:
      x_next = x_hat
    else:
      x_next = None
    states = None
    if return_states:
      states = States(x_in, tuple(ys), tuple(zs), tuple(us), tuple(hs), top,
                      code, x_hat)
    sources = tuple(hs[1:]) + (code,)
    carried = tuple(sources[i] if from_source[i] else us[i]
                    for i in range(len(us)))
    return (x_next, carried, jnp.ones((), bool)), (x_hat, code, top, states)

  # The last reflection is not rematerialised: its activations are what a
  # one-reflection step keeps too, and recomputing them would cost time.
  last_reflect = reflect
  use_remat_scan = (reflections > 1 and remat_carries is not None and
                    not return_states)
  # remat_scan takes the VJP of one reflection right after recomputing its
  # input, so a checkpoint there would only run the reflection once more.
  if remat and not use_remat_scan:
    reflect = jax.checkpoint(reflect)

  # The first k - 1 reflections only pass their carry on (and their states),
  # so the scan neither keeps their outputs nor, when the input is clamped,
  # computes their reconstructions: XLA drops that dead code.
  def inner(carry, noise):
    carry, (_, _, _, states) = reflect(carry, noise)
    return carry, states

  shapes = config.layer_shapes
  from_source = _carries_sources(config)
  carried = tuple(
      jnp.zeros((batch,) + shapes[i + 2 if from_source[i] else i + 1],
                x.dtype) for i in range(len(from_source)))
  carry = (x if carries_input else None, carried, jnp.zeros((), bool))
  noise_head = noise_last = None
  if style_noise is not None:
    noise_head, noise_last = style_noise[:-1], style_noise[-1]
  head_states = None
  if use_remat_scan:
    carry = remat_scan.remat_scan(
        lambda carry, noise: inner(carry, noise)[0], carry, noise_head,
        length=reflections - 1, carries=int(remat_carries))
  elif reflections > 1:
    carry, head_states = lax.scan(inner, carry, noise_head,
                                  length=reflections - 1)
  # Whether a reflection ran before the last is known here, so the last
  # one gets a Python bool in place of the traced flag.
  carry = carry[:2] + (reflections > 1,)
  _, (x_hat, code, top, last_states) = last_reflect(carry, noise_last)
  states = last_states
  if return_states:
    states = jax.tree.map(lambda s: s[None], last_states)
    if head_states is not None:
      states = jax.tree.map(lambda h, s: jnp.concatenate([h, s]),
                            head_states, states)
  logits = top[:, :config.num_classes]
  return Perception(x_hat, code, top, logits, states)
