"""The preconditioning strategies as objects: identity, diagonal, K-FAC and EK-FAC.

Every strategy preconditions a gradient ``G`` (``[d_out, d_in']`` per layer) as

    P(G) = Q_S [ (Q_S^T G Q_A) / (Lambda + lambda) ] Q_A^T        (elementwise division)

with its own basis and eigenvalues:

- ``identity``: no curvature, ``P(G) = G`` (damping is not used);
- ``diagonal``: ``Q_A = Q_S = I``, ``Lambda = sum_n G[n]^2 / N_seq``;
- ``kfac``: the eigenbases of ``A`` and ``S``, ``Lambda[i, j] = e_S[i] e_A[j]``,
  i.e. ``P(G) = (A kron S + lambda I)^-1 vec(G)``;
- ``ekfac``: the eigenbases of ``A`` and ``S`` and the corrected
  ``Lambda = sum_n (Q_S^T G[n] Q_A)^2 / N_seq``.

Each is a frozen dataclass (:class:`Strategy`) that declares what it needs and
how it works, so that the stages, the run, the planner and the kronfluence
interchange ask it instead of testing its name:

- which factors it needs: ``covariance`` (``A`` and ``S``, stage covariance),
  ``eigen`` (their eigendecomposition, stage eigen) and, through
  ``lambda_source``, ``Lambda``;
- how ``Lambda`` is obtained (``lambda_source``): not at all (``none``); fitted by
  stage lambda (``fitted``) in the strategy's basis, the raw basis for diagonal and
  the Kronecker eigenbasis for EK-FAC; or as the eigenvalue products of the
  Kronecker factors (``eigenvalues``, K-FAC);
- how it preconditions (:meth:`Strategy.precondition`) and how it scores a
  document against itself (:meth:`Strategy.self_score`).

This is the division of kronfluence's ``FactorConfig`` (one class per strategy
declaring whether it requires covariance matrices, an eigendecomposition and
Lambda matrices, to fit and to precondition, and how it preconditions a
gradient). :func:`strategy` resolves a name (the config's ``factors.strategy``)
to its object; a new strategy is one more class here and its entry in
:data:`STRATEGIES`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from jaxinf.engine.curvature.correction import kfac_lambda, rotated_gradient
from jaxinf.engine.curvature.eigen import Eigen
from jaxinf.engine.curvature.inverse import block_damping, inverse_eigenvalues
from jaxinf.engine.precision import matmul_precision

Array = jax.Array

LAMBDA_SOURCES = ("none", "fitted", "eigenvalues")
FACTOR_GROUPS = ("covariance", "eigen", "lambda")  # the fitting stages, and kronfluence's groups of files


@dataclasses.dataclass(frozen=True)
class Strategy:
    """A preconditioning strategy: its name, the factors it needs and where its ``Lambda`` comes from.

    ``covariance``: it fits ``A`` and ``S``; ``eigen``: it decomposes them and preconditions in their eigenbasis;
    ``lambda_source``: ``none``, ``fitted`` (stage lambda, in the strategy's basis) or ``eigenvalues``
    (``e_S e_A^T``).
    """

    name: str
    covariance: bool
    eigen: bool
    lambda_source: str

    def __post_init__(self):
        if self.lambda_source not in LAMBDA_SOURCES:
            raise ValueError(
                f"strategy {self.name!r}: unknown lambda_source {self.lambda_source!r} "
                f"(choose from {', '.join(LAMBDA_SOURCES)})"
            )

    @property
    def needs_lambda(self) -> bool:
        """Whether it preconditions with a ``Lambda`` (and so is damped)."""
        return self.lambda_source != "none"

    @property
    def fits_lambda(self) -> bool:
        """Whether stage lambda fits its ``Lambda``."""
        return self.lambda_source == "fitted"

    @property
    def writes(self) -> tuple[str, ...]:
        """The factor groups a fit produces (the stages that run): covariance, eigen, lambda."""
        return tuple(g for g, on in zip(FACTOR_GROUPS, (self.covariance, self.eigen, self.fits_lambda)) if on)

    @property
    def needs(self) -> tuple[str, ...]:
        """The factor groups preconditioning reads: the eigendecomposition and a fitted ``Lambda``."""
        return tuple(g for g, on in zip(FACTOR_GROUPS[1:], (self.eigen, self.fits_lambda)) if on)

    def lambda_of(
        self, eigen: Eigen | None, fit: Callable[[Eigen | None], Mapping[str, Array]]
    ) -> Mapping[str, Array] | None:
        """This strategy's ``Lambda`` as it obtains it: None; ``fit(basis)`` (stage lambda, ``basis`` its
        eigendecomposition or None for the raw basis); or :func:`~jaxinf.engine.curvature.correction.kfac_lambda`."""
        if self.lambda_source == "none":
            return None
        if self.lambda_source == "eigenvalues":
            assert eigen is not None, f"{self.name}: Lambda from the eigenvalues needs the eigendecomposition"
            return kfac_lambda(eigen)
        return fit(eigen if self.eigen else None)

    def basis(self, factors: Mapping[str, Array]) -> tuple[Array | None, Array | None]:
        """``(Q_A, Q_S)`` of a layer's factors, or ``(None, None)`` for the raw basis (``Q_A = Q_S = I``)."""
        return None, None

    def precondition(self, g: Array, factors: Mapping[str, Array] | None, damp: Array | None, precision=None) -> Array:
        """``P(G) = Q_S [ (Q_S^T G Q_A) / (Lambda + lambda) ] Q_A^T`` of one block's gradients
        ``[*lead, n, d_out, d_in']`` in the strategy's basis (``G / (Lambda + lambda)`` in the raw basis).

        ``factors``: the block's ``Lambda`` (and ``Q_A``, ``Q_S`` in an eigenbasis), each ``[*lead, ...]``;
        ``damp``: ``[*lead]``. The example axis ``n`` broadcasts against them. Formed in ``Lambda``'s dtype, at the
        matmul precision ``precision`` (``run.matmul_precision``).
        """
        assert factors is not None and damp is not None, f"{self.name}: preconditioning needs Lambda and damping"
        dtype = factors["Lambda"].dtype
        inv = jnp.expand_dims(inverse_eigenvalues(factors["Lambda"], damp), -3)
        g = g.astype(dtype)
        Q_A, Q_S = self.basis(factors)
        if Q_A is None or Q_S is None:  # both or neither
            return g * inv
        Q_A = jnp.expand_dims(Q_A.astype(dtype), -3)
        Q_S = jnp.expand_dims(Q_S.astype(dtype), -3)
        mm = lambda x, y: jnp.matmul(x, y, precision=matmul_precision(precision))  # noqa: E731
        rotated = mm(mm(jnp.swapaxes(Q_S, -1, -2), g), Q_A)
        return mm(mm(Q_S, rotated * inv), jnp.swapaxes(Q_A, -1, -2))

    def self_score(
        self,
        a: Array,
        g: Array,
        factors: Mapping[str, Array] | None,
        damping_value: float | None,
        dtype,
        precision=None,
    ) -> Array:
        """One layer's ``<P(G[n]), G[n]>`` per document ``[B]``: ``sum (Q_S^T G[n] Q_A)^2 / (Lambda + lambda)``
        (``sum G[n]^2 / (Lambda + lambda)`` in the raw basis), in ``Lambda``'s dtype, at the matmul precision
        ``precision``.

        ``factors``: the layer's :func:`~jaxinf.engine.curvature.curvature_context`.
        """
        assert factors is not None, f"{self.name}: a self-score needs Lambda"
        Lambda = factors["Lambda"]
        R = rotated_gradient(a, g, *self.basis(factors), Lambda.dtype, precision)
        inv = inverse_eigenvalues(Lambda, block_damping(Lambda, damping_value))
        return jnp.sum(R * R * inv, axis=(-2, -1))


@dataclasses.dataclass(frozen=True)
class Identity(Strategy):
    """No curvature: ``P(G) = G``; nothing is fitted and damping is not used."""

    name: str = "identity"
    covariance: bool = False
    eigen: bool = False
    lambda_source: str = "none"

    def precondition(self, g: Array, factors: Mapping[str, Array] | None, damp: Array | None, precision=None) -> Array:
        """``P(G) = G`` (in ``G``'s own dtype)."""
        return g

    def self_score(
        self,
        a: Array,
        g: Array,
        factors: Mapping[str, Array] | None,
        damping_value: float | None,
        dtype,
        precision=None,
    ) -> Array:
        """One layer's ``<G[n], G[n]> = sum G[n]^2`` per document ``[B]``, in ``dtype`` (at ``precision``)."""
        R = rotated_gradient(a, g, None, None, dtype, precision)
        return jnp.sum(R * R, axis=(-2, -1))


@dataclasses.dataclass(frozen=True)
class Diagonal(Strategy):
    """The raw basis with a fitted ``Lambda = sum_n G[n]^2 / N_seq`` (the diagonal of the Fisher)."""

    name: str = "diagonal"
    covariance: bool = False
    eigen: bool = False
    lambda_source: str = "fitted"


@dataclasses.dataclass(frozen=True)
class KroneckerEigenbasis(Strategy):
    """A strategy that preconditions in the eigenbases of the Kronecker factors ``A`` and ``S``."""

    def basis(self, factors: Mapping[str, Array]) -> tuple[Array, Array]:
        """The layer's ``(Q_A, Q_S)``."""
        return factors["Q_A"], factors["Q_S"]


@dataclasses.dataclass(frozen=True)
class KFAC(KroneckerEigenbasis):
    """K-FAC: ``Lambda[i, j] = e_S[i] e_A[j]``, the eigenvalues of ``A kron S``."""

    name: str = "kfac"
    covariance: bool = True
    eigen: bool = True
    lambda_source: str = "eigenvalues"


@dataclasses.dataclass(frozen=True)
class EKFAC(KroneckerEigenbasis):
    """EK-FAC: ``Lambda = sum_n (Q_S^T G[n] Q_A)^2 / N_seq`` fitted in the Kronecker eigenbasis."""

    name: str = "ekfac"
    covariance: bool = True
    eigen: bool = True
    lambda_source: str = "fitted"


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (Identity(), Diagonal(), KFAC(), EKFAC())}


def strategy(name: str | Strategy) -> Strategy:
    """The strategy called ``name`` (a :class:`Strategy` is returned as it is); an unknown name raises one line
    naming it and the known ones."""
    if isinstance(name, Strategy):
        return name
    found = STRATEGIES.get(name) if isinstance(name, str) else None
    if found is None:
        raise ValueError(f"factors.strategy: unknown strategy {name!r} (choose from {', '.join(STRATEGIES)})")
    return found
