"""lmser_jax: Lmser, the bidirectional self-organizing network, in JAX."""
