"""``jaxinf validate``: do the scores predict retraining (LDS), find the documents that carry a fact (recall), and
match the response they approximate (PBRF)?

- :mod:`~jaxinf.validate.world`: the model, documents and queries (the built-in world or a config's);
- :mod:`~jaxinf.validate.retrain`: random subsets and the retrainings on them (``vmap``-ed, resumable);
- :mod:`~jaxinf.validate.lds`: the linear datamodeling score;
- :mod:`~jaxinf.validate.recall`: Recall@k and MRR of the supporting documents;
- :mod:`~jaxinf.validate.pbrf`: the proximal Bregman response function, by optimization;
- :mod:`~jaxinf.validate.driver`: all of it end to end, ``validation.json``;
- :mod:`~jaxinf.validate.report`: ``report/index.html``.

docs/validation.md describes the method and the measured numbers.
"""
