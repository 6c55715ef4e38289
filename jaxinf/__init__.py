"""jaxinf: EK-FAC influence functions for large language models, in JAX.

The engine (`jaxinf.engine.capture`, `jaxinf.engine.curvature`, `jaxinf.engine.scoring`) sees only a
loss function of (params, batch, probes); models, data, the run directory and
the analyses are adapters around it. See docs/method.md for the method, formula
by formula, next to the function that computes it.
"""

__version__ = "0.1.0"
