"""XLA compiler options for programs that only run the model forward.

On CPU, the XLA of jaxlib 0.10.2 groups a whole forward pass (every matrix
product with the activations and reductions around it) into one YNNPACK
fusion. The FC evaluation step ran 3-3.5x slower that way than with
separate products, and the CNN one about 10-25% slower
(benchmarks/README.md has the runs). Setting
`xla_cpu_experimental_ynn_fusion_type` to no fusion kinds avoids that.
Training steps are left at XLA's default: with ten steps per call the
option made them equal or slower, by up to 13% for FC at batch 50.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

_CPU_FORWARD_OPTIONS = (("xla_cpu_experimental_ynn_fusion_type", ""),)


@functools.lru_cache(maxsize=None)
def _accepted(options: tuple[tuple[str, str], ...]) -> bool:
  """Return whether the installed XLA accepts `options`."""
  try:
    jax.jit(lambda x: x + 1,
            compiler_options=dict(options)).lower(jnp.float32(0)).compile()
  except RuntimeError:
    return False
  return True


def forward_options(mesh: Mesh) -> dict[str, str] | None:
  """Return the compiler options for a forward-only program on `mesh`.

  Returns:
    The CPU options above when `mesh` is on CPU and the installed XLA
    accepts them, else None (XLA's defaults). Either can be passed to
    `jax.jit(..., compiler_options=...)` as it is.
  """
  if mesh.devices.flat[0].platform != "cpu":
    return None
  if not _accepted(_CPU_FORWARD_OPTIONS):
    return None
  return dict(_CPU_FORWARD_OPTIONS)
