"""A run's exports: what ``jaxinf run`` writes for people and for the analysis.

:mod:`.formats` defines every exported file (a writer and a reader each) and imports nothing
of the engine; :mod:`.stage` is the exports stage of ``jaxinf run``, which computes and writes
them. Nothing is imported here, so reading the formats needs no JAX.
"""
