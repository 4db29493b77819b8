"""Generation from chosen top codes: label and style codes, unit sweeps, decoding.

Lmser's top code is organised well enough to synthesise an image from code
values set by hand (Huang, Tu and Xu, 2019, section "Generation"):

- Lmser(sup) with style units: a one-hot label in the label units and chosen
  values in the `num_style` Gaussian style units (`label_style_codes`, over a
  grid from `style_grid`);
- an unsupervised Lmser: one code unit swept over a range of values while
  the others stay at the code of a test image (`unit_sweeps`).

`decode_codes` maps codes to images in two ways. With `reflections=0` it is
the decoder alone, `h_l = f(u_l)`. With DPN on, the decoder was trained with
the bottom-up inputs `y_l` of the paired neurons added, which the decoder
alone does not have. With `reflections=k > 0` the decoded image is then
perceived `k` more times, Lmser style. Each reflection runs the encoder on
the previous image (with DPN, adding the previous top-down inputs), clamps
the chosen code units to their values, and runs the decoder with the paired
bottom-up inputs. `perceive_clamped` perceives a real image with some code
units clamped, e.g. the label units set to another label.
`label_consistency` scores generated images against the labels that an
independent classifier gives them.

Every function is pure; those taking `config` are jit-compatible with
`config` (and `reflections`) static.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lmser_jax import config as config_lib
from lmser_jax import model


def style_grid(center: jax.Array, values_0: jax.Array,
               values_1: jax.Array | None = None) -> jax.Array:
  """Style vectors on a grid over the first one or two style units.

  Args:
    center: `(S,)` style values of the units that are not swept.
    values_0: `(C,)` values of style unit 0, along the columns.
    values_1: `(R,)` values of style unit 1, along the rows; None keeps unit
      1 at `center` and gives one row.

  Returns:
    `(R * C, S)` style vectors, row-major: entry `r * C + c` has unit 0 at
    `values_0[c]` and unit 1 at `values_1[r]`.
  """
  center = jnp.asarray(center)
  values_0 = jnp.asarray(values_0, center.dtype)
  if values_1 is None:
    values_1 = center[1:2] if center.shape[0] > 1 else jnp.zeros((1,),
                                                                center.dtype)
  values_1 = jnp.asarray(values_1, center.dtype)
  rows, columns = values_1.shape[0], values_0.shape[0]
  styles = jnp.broadcast_to(center, (rows, columns, center.shape[0]))
  styles = styles.at[:, :, 0].set(jnp.broadcast_to(values_0, (rows, columns)))
  if center.shape[0] > 1:
    styles = styles.at[:, :, 1].set(
        jnp.broadcast_to(values_1[:, None], (rows, columns)))
  return styles.reshape(rows * columns, center.shape[0])


def label_style_codes(config: config_lib.ModelConfig, labels: jax.Array,
                      styles: jax.Array,
                      free: jax.Array | None = None) -> jax.Array:
  """Codes `h_L` of a supervised model from labels and style values.

  The decoder of Lmser(sup) receives `softmax(logits)` in the label units,
  so a one-hot label is the code of a fully confident recognition.

  Args:
    config: a model with `num_classes > 0`.
    labels: `(N,)` int labels in `[0, num_classes)`.
    styles: `(N, num_style)` style values.
    free: `(N, F)` values of the free units after the style units, if the
      code has any; None sets them to zero.

  Returns:
    `(N, code_dim)` float32 codes: one-hot label, style, free units.
  """
  if not config.num_classes:
    raise ValueError("label_style_codes needs a supervised model"
                     " (num_classes > 0)")
  labels = jnp.asarray(labels)
  styles = jnp.asarray(styles, jnp.float32).reshape(labels.shape[0],
                                                    config.num_style)
  num_free = config.code_dim - config.num_classes - config.num_style
  if free is None:
    free = jnp.zeros((labels.shape[0], num_free), jnp.float32)
  one_hot = jax.nn.one_hot(labels, config.num_classes, dtype=jnp.float32)
  return jnp.concatenate([one_hot, styles, jnp.asarray(free, jnp.float32)],
                         axis=-1)


def unit_sweeps(code: jax.Array, values: jax.Array) -> jax.Array:
  """Codes that sweep each unit of `code` in turn, the others fixed.

  Args:
    code: `(D,)` base code.
    values: `(D, V)` values of each unit along its sweep.

  Returns:
    `(D * V, D)` codes, row-major: entry `i * V + j` equals `code` except
    that unit `i` is `values[i, j]`.
  """
  code = jnp.asarray(code)
  values = jnp.asarray(values, code.dtype)
  num_units, num_values = values.shape
  codes = jnp.broadcast_to(code, (num_units, num_values, num_units))
  # One-hot mask of the swept unit of every row.
  swept = jnp.eye(num_units, dtype=bool)[:, None, :]
  codes = jnp.where(swept, values[:, :, None], codes)
  return codes.reshape(num_units * num_values, num_units)


def sweep_values(low: jax.Array, high: jax.Array,
                 num_values: int) -> jax.Array:
  """`(D, num_values)` evenly spaced values from `low[i]` to `high[i]`."""
  fractions = jnp.linspace(0.0, 1.0, num_values)
  low, high = jnp.asarray(low), jnp.asarray(high)
  return low[:, None] + (high - low)[:, None] * fractions[None, :]


def _check_codes(config: config_lib.ModelConfig, codes: jax.Array,
                 reflections: int, minimum: int) -> jax.Array:
  if reflections < minimum:
    raise ValueError(f"reflections={reflections} is invalid; expected >="
                     f" {minimum}")
  codes = jnp.asarray(codes, jnp.float32)
  if codes.ndim != 2 or codes.shape[1] != config.code_dim:
    raise ValueError(f"codes have shape {codes.shape}; expected (batch,"
                     f" {config.code_dim}) for this model")
  return codes


def _reflect_clamped(params, config, x, top_down_inputs, codes, clamped,
                     reflections, feed_reconstruction):
  """Run `reflections` reflections with the `clamped` code units set to `codes`.

  Returns the reconstruction of the last reflection. The input layer stays
  `x`, or becomes the previous reconstruction with `feed_reconstruction`.
  """
  if clamped is None:
    clamped = jnp.ones((config.code_dim,), bool)

  def reflect_with_clamped_code(carry, _):
    x_in, top_down_inputs, _ = carry
    ys, zs, top = model.bottom_up_pass(params, config, x_in, top_down_inputs)
    code = jnp.where(clamped, codes, model.code_from_top(config, top))
    top_down_inputs, _, x_hat = model.top_down_pass(params, config, code, ys,
                                                    zs)
    x_next = x_hat if feed_reconstruction else x_in
    return (x_next, tuple(top_down_inputs), x_hat), None

  (_, _, x_hat), _ = lax.scan(reflect_with_clamped_code,
                              (x, tuple(top_down_inputs), x), None,
                              length=reflections)
  return x_hat


def decode_codes(params: model.Params,
                 config: config_lib.ModelConfig,
                 codes: jax.Array,
                 *,
                 reflections: int = 0,
                 clamped: jax.Array | None = None) -> jax.Array:
  """Generate images `(B, H, W, C)` in (0, 1) from chosen codes `(B, D)`.

  `reflections=0` is the decoder alone (`model.decode`). With
  `reflections=k > 0`, `k` reflections follow. In each, the encoder
  perceives the previous image (with DPN it adds the previous top-down
  inputs `u_l`), and the `clamped` code units are set back to `codes`. Then
  the decoder runs with the paired bottom-up inputs `y_l`, as in
  `model.perceive`. The input layer is the previous reflection's output,
  because no image is given.

  NOTE: a model trained with DPN ("sum") reconstructs through the paired
  inputs and ignores most of its code. On MNIST, neither way made its
  Lmser(sup) draw the requested digit more often than chance. The same
  network trained without DPN drew it for 98% of the images or more
  (see the generation section of the README).

  Args:
    params: model parameters.
    config: the model (static under jit).
    codes: `(B, D)` codes, e.g. from `label_style_codes` or `unit_sweeps`.
    reflections: reflections after the first decoding (static), >= 0.
    clamped: `(D,)` bool, the code units clamped to `codes` in every
      reflection. The others take the encoder's (noise-free) code. None
      clamps all units.

  Returns:
    `(B, H, W, C)` images of the last reflection.
  """
  codes = _check_codes(config, codes, reflections, minimum=0)
  top_down_inputs, _, x = model.top_down_pass(params, config, codes)
  if reflections == 0:
    return x
  return _reflect_clamped(params, config, x, tuple(top_down_inputs), codes,
                          clamped, reflections, feed_reconstruction=True)


def perceive_clamped(params: model.Params,
                     config: config_lib.ModelConfig,
                     x: jax.Array,
                     codes: jax.Array,
                     clamped: jax.Array,
                     *,
                     reflections: int = 1) -> jax.Array:
  """Perceive images `x` with some code units clamped to chosen values.

  `model.perceive` with the input layer clamped to `x`, except that after
  every bottom-up pass the `clamped` code units are set to `codes`. With
  the label units of Lmser(sup) clamped, it redraws an image as another
  label. The decoder then receives the paired bottom-up inputs `y_l` of `x`
  (with DPN), so the result shows how much of the image reaches the output
  through the code and how much around it.

  Args:
    params: model parameters.
    config: the model (static under jit).
    x: `(B, H, W, C)` float images in [0, 1].
    codes: `(B, D)` values of the clamped units (the others are ignored).
    clamped: `(D,)` bool, the clamped code units.
    reflections: reflections (static), >= 1.

  Returns:
    `(B, H, W, C)` reconstructions of the last reflection.
  """
  codes = _check_codes(config, codes, reflections, minimum=1)
  zeros = tuple(jnp.zeros((x.shape[0],) + shape, x.dtype)
                for shape in config.layer_shapes[1:-1])
  return _reflect_clamped(params, config, x, zeros, codes, clamped,
                          reflections, feed_reconstruction=False)


def code_ranges(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-unit minimum and maximum of codes `(N, D)`: two `(D,)` arrays."""
  codes = np.asarray(codes)
  return codes.min(axis=0), codes.max(axis=0)


def dead_units(low: np.ndarray, high: np.ndarray,
               tolerance: float = 1e-6) -> list[int]:
  """Indices of the units whose observed range `high - low` is <= `tolerance`.

  A ReLU code unit whose pre-activation is negative for every input is 0
  on every image: sweeping it over its observed range changes nothing.
  """
  return [int(i) for i in np.flatnonzero(np.asarray(high) - np.asarray(low)
                                         <= tolerance)]


def label_consistency(predicted: Sequence[int], requested: Sequence[int],
                      num_classes: int) -> dict:
  """Share of generated images whose predicted label is the requested one.

  Args:
    predicted: `(N,)` labels that a classifier gives the generated images.
    requested: `(N,)` labels that the codes asked for.
    num_classes: number of labels.

  Returns:
    `overall` (share over all N images), `per_label` (a list of
    `num_classes` shares, None for a label never requested), `count` (N)
    and `count_per_label`.
  """
  predicted = np.asarray(predicted).reshape(-1)
  requested = np.asarray(requested).reshape(-1)
  if predicted.shape != requested.shape:
    raise ValueError(f"{predicted.shape[0]} predictions for"
                     f" {requested.shape[0]} requested labels; expected one"
                     " each")
  hits = predicted == requested
  per_label, counts = [], []
  for label in range(num_classes):
    chosen = requested == label
    counts.append(int(chosen.sum()))
    per_label.append(float(hits[chosen].mean()) if chosen.any() else None)
  return {
      "overall": float(hits.mean()) if hits.size else None,
      "per_label": per_label,
      "count": int(hits.size),
      "count_per_label": counts,
  }
