"""The matrix products of a one-reflection training step of an FC model.

Kept apart from `benchmarks.fc_bound`, which defines command-line flags,
so that tests can import the list without them.
"""


def step_products(batch: int, widths: list[int]) -> list[tuple]:
  """List the matrix products of a one-reflection FC training step.

  Returns:
    One `(name, lhs shape, rhs shape, lhs contracting dim, rhs contracting
    dim)` per product, for layer widths `widths` (input first).
  """
  products = []
  for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
    layer = f"layer {i + 1} ({n_in}->{n_out})"
    products += [
        (f"{layer} bottom-up", (batch, n_in), (n_in, n_out), 1, 0),
        (f"{layer} top-down", (batch, n_out), (n_in, n_out), 1, 1),
        (f"{layer} top-down input gradient", (batch, n_in), (n_in, n_out),
         1, 0),
        (f"{layer} bottom-up weight gradient", (batch, n_in), (batch, n_out),
         0, 0),
        (f"{layer} top-down weight gradient", (batch, n_in), (batch, n_out),
         0, 0),
    ]
    if i > 0:
      # The image needs no gradient, but the hidden layers do.
      products.append((f"{layer} bottom-up input gradient", (batch, n_out),
                       (n_in, n_out), 1, 1))
  return products
