"""The paper's analyses over a run's exported results, and the report (``jaxinf analyze RUN_DIR``).

Reads only ``scores.npy``, ``queries.jsonl``, ``documents.jsonl`` and the optional exports
(formats in :mod:`jaxinf.run.exports.formats`); never the engine. One module per analysis:
correlations, concentration, powerlaw, sources, answers, layers; :mod:`.driver` drives them
in two streaming passes, :mod:`.report` writes the report, :mod:`.release` converts the
released data of Ruis et al. (2024) into a run directory; :mod:`.breakdowns` reads and
summarises the optional per-layer and per-token exports.
"""

from jaxinf.analysis.driver import Options, analyze
from jaxinf.run.exports.formats import AnalysisError

__all__ = ["AnalysisError", "Options", "analyze"]
