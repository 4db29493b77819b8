"""Connection pairs: a bottom-up map and its exact transpose, one kernel each.

A connection between layer `l-1` and layer `l` holds

- `kernel`: `W_l`, a dense matrix `(n_in, n_out)` or a convolution kernel
  `(k, k, C_in, C_out)` (HWIO);
- `bias`: `b_l`, added bottom-up, shape `(n_out,)` or `(C_out,)`;
- `down_bias`: `c_{l-1}`, added top-down to layer `l-1`: per unit for a
  dense connection (the shape of layer `l-1`), per channel `(C_in,)` for a
  convolution;
- `down_kernel` (only with DCW off): the decoder's own weights `V_l`, the
  same shape as `kernel`, used in place of `W_l` on the way down.

Bottom-up is `y_l = W_l z_{l-1} + b_l`; top-down is `W_l^T h_l + c_{l-1}`,
where `W_l^T` is the linear adjoint of the bottom-up map. For convolutions
that adjoint is built by `jax.linear_transpose`, so it matches the forward
convolution exactly for odd sizes and any stride.
"""

import math

import jax
import jax.numpy as jnp
from jax import lax

from lmser_jax import config as config_lib

Params = dict[str, jax.Array]
_CONV_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def init_connection(key: jax.Array,
                    spec: config_lib.LayerSpec,
                    in_shape: tuple[int, ...],
                    *,
                    dcw: bool,
                    dtype=jnp.float32) -> Params:
  """Initialise one connection.

  Kernels use Glorot-uniform scaling (fan average), since with DCW the same
  weights carry signals both ways. Biases start at zero.

  Args:
    key: PRNG key.
    spec: the connection's `Dense` or `Conv` spec.
    in_shape: per-example shape of layer `l-1`.
    dcw: with False, a separate `down_kernel` is drawn.
    dtype: parameter dtype.

  Returns:
    A dict with `kernel`, `bias`, `down_bias` and, without DCW,
    `down_kernel`.
  """
  init = jax.nn.initializers.glorot_uniform()
  up_key, down_key = jax.random.split(key)
  if isinstance(spec, config_lib.Dense):
    kernel_shape = (math.prod(in_shape), spec.features)
    down_bias_shape = tuple(in_shape)
  else:
    kernel_shape = (spec.kernel_size, spec.kernel_size, in_shape[-1],
                    spec.features)
    down_bias_shape = (in_shape[-1],)
  params = {
      "kernel": init(up_key, kernel_shape, dtype),
      "bias": jnp.zeros((spec.features,), dtype),
      "down_bias": jnp.zeros(down_bias_shape, dtype),
  }
  if not dcw:
    params["down_kernel"] = init(down_key, kernel_shape, dtype)
  return params


def conv(z: jax.Array, kernel: jax.Array, spec: config_lib.Conv) -> jax.Array:
  """Bottom-up convolution without bias: `(B, H, W, C_in) -> (B, H', W', C_out)`."""
  pad = ((spec.padding, spec.padding), (spec.padding, spec.padding))
  return lax.conv_general_dilated(
      z, kernel, (spec.stride, spec.stride), pad,
      dimension_numbers=_CONV_DIMENSIONS)


def conv_transpose(h: jax.Array, kernel: jax.Array, spec: config_lib.Conv,
                   in_shape: tuple[int, ...]) -> jax.Array:
  """Exact adjoint of `conv` with the same kernel.

  Args:
    h: `(B, H', W', C_out)` top-down activity of layer `l`.
    kernel: `(k, k, C_in, C_out)`, the bottom-up kernel (or `V_l`).
    spec: the connection's spec.
    in_shape: `(H, W, C_in)` of layer `l-1`; it fixes the output size, which
      a stride-2 convolution alone leaves ambiguous.

  Returns:
    `(B, H, W, C_in)`.
  """
  template = jax.ShapeDtypeStruct((h.shape[0],) + tuple(in_shape), h.dtype)
  (out,) = jax.linear_transpose(lambda z: conv(z, kernel, spec), template)(h)
  return out


def bottom_up(params: Params, spec: config_lib.LayerSpec,
              z: jax.Array) -> jax.Array:
  """`y_l = W_l z_{l-1} + b_l`, flattening `z` first for a dense connection.

  Args:
    params: the connection's parameters.
    spec: its spec.
    z: `(B, *shape of layer l-1)`.

  Returns:
    `(B, *shape of layer l)`.
  """
  if isinstance(spec, config_lib.Dense):
    flat = z.reshape(z.shape[0], -1)
    return flat @ params["kernel"] + params["bias"]
  return conv(z, params["kernel"], spec) + params["bias"]


def top_down(params: Params, spec: config_lib.LayerSpec, h: jax.Array,
             in_shape: tuple[int, ...], *, dcw: bool) -> jax.Array:
  """`W_l^T h_l + c_{l-1}` (or `V_l^T h_l + c_{l-1}` without DCW).

  Args:
    params: the connection's parameters.
    spec: its spec.
    h: `(B, *shape of layer l)`, the top-down activity of layer `l`.
    in_shape: per-example shape of layer `l-1`.
    dcw: whether the top-down path reuses `kernel`.

  Returns:
    `(B, *in_shape)`, the top-down input to layer `l-1`.
  """
  kernel = params["kernel"] if dcw else params["down_kernel"]
  if isinstance(spec, config_lib.Dense):
    flat = h @ kernel.T
    return flat.reshape((h.shape[0],) + tuple(in_shape)) + params["down_bias"]
  return conv_transpose(h, kernel, spec, in_shape) + params["down_bias"]
