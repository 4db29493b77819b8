"""Connection pairs: a bottom-up map and its exact transpose, one kernel each.

A connection between layer `l-1` and layer `l` contains

- `kernel`: `W_l`, a dense matrix `(n_in, n_out)` or a convolution kernel
  `(k, k, C_in, C_out)` (HWIO);
- `bias`: `b_l`, added bottom-up, shape `(n_out,)` or `(C_out,)`;
- `down_bias`: `c_{l-1}`, added top-down to layer `l-1`: per unit for a
  dense connection (the shape of layer `l-1`), per channel `(C_in,)` for a
  convolution;
- `down_kernel` (only with DCW off): the decoder's own weights `V_l`, the
  same shape as `kernel`, used in place of `W_l` on the way down.

Bottom-up is `y_l = W_l z_{l-1} + b_l`; top-down is `W_l^T h_l + c_{l-1}`,
where `W_l^T` is the linear adjoint of the bottom-up map. A convolution
is a matrix product over image patches (`image_patches`), so its adjoint
is the transposed product followed by `patches_to_image`, which adds every
patch entry back to its pixel. It matches the forward convolution exactly
for odd sizes and any stride. With `impl="xla"` the adjoint is built by
`jax.linear_transpose` of `lax.conv_general_dilated`.
"""

import functools
import math
import operator

import jax
import jax.numpy as jnp
from jax import lax

from lmser_jax import config as config_lib

Params = dict[str, jax.Array]
_CONV_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def kernel_shape(spec: config_lib.LayerSpec,
                 in_shape: tuple[int, ...]) -> tuple[int, ...]:
  """`(n_in, n_out)` for a dense connection, `(k, k, C_in, C_out)` for a conv."""
  if isinstance(spec, config_lib.Dense):
    return (math.prod(in_shape), spec.features)
  return (spec.kernel_size, spec.kernel_size, in_shape[-1], spec.features)


def num_noise_values(spec: config_lib.LayerSpec, in_shape: tuple[int, ...],
                     *, dcw: bool) -> int:
  """Count the uniform values that `connection_from_noise` consumes."""
  return math.prod(kernel_shape(spec, in_shape)) * (1 if dcw else 2)


def connection_from_noise(noise: jax.Array,
                          spec: config_lib.LayerSpec,
                          in_shape: tuple[int, ...],
                          *,
                          dcw: bool,
                          kernel_init: str = "he") -> Params:
  """Build one connection from uniform noise in [-1, 1).

  Kernels are He-uniform (`limit = sqrt(6 / fan_in)`, for ReLU) or
  Glorot-uniform (`limit = sqrt(6 / (fan_in + fan_out))`); biases are zero.
  Taking the noise as an argument lets `model.init_params` draw every
  kernel of a network with one random call: on CPU each distinct random
  shape costs most of a second of compilation.

  Args:
    noise: `(num_noise_values(...),)` values in [-1, 1).
    spec: the connection's `Dense` or `Conv` spec.
    in_shape: per-example shape of layer `l-1`.
    dcw: with False, a separate `down_kernel` is built from the second half
      of `noise`.
    kernel_init: "he" or "glorot".

  Returns:
    A dict with `kernel`, `bias`, `down_bias` and, without DCW,
    `down_kernel`.
  """
  shape = kernel_shape(spec, in_shape)
  receptive = math.prod(shape[:-2])
  fan_in, fan_out = receptive * shape[-2], receptive * shape[-1]
  if kernel_init == "he":
    limit = math.sqrt(6.0 / fan_in)
  else:
    limit = math.sqrt(6.0 / (fan_in + fan_out))
  size = math.prod(shape)
  if isinstance(spec, config_lib.Dense):
    down_bias_shape = tuple(in_shape)
  else:
    down_bias_shape = (in_shape[-1],)
  params = {
      "kernel": limit * noise[:size].reshape(shape),
      "bias": jnp.zeros((spec.features,), noise.dtype),
      "down_bias": jnp.zeros(down_bias_shape, noise.dtype),
  }
  if not dcw:
    params["down_kernel"] = limit * noise[size:2 * size].reshape(shape)
  return params


def init_connection(key: jax.Array,
                    spec: config_lib.LayerSpec,
                    in_shape: tuple[int, ...],
                    *,
                    dcw: bool,
                    kernel_init: str = "he",
                    dtype=jnp.float32) -> Params:
  """Initialise one connection from `key`; see `connection_from_noise`."""
  count = num_noise_values(spec, in_shape, dcw=dcw)
  noise = jax.random.uniform(key, (count,), dtype, minval=-1.0, maxval=1.0)
  return connection_from_noise(noise, spec, in_shape, dcw=dcw,
                               kernel_init=kernel_init)


def _patches(z: jax.Array, spec: config_lib.Conv) -> jax.Array:
  """Image patches `(B, H', W', k * k * C_in)`, ordered like an HWIO kernel.

  Built from `k * k` strided slices of the padded input.
  """
  k, stride, pad = spec.kernel_size, spec.stride, spec.padding
  batch, out_h, out_w, _ = _columns_shape(spec, z.shape)
  channels = z.shape[-1]
  padded = jnp.pad(z, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  columns = [
      lax.slice(padded, (0, i, j, 0),
                (batch, i + stride * (out_h - 1) + 1,
                 j + stride * (out_w - 1) + 1, channels),
                (1, stride, stride, 1))
      for i in range(k) for j in range(k)
  ]
  return jnp.concatenate(columns, axis=-1)


def _col2im(columns: jax.Array, spec: config_lib.Conv,
            in_shape: tuple[int, ...]) -> jax.Array:
  """Add patches `(B, H', W', k * k * C_in)` back into an image `(B, H, W, C_in)`.

  This is the adjoint of `_patches`: each patch entry is added to the pixel
  it was read from. Pixels are grouped by their row and column remainders modulo
  the stride (`stride**2` phases). Within a phase, every tap lands on a
  contiguous, shifted block, so a phase is a sum of edge-padded slices.
  The phases are then interleaved.

  `jax.linear_transpose` of `_patches` instead pads every tap with interior
  zeros to the full image. In the compiled CNN step, XLA's CPU backend
  wrote those `k * k` padded images to memory one by one, because their sum
  had two consumers (the top-down input's value and its derivative).
  """
  k, stride, pad = spec.kernel_size, spec.stride, spec.padding
  batch, out_h, out_w, _ = columns.shape
  height, width, channels = in_shape
  # Rows and columns of the padded image per phase. Every tap fits in them.
  phase_rows = -(-(height + 2 * pad) // stride)
  phase_cols = -(-(width + 2 * pad) // stride)
  taps = columns.reshape(batch, out_h, out_w, k, k, channels)
  phases = []
  for row_phase in range(stride):
    phase_row = []
    for col_phase in range(stride):
      total = jnp.zeros((batch, phase_rows, phase_cols, channels),
                        columns.dtype)
      for i in range(row_phase, k, stride):
        for j in range(col_phase, k, stride):
          di, dj = i // stride, j // stride
          total = total + jnp.pad(
              taps[:, :, :, i, j, :],
              ((0, 0), (di, phase_rows - di - out_h),
               (dj, phase_cols - dj - out_w), (0, 0)))
      phase_row.append(total)
    phases.append(jnp.stack(phase_row, axis=3))
  padded = jnp.stack(phases, axis=2).reshape(
      batch, phase_rows * stride, phase_cols * stride, channels)
  return padded[:, pad:pad + height, pad:pad + width, :]


def _columns_shape(spec: config_lib.Conv, z_shape: tuple[int, ...]):
  """Return the shape of `_patches(z, spec)` for `z` of shape `z_shape`."""
  k, stride, pad = spec.kernel_size, spec.stride, spec.padding
  batch, height, width, channels = z_shape
  return (batch, (height + 2 * pad - k) // stride + 1,
          (width + 2 * pad - k) // stride + 1, k * k * channels)


def _check_image_shape(spec: config_lib.Conv, in_shape) -> tuple[int, ...]:
  """Return `in_shape` as a tuple of ints, or raise ValueError.

  Valid: three positive integers `(H, W, C_in)` on which `spec` gives an
  output of at least one pixel.
  """
  try:
    shape = tuple(operator.index(size) for size in in_shape)
  except TypeError:
    shape = None
  if shape is None or len(shape) != 3 or min(shape) < 1:
    raise ValueError(f"in_shape={in_shape!r} is invalid; expected (H, W,"
                     " C_in), three positive integers")
  _, out_h, out_w, _ = _columns_shape(spec, (1,) + shape)
  if out_h < 1 or out_w < 1:
    raise ValueError(
        f"{spec} does not fit an image of shape {shape}: its output would be"
        f" {out_h}x{out_w}")
  return shape


def _check_image(z: jax.Array, spec: config_lib.Conv):
  """Raise ValueError unless `z` is `(B, H, W, C_in)` and `spec` fits it."""
  if z.ndim != 4:
    raise ValueError(f"z has shape {tuple(z.shape)}; expected (B, H, W, C_in)")
  _check_image_shape(spec, z.shape[1:])


def _check_kernel(kernel: jax.Array, spec: config_lib.Conv, channels: int,
                  impl: str):
  """Raise ValueError for an unknown `impl` or a kernel unlike `spec`'s."""
  if impl not in config_lib.CONV_IMPLS:
    raise ValueError(f"impl={impl!r} is invalid; expected one of"
                     f" {config_lib.CONV_IMPLS}")
  expected = (spec.kernel_size, spec.kernel_size, channels, spec.features)
  if tuple(kernel.shape) != expected:
    raise ValueError(
        f"kernel has shape {tuple(kernel.shape)}; expected {expected} (k, k,"
        f" C_in, C_out) for {spec} on {channels} input channels")


# `_patches` and `_col2im` are adjoint linear maps. Reverse-mode autodiff
# transposes the tangent map of a custom JVP. So each map below writes its
# tangent as the transpose of the other's formulation. The backward pass of
# the patches then runs `_col2im`, and that of `_col2im` runs the strided
# slices of `_patches`. Forward-mode autodiff still works.
@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def image_patches(z: jax.Array, spec: config_lib.Conv) -> jax.Array:
  """Extract the patches `(B, H', W', k * k * C_in)` of `z` `(B, H, W, C_in)`.

  They are ordered like an HWIO kernel, so `image_patches(z, spec) @
  kernel.reshape(-1, C_out)` is the convolution.

  Raises:
    ValueError: `z` is not 4-D, or `spec` gives it an empty output.
  """
  _check_image(z, spec)
  return _patches(z, spec)


@image_patches.defjvp
def _image_patches_jvp(spec, primals, tangents):
  (z,), (dz,) = primals, tangents
  template = jax.ShapeDtypeStruct(_columns_shape(spec, z.shape), z.dtype)
  adjoint = jax.linear_transpose(
      functools.partial(_col2im, spec=spec, in_shape=z.shape[1:]), template)
  return _patches(z, spec), adjoint(dz)[0]


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def patches_to_image(columns: jax.Array, spec: config_lib.Conv,
                     in_shape: tuple[int, ...]) -> jax.Array:
  """Sum every patch entry into its pixel: the exact adjoint of `image_patches`.

  Args:
    columns: `(B, H', W', k * k * C_in)`.
    spec: the convolution's spec.
    in_shape: `(H, W, C_in)` of the image.

  Returns:
    `(B, H, W, C_in)`.

  Raises:
    ValueError: `in_shape` is invalid, or `columns` is not the shape of the
      patches of such an image.
  """
  in_shape = _check_image_shape(spec, in_shape)
  expected = _columns_shape(spec, (columns.shape[0],) + in_shape)
  if tuple(columns.shape) != expected:
    raise ValueError(
        f"columns have shape {tuple(columns.shape)}; expected {expected}, the"
        f" patches of an image of shape {in_shape} for {spec}")
  return _col2im(columns, spec, in_shape)


@patches_to_image.defjvp
def _patches_to_image_jvp(spec, in_shape, primals, tangents):
  (columns,), (d_columns,) = primals, tangents
  template = jax.ShapeDtypeStruct((columns.shape[0],) + tuple(in_shape),
                                  columns.dtype)
  adjoint = jax.linear_transpose(functools.partial(_patches, spec=spec),
                                 template)
  return _col2im(columns, spec, tuple(in_shape)), adjoint(d_columns)[0]


def conv(z: jax.Array, kernel: jax.Array, spec: config_lib.Conv,
         impl: str = "patches") -> jax.Array:
  """Bottom-up convolution without bias: `(B, H, W, C_in) -> (B, H', W', C_out)`.

  `impl` selects the formulation, with equal results up to float rounding:
  "xla" is `lax.conv_general_dilated`; "patches" is a matrix product over
  image patches, several times faster on CPU for the small maps and channel
  counts of these networks, mostly in the backward pass.

  Raises:
    ValueError: `impl` is unknown, `z` is not 4-D, `spec` gives it an empty
      output, or `kernel` is not `(k, k, C_in, spec.features)`.
  """
  _check_image(z, spec)
  _check_kernel(kernel, spec, z.shape[-1], impl)
  if impl == "xla":
    # Promote as the matrix product of "patches" does, so that both
    # formulations accept mixed dtypes and return the same dtype.
    dtype = jnp.result_type(z, kernel)
    z, kernel = z.astype(dtype), kernel.astype(dtype)
    pad = ((spec.padding, spec.padding), (spec.padding, spec.padding))
    return lax.conv_general_dilated(
        z, kernel, (spec.stride, spec.stride), pad,
        dimension_numbers=_CONV_DIMENSIONS)
  return image_patches(z, spec) @ kernel.reshape(-1, kernel.shape[-1])


def conv_transpose(h: jax.Array, kernel: jax.Array, spec: config_lib.Conv,
                   in_shape: tuple[int, ...], impl: str = "patches") -> jax.Array:
  """Exact adjoint of `conv` with the same kernel.

  Args:
    h: `(B, H', W', C_out)` top-down activity of layer `l`.
    kernel: `(k, k, C_in, C_out)`, the bottom-up kernel (or `V_l`).
    spec: the connection's spec.
    in_shape: `(H, W, C_in)` of layer `l-1`; it fixes the output size, which
      a stride-2 convolution alone leaves ambiguous.
    impl: "patches" or "xla", as in `conv`.

  Returns:
    `(B, H, W, C_in)`.

  Raises:
    ValueError: `impl`, `in_shape` or `kernel` is invalid, or `h` is not the
      shape of the convolution of such a layer.
  """
  in_shape = _check_image_shape(spec, in_shape)
  _check_kernel(kernel, spec, in_shape[-1], impl)
  _, out_h, out_w, _ = _columns_shape(spec, (1,) + in_shape)
  expected = tuple(h.shape[:1]) + (out_h, out_w, spec.features)
  if tuple(h.shape) != expected:
    raise ValueError(
        f"h has shape {tuple(h.shape)}; expected {expected}, the output of"
        f" {spec} on a layer of shape {in_shape}")
  if impl == "xla":
    h = h.astype(jnp.result_type(h, kernel))
    template = jax.ShapeDtypeStruct((h.shape[0],) + in_shape, h.dtype)
    (out,) = jax.linear_transpose(
        lambda z: conv(z, kernel, spec, "xla"), template)(h)
    return out
  columns = h @ kernel.reshape(-1, kernel.shape[-1]).T
  return patches_to_image(columns, spec, in_shape)


def bottom_up(params: Params, spec: config_lib.LayerSpec, z: jax.Array,
              conv_impl: str = "patches") -> jax.Array:
  """`y_l = W_l z_{l-1} + b_l`, flattening `z` first for a dense connection.

  Args:
    params: the connection's parameters.
    spec: its spec.
    z: `(B, *shape of layer l-1)`.
    conv_impl: formulation of a convolution, see `conv`.

  Returns:
    `(B, *shape of layer l)`.
  """
  if isinstance(spec, config_lib.Dense):
    flat = z.reshape(z.shape[0], -1)
    return flat @ params["kernel"] + params["bias"]
  return conv(z, params["kernel"], spec, conv_impl) + params["bias"]


def top_down(params: Params, spec: config_lib.LayerSpec, h: jax.Array,
             in_shape: tuple[int, ...], *, dcw: bool,
             conv_impl: str = "patches") -> jax.Array:
  """`W_l^T h_l + c_{l-1}` (or `V_l^T h_l + c_{l-1}` without DCW).

  Args:
    params: the connection's parameters.
    spec: its spec.
    h: `(B, *shape of layer l)`, the top-down activity of layer `l`.
    in_shape: per-example shape of layer `l-1`.
    dcw: whether the top-down path reuses `kernel`.
    conv_impl: formulation of a convolution, see `conv`.

  Returns:
    `(B, *in_shape)`, the top-down input to layer `l-1`.
  """
  kernel = params["kernel"] if dcw else params["down_kernel"]
  if isinstance(spec, config_lib.Dense):
    flat = h @ kernel.T
    return flat.reshape((h.shape[0],) + tuple(in_shape)) + params["down_bias"]
  return (conv_transpose(h, kernel, spec, in_shape, conv_impl) +
          params["down_bias"])
