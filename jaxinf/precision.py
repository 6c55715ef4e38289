"""The engine's working precision.

``run.precision: float64`` enables JAX's x64 mode for the whole process (or a
test uses ``jax.enable_x64(True)``); the engine then accumulates, decomposes and
scores in float64, which is how parity with kronfluence is shown to 1e-6.
Otherwise every accumulator, eigendecomposition and score is float32, whatever
the model's compute dtype (bfloat16 activations are upcast before they are summed).
"""

import jax
import jax.numpy as jnp


def float_dtype():
    """float64 when x64 is enabled, float32 otherwise."""
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
