"""A run on disk and its orchestration below the pipeline: where arrays live (``executor``), the inputs and their
checks (``inputs``, ``preflight``), the run directory, its lock, checkpoints and fingerprints (``rundir``,
``lock``, ``store``, ``saved``, ``fingerprint``), the index's storage and pass (``index_store``, ``index_run``),
the memory planner (``plan``, ``plan_corpus``, ``chips``), the exports (``exports/``) and failure reports
(``failures``). docs/architecture.md has the layers."""
