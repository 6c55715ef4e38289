"""kronfluence interoperability: its file formats, factor import/export, and comparison with a jaxinf run.

- :mod:`jaxinf.interop.kronfluence`: kronfluence's factor and score files (safetensors
  keyed by module name, arguments as JSON), read and written without torch;
- :mod:`jaxinf.interop.transfer`: kronfluence factors into a run directory
  (``jaxinf kronfluence import``) and a run's factors in kronfluence's layout
  (``jaxinf kronfluence export``);
- :mod:`jaxinf.interop.compare`: ``jaxinf compare``, per stage, layer and query;
- kronfluence run on the same model, documents, queries and settings as a jaxinf
  config is ``tests/kronfluence_reference.py`` (it needs torch, transformers and
  kronfluence, so it is not shipped in the package).

Module names map one to one: jaxinf's per-layer names are the Hugging Face module
names kronfluence sees (``model.layers.3.mlp.up_proj``); a scanned block
``model.layers.*.mlp.up_proj`` holds one entry per layer along its leading axis.
"""
