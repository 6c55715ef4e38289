"""The method: statistics formed inside the backward pass (``capture``), the loss of each task (``tasks``), the
curvature formulas (``curvature/``), scoring and the index (``scoring``, ``indexing``), the stages and their
compiled programs (``stages``, ``programs``), the distributed eigendecomposition (``distributed``) and the
generic per-batch loop (``loop``). Imports only :mod:`jaxinf.sharding` and the base modules: no config files,
run directories or checkpoints (docs/architecture.md)."""
