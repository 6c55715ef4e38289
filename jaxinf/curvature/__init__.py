"""Kronecker-factored, eigenvalue-corrected curvature (EK-FAC), stage by stage.

1. :mod:`~jaxinf.curvature.covariance`: ``A`` and ``S`` (init / update / finalize);
2. :mod:`~jaxinf.curvature.eigen`: ``Q_A, e_A, Q_S, e_S``;
3. :mod:`~jaxinf.curvature.correction`: ``Lambda`` (init / update / finalize);
4. :mod:`~jaxinf.curvature.strategies`: what each strategy (identity, diagonal, kfac, ekfac) needs and how
   it preconditions; :mod:`~jaxinf.curvature.inverse`: damping and ``1 / (Lambda + lambda)``;
   :mod:`~jaxinf.curvature.precondition`: the assembled curvature and ``P(G)``.
"""

from jaxinf.curvature.correction import (
    LAMBDA_AXES,
    LambdaState,
    kfac_lambda,
    lambda_context,
    lambda_finalize,
    lambda_init,
    lambda_statistic,
    lambda_update,
    rotated_gradient,
)
from jaxinf.curvature.covariance import (
    Covariance,
    CovarianceState,
    covariance_finalize,
    covariance_init,
    covariance_statistic,
    covariance_update,
)
from jaxinf.curvature.eigen import Eigen, eigendecompose, stacked_eigh, symmetric_eigh
from jaxinf.curvature.inverse import HEURISTIC_DAMPING_SCALE, block_damping, inverse_eigenvalues
from jaxinf.curvature.precondition import Curvature, assemble, curvature, curvature_context, damping, precondition
from jaxinf.curvature.strategies import STRATEGIES, Strategy, strategy

__all__ = [
    "HEURISTIC_DAMPING_SCALE",
    "STRATEGIES",
    "Covariance",
    "CovarianceState",
    "Curvature",
    "Eigen",
    "LAMBDA_AXES",
    "LambdaState",
    "Strategy",
    "assemble",
    "covariance_finalize",
    "covariance_init",
    "covariance_statistic",
    "covariance_update",
    "block_damping",
    "curvature",
    "curvature_context",
    "damping",
    "eigendecompose",
    "inverse_eigenvalues",
    "kfac_lambda",
    "lambda_context",
    "lambda_finalize",
    "lambda_init",
    "lambda_statistic",
    "lambda_update",
    "precondition",
    "rotated_gradient",
    "stacked_eigh",
    "strategy",
    "symmetric_eigh",
]
