"""Kronecker-factored, eigenvalue-corrected curvature (EK-FAC), stage by stage.

1. :mod:`~jaxinf.engine.curvature.covariance`: ``A`` and ``S`` (init / update / finalize);
2. :mod:`~jaxinf.engine.curvature.eigen`: ``Q_A, e_A, Q_S, e_S``;
3. :mod:`~jaxinf.engine.curvature.correction`: ``Lambda`` (init / update / finalize);
4. :mod:`~jaxinf.engine.curvature.strategies`: what each strategy (identity, diagonal, kfac, ekfac) needs and how
   it preconditions; :mod:`~jaxinf.engine.curvature.inverse`: damping and ``1 / (Lambda + lambda)``;
   :mod:`~jaxinf.engine.curvature.precondition`: the assembled curvature and ``P(G)``.
"""

from jaxinf.engine.curvature.correction import (
    LAMBDA_AXES,
    LambdaState,
    kfac_lambda,
    lambda_context,
    lambda_finalize,
    lambda_init,
    lambda_statistic,
    lambda_sums,
    lambda_update,
    rotated_gradient,
)
from jaxinf.engine.curvature.covariance import (
    Covariance,
    CovarianceState,
    covariance_finalize,
    covariance_init,
    covariance_statistic,
    covariance_update,
)
from jaxinf.engine.curvature.eigen import Eigen, eigendecompose, stacked_eigh, symmetric_eigh
from jaxinf.engine.curvature.inverse import HEURISTIC_DAMPING_SCALE, block_damping, inverse_eigenvalues
from jaxinf.engine.curvature.precondition import (
    Curvature,
    assemble,
    curvature,
    curvature_context,
    damping,
    precondition,
)
from jaxinf.engine.curvature.strategies import STRATEGIES, Strategy, strategy

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
    "lambda_sums",
    "lambda_update",
    "precondition",
    "rotated_gradient",
    "stacked_eigh",
    "strategy",
    "symmetric_eigh",
]
