"""The engine's working precision: the dtype of its statistics, given explicitly.

Every accumulator, eigendecomposition, preconditioned gradient and score is
formed in one *statistics dtype*: float32, or float64 for ``run.precision:
float64`` (which is how parity with kronfluence is shown to 1e-6), whatever the
model's compute dtype (bfloat16 activations are upcast before they are summed).

The dtype is a value, never read from JAX's process-wide state:

- a run turns ``run.precision`` into it once (:func:`statistics_dtype`) and
  passes it to the stage constructors and scoring functions;
- a caller that gives none gets the dtype its own arrays carry
  (:func:`working_dtype`: the widest floating dtype among them, at least
  float32), so a float64 model scores in float64 and a bfloat16 or float32 one
  in float32; and the later stages follow the dtypes of the earlier stages'
  results (an eigendecomposition is in its factor's dtype, preconditioning in
  ``Lambda``'s).

JAX can hold float64 arrays only in its 64-bit mode, a switch of the whole
process that must be on before the model is loaded. :func:`enable` is the one
place a run turns it on, and :func:`scoped` the one place a tool that reads a
run's saved factors turns it on for a block; nothing else in jaxinf sets it.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

PRECISIONS = ("float32", "float64")


def statistics_dtype(precision: str) -> np.dtype:
    """The statistics dtype of ``run.precision``: float32 or float64."""
    if precision not in PRECISIONS:
        raise ValueError(f"run.precision: unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    return jnp.dtype(precision)


def working_dtype(*arrays) -> np.dtype:
    """The statistics dtype that arrays (or dtypes, or dtype names) carry: the widest floating dtype among them, at
    least float32 (integer and boolean ones are ignored)."""
    widest = jnp.dtype(jnp.float32)
    for x in arrays:
        d = jnp.dtype(getattr(x, "dtype", x))
        if jnp.issubdtype(d, jnp.floating) and d.itemsize > widest.itemsize:
            widest = d
    return widest


def layers_dtype(layers) -> np.dtype:
    """:func:`working_dtype` of tracked layers' compute dtypes (``LayerSpec.dtype``): a stage's default."""
    return working_dtype(*(spec.dtype for spec in layers.values()))


def enable(precision: str) -> None:
    """Turns on JAX's 64-bit mode for the rest of the process when ``precision`` is float64 (nothing otherwise).

    Called by the run and the planner before anything touches a device: with ``run.precision: float64`` the model
    may be float64 and the statistics are, which JAX refuses (or silently narrows) without it. It stays on after
    the run, as the process's arrays may be float64."""
    statistics_dtype(precision)
    if precision == "float64":
        jax.config.update("jax_enable_x64", True)


@contextlib.contextmanager
def scoped(precision: str):
    """JAX's 64-bit mode on (float64) or off (float32) for the duration of a ``with`` block: what reading or writing
    a run's saved factors in that run's precision needs."""
    statistics_dtype(precision)
    with jax.enable_x64(precision == "float64"):
        yield


# --------------------------------------------------------------------------- matmul precision of the statistics

MATMUL_PRECISIONS = ("default", "high", "highest")
"""``run.matmul_precision``: how many bfloat16 passes an accelerator may spend on a float32 statistic contraction.

``default``: the backend's choice (one bfloat16 pass on a TPU, TF32 on an A100/H100 where XLA allows it);
``high``: three bfloat16 passes (bf16x3, about 16 significant bits) or TF32; ``highest``: full float32 (bf16x6 on
a TPU). On a CPU all three give the same numbers. The table in docs/method.md ("Matmul precision") measures each
against float64 on the CPU by emulating the passes (``scripts/precision_table.py``)."""

MATMUL_PRECISION = "highest"
"""The default of ``run.matmul_precision``, chosen by that table: a single bfloat16 pass or TF32 costs the
statistics 2-3 significant digits, which the inverse amplifies where ``Lambda + lambda`` is small."""


def matmul_precision(name: str | None = None) -> jax.lax.Precision:
    """The ``lax.Precision`` that every statistic contraction of the engine passes as ``precision=``: ``name`` (one of
    :data:`MATMUL_PRECISIONS`; None: :data:`MATMUL_PRECISION`).

    This is the one mechanism by which a statistic states its precision: the covariance sums, the eigenbasis
    rotations, Lambda, query preconditioning and truncation, the scores and self-influence each call it with the
    ``precision`` argument their stage was given (``run.matmul_precision``) and pass the result to every
    ``einsum``/``matmul``. The model's own forward and backward pass is left at the model's precision (no
    ``precision=``). ``tests/test_matmul_precision.py`` checks every stage's lowered program for it."""
    name = MATMUL_PRECISION if name is None else name
    if isinstance(name, jax.lax.Precision):
        return name
    if name not in MATMUL_PRECISIONS:
        raise ValueError(
            f"run.matmul_precision: unknown precision {name!r} (choose from {', '.join(MATMUL_PRECISIONS)})"
        )
    return jax.lax.Precision[name.upper()]
