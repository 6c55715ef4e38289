"""Kronecker-factored, eigenvalue-corrected curvature (EK-FAC), stage by stage.

1. :mod:`~jaxinf.curvature.covariance`: ``A`` and ``S`` (init / update / finalize);
2. :mod:`~jaxinf.curvature.eigen`: ``Q_A, e_A, Q_S, e_S``;
3. :mod:`~jaxinf.curvature.correction`: ``Lambda`` (init / update / finalize);
4. :mod:`~jaxinf.curvature.precondition`: strategies, damping and ``P(G)``.
"""

from jaxinf.curvature.correction import (
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
from jaxinf.curvature.precondition import (
    STRATEGIES,
    Curvature,
    block_damping,
    curvature,
    curvature_context,
    damping,
    inverse_eigenvalues,
    precondition,
    precondition_block,
)

__all__ = [
    "STRATEGIES",
    "Covariance",
    "CovarianceState",
    "Curvature",
    "Eigen",
    "LambdaState",
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
    "precondition_block",
    "rotated_gradient",
    "stacked_eigh",
    "symmetric_eigh",
]
