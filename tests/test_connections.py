"""Connection pairs: the top-down map is the exact adjoint of the bottom-up one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmser_jax import config as config_lib
from lmser_jax import connections

# Compiled once per case: eager dispatch of the patch slices and of
# `linear_transpose` would dominate the test time.
_conv = jax.jit(connections.conv, static_argnums=(2, 3))
_conv_transpose = jax.jit(connections.conv_transpose, static_argnums=(2, 3, 4))

def _normal(seed, shape):
  # NumPy draws: each new shape of a JAX random draw costs a compilation.
  return jnp.asarray(
      np.random.default_rng(seed).standard_normal(shape), jnp.float32)


CONV_CASES = [
    # (height, width, channels in, channels out, kernel, stride, padding)
    (28, 28, 1, 16, 3, 2, 1),
    (7, 7, 32, 64, 3, 2, 1),
    (5, 9, 3, 4, 3, 2, 1),
    (4, 4, 64, 64, 3, 2, 1),
    (13, 11, 2, 3, 3, 1, 1),
    (9, 9, 3, 5, 5, 3, 2),
    (8, 6, 2, 2, 3, 2, 0),
    # Pixels in no patch: a stride above the kernel size, or rows and
    # columns past the last patch.
    (6, 6, 2, 3, 1, 2, 0),
    (11, 10, 2, 3, 4, 3, 0),
]


def _spec_and_shape(case):
  """Return the `Conv` spec and the input shape `(H, W, C_in)` of a case."""
  height, width, c_in, c_out, kernel_size, stride, padding = case
  return (config_lib.Conv(c_out, kernel_size, stride, padding),
          (height, width, c_in))


@pytest.mark.parametrize("impl", config_lib.CONV_IMPLS)
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_adjoint_identity(case, impl):
  spec, in_shape = _spec_and_shape(case)
  out_shape = config_lib.ModelConfig(in_shape, (spec, config_lib.Dense(1)),
                                     ).layer_shapes[1]
  kernel = _normal(0, connections.kernel_shape(spec, in_shape))
  x = _normal(1, (2,) + in_shape)
  y = _normal(2, (2,) + out_shape)

  forward = _conv(x, kernel, spec, impl)
  backward = _conv_transpose(y, kernel, spec, in_shape, impl)

  assert forward.shape == (2,) + out_shape
  assert backward.shape == (2,) + in_shape
  lhs = float(jnp.vdot(forward, y))
  rhs = float(jnp.vdot(x, backward))
  np.testing.assert_allclose(lhs, rhs, rtol=2e-5, atol=1e-3)


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_impls_agree(case):
  spec, in_shape = _spec_and_shape(case)
  kernel = _normal(0, connections.kernel_shape(spec, in_shape))
  x = _normal(1, (3,) + in_shape)
  forward_xla = _conv(x, kernel, spec, "xla")
  forward_patches = _conv(x, kernel, spec, "patches")
  np.testing.assert_allclose(forward_patches, forward_xla, rtol=1e-5,
                             atol=1e-4)
  y = _normal(2, forward_xla.shape)
  np.testing.assert_allclose(
      _conv_transpose(y, kernel, spec, in_shape, "patches"),
      _conv_transpose(y, kernel, spec, in_shape, "xla"),
      rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("case", CONV_CASES)
def test_patch_maps_adjoint_identity(case):
  spec, in_shape = _spec_and_shape(case)
  x = _normal(0, (2,) + in_shape)
  columns = jax.jit(connections.image_patches, static_argnums=1)(x, spec)
  y = _normal(1, columns.shape)
  image = jax.jit(connections.patches_to_image, static_argnums=(1, 2))(
      y, spec, in_shape)
  assert image.shape == x.shape
  np.testing.assert_allclose(float(jnp.vdot(columns, y)),
                             float(jnp.vdot(x, image)), rtol=2e-5, atol=1e-3)


@pytest.mark.parametrize("case", CONV_CASES)
def test_patches_derivatives_match_xla(case):
  """Reverse and forward mode through the custom JVPs match lax.conv."""
  spec, in_shape = _spec_and_shape(case)
  x = _normal(0, (2,) + in_shape)
  kernel = _normal(1, connections.kernel_shape(spec, in_shape))
  h = _normal(2, (2,) + connections.conv(x, kernel, spec, "xla").shape[1:])

  def loss(impl, x, kernel, h):
    up = connections.conv(x, kernel, spec, impl)
    down = connections.conv_transpose(h, kernel, spec, in_shape, impl)
    return jnp.sum(jnp.sin(up)) + jnp.sum(jnp.cos(down) * x)

  args = (x, kernel, h)
  directions = (_normal(3, x.shape), _normal(4, kernel.shape),
                _normal(5, h.shape))

  def derivatives(impl):
    grads = jax.grad(lambda *a: loss(impl, *a), argnums=(0, 1, 2))(*args)
    _, slope = jax.jvp(lambda *a: loss(impl, *a), args, directions)
    return grads, slope

  (grads, slope), (want_grads, want_slope) = jax.jit(
      lambda: (derivatives("patches"), derivatives("xla")))()
  for got, want in zip(grads, want_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(slope, want_slope, rtol=1e-4, atol=1e-3)


def test_patch_maps_reject_wrong_shapes():
  spec = config_lib.Conv(4, 3, 2, 1)
  with pytest.raises(ValueError, match=r"expected \(B, H, W, C_in\)"):
    connections.image_patches(jnp.ones((7, 7, 2)), spec)
  # Patches of a 7x7 image, given with the shape of a 9x9 one.
  with pytest.raises(ValueError, match=r"expected \(2, 5, 5, 18\)"):
    connections.patches_to_image(jnp.ones((2, 4, 4, 18)), spec, (9, 9, 2))


@pytest.mark.parametrize("fields,message", [
    (dict(features=0), r"Conv\(features=0\) is invalid"),
    (dict(features=4, padding=-1), r"Conv\(padding=-1\) is invalid"),
    (dict(features=4, stride=2.0), r"Conv\(stride=2.0\) is invalid"),
    (dict(features=4, kernel_size=0), r"Conv\(kernel_size=0\) is invalid"),
])
def test_conv_spec_rejects_bad_sizes(fields, message):
  with pytest.raises(ValueError, match=message):
    config_lib.Conv(**fields)


@pytest.mark.parametrize("impl", config_lib.CONV_IMPLS)
def test_conv_rejects_bad_arguments(impl):
  spec = config_lib.Conv(4, 3, 2, 1)
  x = jnp.ones((2, 7, 5, 3))
  with pytest.raises(ValueError, match=r"kernel has shape \(1, 1, 27, 4\)"):
    connections.conv(x, jnp.ones((1, 1, 27, 4)), spec, impl)
  with pytest.raises(ValueError, match=r"kernel has shape \(3, 3, 3, 5\)"):
    connections.conv(x, jnp.ones((3, 3, 3, 5)), spec, impl)
  with pytest.raises(ValueError, match="does not fit an image"):
    connections.conv(jnp.ones((1, 2, 2, 1)), jnp.ones((3, 3, 1, 1)),
                     config_lib.Conv(1, 3, 2, 0), impl)
  with pytest.raises(ValueError, match=r"in_shape=\(7, 5\) is invalid"):
    connections.conv_transpose(jnp.ones((2, 4, 3, 4)), jnp.ones((3, 3, 3, 4)),
                               spec, (7, 5), impl)
  with pytest.raises(ValueError, match=r"in_shape=\(7.0, 5, 3\) is invalid"):
    connections.conv_transpose(jnp.ones((2, 4, 3, 4)), jnp.ones((3, 3, 3, 4)),
                               spec, (7.0, 5, 3), impl)


def test_conv_rejects_unknown_impl():
  with pytest.raises(ValueError, match="impl='XLA' is invalid"):
    connections.conv(jnp.ones((2, 7, 5, 3)), jnp.ones((3, 3, 3, 4)),
                     config_lib.Conv(4), "XLA")


@pytest.mark.parametrize("impl", config_lib.CONV_IMPLS)
def test_conv_transpose_rejects_wrong_shape(impl):
  spec = config_lib.Conv(4, 3, 2, 1)
  with pytest.raises(ValueError, match=r"h has shape \(2, 4, 4, 4\)"):
    connections.conv_transpose(jnp.ones((2, 4, 4, 4)), jnp.ones((3, 3, 2, 4)),
                               spec, (9, 9, 2), impl)


@pytest.mark.parametrize("in_shape,features", [((784,), 300), ((7,), 5),
                                               ((2, 2, 64), 10)])
def test_dense_adjoint_identity(in_shape, features):
  spec = config_lib.Dense(features)
  params = connections.init_connection(
      jax.random.PRNGKey(2), spec, in_shape, dcw=True)
  params = dict(params, bias=jnp.zeros_like(params["bias"]),
                down_bias=jnp.zeros_like(params["down_bias"]))
  x = _normal(0, (4,) + in_shape)
  y = _normal(1, (4, features))

  forward = connections.bottom_up(params, spec, x)
  backward = connections.top_down(params, spec, y, in_shape, dcw=True)

  assert backward.shape == (4,) + in_shape
  np.testing.assert_allclose(
      float(jnp.vdot(forward, y)), float(jnp.vdot(x, backward)), rtol=2e-5,
      atol=1e-3)


def test_dcw_one_kernel_per_connection():
  spec = config_lib.Conv(8)
  tied = connections.init_connection(
      jax.random.PRNGKey(0), spec, (9, 9, 3), dcw=True)
  untied = connections.init_connection(
      jax.random.PRNGKey(0), spec, (9, 9, 3), dcw=False)
  assert sorted(tied) == ["bias", "down_bias", "kernel"]
  assert sorted(untied) == ["bias", "down_bias", "down_kernel", "kernel"]
  assert untied["down_kernel"].shape == untied["kernel"].shape


@pytest.mark.parametrize("spec,in_shape", [
    (config_lib.Dense(6), (5,)),
    (config_lib.Conv(4), (7, 7, 3)),
])
def test_dcw_gradient_sums_both_paths(spec, in_shape):
  """With one shared kernel, its gradient is the bottom-up plus the top-down one."""
  params = connections.init_connection(
      jax.random.PRNGKey(0), spec, in_shape, dcw=True)
  x = _normal(0, (2,) + in_shape)
  out_shape = connections.bottom_up(params, spec, x).shape[1:]
  h = _normal(1, (2,) + out_shape)

  def loss(up_kernel, down_kernel):
    up = connections.bottom_up(dict(params, kernel=up_kernel), spec, x)
    down = connections.top_down(
        dict(params, kernel=down_kernel), spec, h, in_shape, dcw=True)
    return jnp.sum(jnp.sin(up)) + jnp.sum(jnp.cos(down))

  kernel = params["kernel"]
  tied = jax.jit(jax.grad(lambda k: loss(k, k)))(kernel)
  up_part, down_part = jax.jit(jax.grad(loss, argnums=(0, 1)))(kernel, kernel)
  assert float(jnp.abs(up_part).sum()) > 0
  assert float(jnp.abs(down_part).sum()) > 0
  np.testing.assert_allclose(tied, up_part + down_part, rtol=1e-5, atol=1e-5)


def test_mixed_dtypes_promote_in_both_impls():
  spec = config_lib.Conv(features=4, kernel_size=3, stride=2, padding=1)
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.uniform(size=(2, 9, 7, 3)), jnp.bfloat16)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
  outputs = {}
  for impl in ("patches", "xla"):
    y = connections.conv(z, kernel, spec, impl)
    back = connections.conv_transpose(y.astype(jnp.bfloat16), kernel, spec,
                                      (9, 7, 3), impl)
    assert y.dtype == jnp.float32, impl
    assert back.dtype == jnp.float32, impl
    outputs[impl] = (y, back)
  for got, want in zip(outputs["patches"], outputs["xla"]):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
