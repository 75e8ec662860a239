"""jinfer: JAX/XLA inference."""
