"""Run configuration: frozen dataclasses read from YAML, with ``section.key=value`` overrides.

Every key has a type, a default and a docstring-like help text, and names the
first pipeline stage whose results it changes (``affects``). A resumed run
compares its config with the one it started with: a key that changes the
results of a stage that has already saved progress is refused, listing the
differing keys; keys that affect no result (``run.out``, ``mesh.*``, save
intervals) may change freely, e.g. to resume on a slice of another size.

The package is the keys (:mod:`jaxinf.config.keys`) and the reading of them (:mod:`jaxinf.config.reading`);
everything a caller uses is named here.
"""

from jaxinf.config.keys import (
    SECTIONS,
    STAGES,
    Config,
    ConfigError,
    DataConfig,
    FactorsConfig,
    IndexConfig,
    MeshConfig,
    ModelConfig,
    PlanConfig,
    RunConfig,
    ScoresConfig,
    ValidateConfig,
    affects,
    all_keys,
    changed_keys,
    describe,
    key,
    results_key,
    to_dict,
    yaml_name,
)
from jaxinf.config.reading import (
    CONTENT_KEYS,
    check_values,
    config_arguments,
    from_dict,
    load,
    located,
    parse_override,
    read_yaml,
    with_overrides,
)

__all__ = [
    "CONTENT_KEYS",
    "SECTIONS",
    "STAGES",
    "Config",
    "ConfigError",
    "DataConfig",
    "FactorsConfig",
    "IndexConfig",
    "MeshConfig",
    "ModelConfig",
    "PlanConfig",
    "RunConfig",
    "ScoresConfig",
    "ValidateConfig",
    "affects",
    "all_keys",
    "changed_keys",
    "check_values",
    "config_arguments",
    "describe",
    "from_dict",
    "key",
    "load",
    "located",
    "parse_override",
    "read_yaml",
    "results_key",
    "to_dict",
    "with_overrides",
    "yaml_name",
]
