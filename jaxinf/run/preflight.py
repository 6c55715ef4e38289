"""Checks of config values against the model and the corpus, before the stage they would spoil.

- ``data.max_length`` above the model's ``max_position_embeddings`` is an error
  naming both (before any weight is read);
- a corpus without a document of at least 2 tokens (a document's first token
  is no target, so such documents add nothing to any sum) is an error naming the
  file, before the covariance pass;
- ``scores.query_rank`` at or above a layer's smaller dimension keeps that
  layer's query gradients at full rank (exact); the log says so per layer.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from jaxinf import config as cfg
from jaxinf.errors import UserError

log = logging.getLogger("jaxinf")


class PreflightError(UserError):
    """A config value that cannot work with this model or corpus (the message names both)."""


def check_model_limits(config: cfg.Config, model_config) -> None:
    """``data.max_length`` must fit the model's positions (``max_position_embeddings`` of its config.json, read as
    ``model_config``)."""
    limit = model_config.max_position_embeddings
    if config.data.max_length > limit:
        raise PreflightError(
            f"data.max_length={config.data.max_length} is above the model's "
            f"max_position_embeddings={limit} ({Path(config.model.checkpoint or '') / 'config.json'})"
        )


def check_corpus(lengths: np.ndarray, name: str, max_documents: int | None, tokenizer: str | None = None) -> None:
    """At least one document of at least 2 tokens, among all and among the first ``max_documents`` (the fit).

    ``tokenizer`` (its file) is named too: non-empty documents that it turns into fewer than 2 tokens each are
    the tokenizer's doing."""
    if not (np.asarray(lengths) >= 2).any():
        under = f" with the tokenizer {tokenizer}" if tokenizer and len(lengths) else ""
        raise PreflightError(
            f"no documents with at least 2 tokens in {name}{under} ({len(lengths)} documents kept; stage covariance)"
        )
    if max_documents is not None and not (np.asarray(lengths[:max_documents]) >= 2).any():
        raise PreflightError(
            f"no documents with at least 2 tokens among the first {max_documents} "
            f"(factors.max_documents) of {name}; stage covariance"
        )


def log_query_rank(rank: int | None, layers: dict) -> list[str]:
    """Logs each tracked block whose smaller dimension is at most ``rank`` (kept at full rank); returns their names."""
    if rank is None:
        return []
    full = []
    for name, spec in layers.items():
        smaller = min(spec.d_out, spec.d_in_aug)
        if smaller <= rank:
            full.append(name)
            log.info(
                "scores.query_rank=%d is not below the smaller dimension of %s (%d x %d): full rank for that layer",
                rank,
                name,
                spec.d_out,
                spec.d_in_aug,
            )
    return full


def check_curvature(curv, damping: float | None, fetch=np.asarray, source: str = "the fitted documents") -> None:
    """A degenerate fit, before any query is preconditioned with it (issue 25, case 7).

    - ``Lambda`` all zero in every tracked layer (no document contributed a token: every score would be 0, or with
      the heuristic damping undefined): an error naming ``source``; in some layers only (an expert of a mixture
      that no token was routed to): one warning naming them, since they contribute nothing to any score;
    - a ``scores.damping`` that swamps ``Lambda`` (over 1e6 times its largest entry): one warning, since the
      curvature is then ignored and the scores are those of ``factors.strategy=identity`` divided by the damping (one
      whose inverse underflows, every score 0, is a config error: :func:`jaxinf.config.load`).
    """
    Lambda = getattr(curv, "Lambda", None)
    if not Lambda:
        return
    largest = {k: float(fetch(_abs_max(L))) for k, L in Lambda.items()}
    zero = sorted(k for k, v in largest.items() if v == 0)
    if len(zero) == len(largest):
        raise PreflightError(
            f"Lambda is zero in every tracked layer ({len(zero)} blocks): no token of {source} gave "
            "a non-zero gradient (documents of one token, or a model whose predictions are saturated), "
            "so every score would be 0"
        )
    if zero:
        log.warning(
            "Lambda is zero in %d tracked block(s) (%s): no token reached them, so they add nothing to any score",
            len(zero),
            ", ".join(zero),
        )
    if damping is None or damping == 0:
        return
    top_name, top = max(largest.items(), key=lambda kv: kv[1])
    if damping > 1e6 * top:
        log.warning(
            "scores.damping=%g is %.3g times the largest Lambda (%.3g, layer %s): the curvature is ignored, "
            "the scores are factors.strategy=identity's divided by the damping",
            damping,
            damping / top,
            top,
            top_name,
        )


def _abs_max(x):
    import jax.numpy as jnp

    return jnp.max(jnp.abs(x))
