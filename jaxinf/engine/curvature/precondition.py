"""The curvature a strategy fits, assembled, and ``P(G)`` over every block.

A :class:`Curvature` holds a strategy (:mod:`jaxinf.engine.curvature.strategies`) and
what it preconditions with: the eigenbases ``Q_A``, ``Q_S`` (K-FAC, EK-FAC) and
``Lambda``. :func:`assemble` obtains them from the fitting stages, asking only
for what the strategy needs; every driver (the in-memory loop, the run, a run
reusing another's factors, the planner's shapes) goes through it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax

from jaxinf.engine.curvature import strategies
from jaxinf.engine.curvature.eigen import Eigen
from jaxinf.engine.curvature.inverse import block_damping
from jaxinf.sharding.axes import logical

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Curvature:
    """What preconditioning needs: the strategy, the eigenbases (kfac, ekfac) and ``Lambda``."""

    strategy: strategies.Strategy = dataclasses.field(metadata=dict(static=True))
    Q_A: dict[str, Array] | None = logical("factor", "rows", "cols")
    Q_S: dict[str, Array] | None = logical("factor", "rows", "cols")
    Lambda: dict[str, Array] | None = logical("factor", "rows", "cols")

    def __post_init__(self):
        if not isinstance(self.strategy, strategies.Strategy):
            raise TypeError(
                f"Curvature.strategy: a Strategy (jaxinf.engine.curvature.strategy(name)), got {self.strategy!r}"
            )


def curvature(
    strategy: str | strategies.Strategy, eigen: Eigen | None = None, Lambda: Mapping[str, Array] | None = None
) -> Curvature:
    """Assembles a :class:`Curvature` of ``strategy`` (an object or its name), checking that it has what it needs."""
    s = strategies.strategy(strategy)
    if not s.needs_lambda:
        return Curvature(s, None, None, None)
    if Lambda is None:
        raise ValueError(f"strategy {s.name!r} needs Lambda")
    if not s.eigen:
        return Curvature(s, None, None, dict(Lambda))
    if eigen is None:
        raise ValueError(f"strategy {s.name!r} needs the eigendecomposition")
    return Curvature(s, dict(eigen.Q_A), dict(eigen.Q_S), dict(Lambda))


def assemble(
    strategy: str | strategies.Strategy,
    eigen: Callable[[], Eigen],
    fit_lambda: Callable[[Eigen | None], Mapping[str, Array]],
) -> Curvature:
    """The :class:`Curvature` of ``strategy`` from the fitting stages, each asked for only when the strategy needs it:
    ``eigen()`` the eigendecomposition, ``fit_lambda(basis)`` a fitted ``Lambda`` (:meth:`Strategy.lambda_of`)."""
    s = strategies.strategy(strategy)
    e = eigen() if s.eigen else None
    return curvature(s, e, s.lambda_of(e, fit_lambda))


def damping(curv: Curvature, value: float | None) -> dict[str, Array] | None:
    """:func:`~jaxinf.engine.curvature.inverse.block_damping` of every block (None for the identity strategy)."""
    if curv.Lambda is None:
        return None
    return {k: block_damping(L, value) for k, L in curv.Lambda.items()}


def curvature_context(curv: Curvature) -> dict[str, dict[str, Array]] | None:
    """Per block, the factors a preconditioning step needs (``Lambda``, ``Q_A``, ``Q_S``); None for identity."""
    if curv.Lambda is None:
        return None
    out = {}
    for k, L in curv.Lambda.items():
        out[k] = {"Lambda": L}
        if curv.Q_A is not None and curv.Q_S is not None:  # both or neither (curvature())
            out[k].update(Q_A=curv.Q_A[k], Q_S=curv.Q_S[k])
    return out


def precondition(
    G: Mapping[str, Array], curv: Curvature, damp: Mapping[str, Array] | None, precision=None
) -> dict[str, Array]:
    """The strategy's :meth:`~jaxinf.engine.curvature.strategies.Strategy.precondition` of every block's per-example
    gradients ``[*lead, n, d_out, d_in']``, at the matmul precision ``precision``."""
    context = curvature_context(curv)
    return {
        k: curv.strategy.precondition(
            g, None if context is None else context[k], None if damp is None else damp[k], precision
        )
        for k, g in G.items()
    }
