"""Reading a run configuration: YAML files and ``section.key=value`` overrides into a checked :class:`Config`.

Each value is coerced to its key's type (:func:`from_dict`), checked against the other keys it constrains
(:func:`check_values`), and every error is a :class:`ConfigError` of one line naming the file (and line) or the
command line, and the key.
"""

from __future__ import annotations

import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from jaxinf.config.keys import (
    _FIELD_NAMES,
    _YAML_NAMES,
    SECTIONS,
    Config,
    ConfigError,
    FactorsConfig,
    _fields,
    _section_class,
    all_keys,
)


def _coerce(value: Any, tp: Any, where: str, choices: tuple | None) -> Any:
    """``value`` checked against the field's type (and choices); ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where, choices)
            except ConfigError:
                pass
        names = " or ".join(_type_name(o) for o in options)
        raise ConfigError(f"{where}: expected {names}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]", None) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        if choices and value not in choices:
            raise ConfigError(f"{where}: expected one of {', '.join(choices)}, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {where}")


def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is list:
        return "a list"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _unknown(where: str, name: str, known: list[str]) -> ConfigError:
    near = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return ConfigError(f"{where}: unknown key {name!r}{hint}")


PATH_KEYS = {
    ("model", "checkpoint"),
    ("data", "documents"),
    ("data", "queries"),
    ("factors", "from_run"),
    ("index", "from_run"),
    ("run", "out"),
}
"""The keys that name a path: a leading ``~`` or ``~user`` is the home directory, as a shell expands it in an
argument but not after ``key=`` (``run.out=~/runs/x`` made a directory called ``~`` in the working directory, which
``rm -rf ~`` then takes for the home directory), nor in a YAML config."""


CONTENT_KEYS = ("model.checkpoint", "data.documents", "data.queries")
"""The path keys whose content a run records (``run.json``'s ``inputs``, :mod:`jaxinf.run.fingerprint`): a resumed
run compares what they hold, not where it is, so the same files moved, copied or named by another path are no
change, and other files under another path are refused there by their content, with the cheapest way on."""


def located(config: Config, cwd: str) -> Config:
    """``config`` with each path key (:data:`PATH_KEYS`) the absolute, resolved path it names from the working
    directory ``cwd`` (a ``tfds:NAME`` as it is), so that two configs naming the same files by other spellings
    (relative and absolute, a trailing slash, ``./``, a symbolic link) compare equal: a run resumed with its model
    or a query's run named by another path was refused as a changed key, and offered ``--overwrite``."""
    import dataclasses

    sections: dict[str, dict[str, str]] = {}
    for section, name in PATH_KEYS:
        value = getattr(getattr(config, section), name)
        if isinstance(value, str) and not value.startswith("tfds:"):
            sections.setdefault(section, {})[name] = os.path.realpath(os.path.join(cwd, value))
    return dataclasses.replace(
        config, **{s: dataclasses.replace(getattr(config, s), **fields) for s, fields in sections.items()}
    )


def from_dict(raw: dict, source: str = "config") -> Config:
    """A validated :class:`Config` from nested dicts; errors name ``source`` and the key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    sections = {}
    for section, values in raw.items():
        if section not in SECTIONS:
            head, _, rest = str(section).partition(".")
            if head in SECTIONS and rest:  # `data.max_length: 8` at the top of a YAML file: a key of a section
                raise ConfigError(
                    f"{source}: unknown key {section!r} (a YAML config nests keys in sections: write it as "
                    f"'{head}:' with '{rest}:' indented under it)"
                )
            raise _unknown(source, str(section), list(SECTIONS))
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: {section}: expected a mapping of keys, got {values!r}")
        fields = _fields(section)
        hints = typing.get_type_hints(_section_class(section))
        kwargs = {}
        for name, value in values.items():
            field = _YAML_NAMES.get((section, name), name)
            if field not in fields or field in _FIELD_NAMES and name == field:
                raise _unknown(source, f"{section}.{name}", all_keys())
            kwargs[field] = _coerce(
                value, hints[field], f"{source}: {section}.{name}", fields[field].metadata["choices"]
            )
            if (section, field) in PATH_KEYS and isinstance(kwargs[field], str) and kwargs[field].startswith("~"):
                kwargs[field] = os.path.expanduser(kwargs[field])
        sections[section] = _section_class(section)(**kwargs)
    config = Config(**sections)
    check_values(config, source)
    return config


MAX_BOOTSTRAP = 10**6  # validate.bootstrap: far more than a 95% interval needs, its draws within memory
FLOAT32_MAX = 3.4028234663852886e38  # the largest float32: validate's rates and tolerances are float32 in training
MAX_TOPK = 2**30  # scores.topk: a top of K + B rows must stay within the int32 indices of lax.top_k


def check_values(config: Config, source: str) -> None:
    positive = [
        ("data", "max_length"),
        ("data", "batch_size"),
        ("data", "query_batch_size"),
        ("factors", "save_every"),
        ("scores", "save_every"),
        ("index", "save_every"),
        ("scores", "topk"),
        ("mesh", "data"),
        ("mesh", "model"),
        ("scores", "query_rank"),
        ("factors", "max_documents"),
        ("mesh", "num_processes"),
        ("plan", "hosts"),
        ("plan", "documents"),
        ("plan", "tokens_per_document"),
        ("plan", "queries"),
        ("validate", "seeds"),
        ("validate", "steps"),
        ("validate", "batch_size"),
        ("validate", "group"),
        ("validate", "pbrf_documents"),
        ("validate", "pbrf_iterations"),
        ("validate", "builtin_documents"),
        ("validate", "bootstrap"),
    ]
    for section, name in positive:
        value = getattr(getattr(config, section), name)
        if value is not None and value < 1:
            raise ConfigError(f"{source}: {section}.{name}: must be at least 1, got {value}")
    for section, name in sorted(PATH_KEYS):  # '' is the working directory to Path: run.out='' wrote a run into it
        value = getattr(getattr(config, section), name)
        if isinstance(value, str) and not value.strip():
            key = f"{section}.{name.replace('from_run', 'from')}"
            raise ConfigError(f"{source}: {key}: an empty string; give a path (or null where the key allows it)")
    if not -(2**63) <= config.factors.seed < 2**63:  # jax.random.key takes a 64-bit integer
        raise ConfigError(
            f"{source}: factors.seed: must be a 64-bit integer (from -2**63 to 2**63 - 1), got {config.factors.seed}"
        )
    if not 0 <= config.validate.seed < 2**32:  # numpy's generators take no negative seed; jax keys derive from it
        raise ConfigError(
            f"{source}: validate.seed: must be an integer from 0 to 2**32 - 1, got {config.validate.seed}"
        )
    if config.validate.bootstrap > MAX_BOOTSTRAP:  # its resampled subsets are drawn at once: 8 x subsets bytes each
        raise ConfigError(
            f"{source}: validate.bootstrap: must be at most {MAX_BOOTSTRAP:,} (resamples of a 95% interval), "
            f"got {config.validate.bootstrap}"
        )
    if config.scores.topk > MAX_TOPK:  # the running top's top_k over K + B rows indexes them with int32
        raise ConfigError(
            f"{source}: scores.topk: must be at most {MAX_TOPK:,} (the documents listed per query), "
            f"got {config.scores.topk}"
        )
    if config.data.max_length < 2:  # one token has no next token: no loss, all-zero S and Lambda, zero scores
        raise ConfigError(
            f"{source}: data.max_length: must be at least 2 (a document needs two tokens for one "
            f"next-token prediction), got {config.data.max_length}"
        )
    if config.mesh.process_id is not None and config.mesh.process_id < 0:
        raise ConfigError(f"{source}: mesh.process_id: must be non-negative, got {config.mesh.process_id}")
    for name in ("device_memory_gib", "device_flops"):
        value = getattr(config.plan, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{source}: plan.{name}: must be a positive finite number, got {value}")
    v = config.validate
    if v.subsets < 2:
        raise ConfigError(
            f"{source}: validate.subsets: must be at least 2 (a rank correlation over subsets), got {v.subsets}"
        )
    if not 0 < v.fraction < 1:
        raise ConfigError(f"{source}: validate.fraction: must be in (0, 1), got {v.fraction}")
    if v.subset_init == "fresh" and v.start == "checkpoint":
        raise ConfigError(
            f"{source}: validate.subset_init: fresh starts each retraining from its own random "
            "initialization, which validate.from: checkpoint (fine-tuning the checkpoint) excludes"
        )
    for name in ("learning_rate", "pbrf_epsilon", "pbrf_tolerance"):
        if getattr(v, name) is not None and not getattr(v, name) > 0:
            raise ConfigError(f"{source}: validate.{name}: must be positive, got {getattr(v, name)}")
        if getattr(v, name) is not None and getattr(v, name) > FLOAT32_MAX:  # inf once the training casts it
            raise ConfigError(
                f"{source}: validate.{name}: must be at most {FLOAT32_MAX:.4g} (a float32 number), got {getattr(v, name)}"
            )
    if not v.strategies or any(
        s not in (*FactorsConfig.__dataclass_fields__["strategy"].metadata["choices"], "ekfac-index")
        for s in v.strategies
    ):
        raise ConfigError(
            f"{source}: validate.strategies: expected a non-empty list of identity, diagonal, kfac, "
            f"ekfac, ekfac-index, got {v.strategies}"
        )
    if "ekfac-index" in v.strategies and config.index.k is None:
        raise ConfigError(f"{source}: validate.strategies: ekfac-index needs index.k (an integer or full)")
    if any(not (k == "full" or isinstance(k, int) and not isinstance(k, bool) and k >= 1) for k in v.index_ks):
        raise ConfigError(
            f"{source}: validate.index_ks: expected a list of positive integers or full, got {v.index_ks}"
        )
    if not v.dampings or any(d is not None and not (math.isfinite(d) and d >= 0) for d in v.dampings):  # as damping
        raise ConfigError(
            f"{source}: validate.dampings: expected a non-empty list of null or finite non-negative numbers, "
            f"got {v.dampings}"
        )
    if not v.recall_k or any(k < 1 for k in v.recall_k):
        raise ConfigError(
            f"{source}: validate.recall_k: expected a non-empty list of positive integers, got {v.recall_k}"
        )
    for name in ("strategies", "dampings", "recall_k", "index_ks"):  # each a row or column of the report, keyed by it
        values = list(getattr(v, name))
        twice = [x for i, x in enumerate(values) if x in values[:i]]
        if twice:
            shown = "null" if twice[0] is None else twice[0]
            raise ConfigError(f"{source}: validate.{name}: {shown} is listed twice, got {values}")
    k = config.index.k
    if isinstance(k, str) and k != "full" or isinstance(k, int) and k < 1:
        raise ConfigError(f"{source}: index.k: expected a positive integer, full or null, got {k!r}")
    if (
        config.scores.mode == "index"
        and k is None
        and config.factors.from_run is None
        and config.index.from_run is None
    ):
        raise ConfigError(
            f"{source}: scores.mode: index needs an index: set index.k (an integer or full), or "
            f"index.from (or factors.from) a run that built one"
        )
    if config.scores.mode == "index" and k is not None and config.index.from_run is not None:
        raise ConfigError(
            f"{source}: index.k: {k} builds this run's index, but scores.mode: index reads that of index.from "
            f"({config.index.from_run}); set one of them (a pass over every document built an index never read)"
        )
    if (k is not None or config.scores.mode == "index") and config.factors.strategy not in ("kfac", "ekfac"):
        raise ConfigError(
            f"{source}: index.k and scores.mode: index need a Kronecker eigenbasis (factors.strategy "
            f"ekfac or kfac), got {config.factors.strategy}"
        )
    if config.scores.mode == "index" and config.scores.self_influence:
        raise ConfigError(
            f"{source}: scores.self_influence needs scores.mode: exact (the index keeps no self-influence)"
        )
    damping = config.scores.damping
    if damping is not None and not (math.isfinite(damping) and damping >= 0):
        raise ConfigError(f"{source}: scores.damping: must be a finite number at least 0 (or null), got {damping}")
    if config.model.dtype == "float64" and config.run.precision != "float64":  # 64-bit jax is run.precision's switch
        raise ConfigError(
            f"{source}: model.dtype: float64 needs run.precision=float64 (64-bit arithmetic), got "
            f"run.precision={config.run.precision}"
        )
    tiny = 2.0**-149 if config.run.precision == "float32" else 5e-324  # the smallest positive (subnormal) number
    if damping is not None and damping > 0 and 1.0 / damping < tiny:
        raise ConfigError(
            f"{source}: scores.damping: {damping:g} has an inverse that underflows "
            f"run.precision={config.run.precision} (every score would be 0); choose one near Lambda's "
            "scale, or null for 0.1 x mean(Lambda)"
        )


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` -> (section, key, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"command line: override {text!r} is not of the form section.key=value")
    path, value = text.split("=", 1)
    if path.count(".") != 1:
        raise ConfigError(f"command line: override key {path!r} is not of the form section.key")
    section, name = path.split(".")
    try:
        parsed = yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError as e:
        why = getattr(e, "problem", None) or getattr(e, "reason", None) or type(e).__name__
        raise ConfigError(f"command line: {path}: cannot parse value {value!r} ({why})") from None
    return section, name, parsed


def config_arguments(first: str | None, rest: list[str]) -> tuple[str | None, list[str]]:
    """A command line's ``CONFIG [section.key=value ...]`` as (path, overrides) for :func:`load`.

    A first argument with ``=`` that is not a file is an override (only overrides: start from the defaults).
    """
    path, overrides = first, list(rest)
    if path is not None and "=" in path and not Path(path).exists():
        overrides = [path] + overrides
        path = None
    return path, overrides


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the last one,
    silently dropping the first: a second ``scores:`` section would drop every key of the first)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            name = self.construct_object(key_node, deep=True)
            if isinstance(name, typing.Hashable) and name in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {name!r}", key_node.start_mark)
            seen.add(name)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> Any:
    """A config file's YAML (None when empty); a missing, unreadable, non-UTF-8 or invalid file, or a key given
    twice in one mapping, is a :class:`ConfigError` naming the file (and the line)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a YAML text file (byte {e.start} is not UTF-8)") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None


def load(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """The config of a YAML file (or the defaults when ``path`` is None) with overrides applied."""
    raw: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        raw = read_yaml(path) or {}
    from_dict(raw, source)  # the file alone must be valid, so its errors name the file
    return with_overrides(raw, overrides, source)


def with_overrides(raw: dict, overrides: typing.Sequence[str], source: str) -> Config:
    """The config of nested dicts ``raw`` (valid on its own, read from ``source``) with ``section.key=value``
    overrides applied."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for text in overrides:
        section, name, value = parse_override(text)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raw[section] = {}
        raw[section][name] = value
    return from_dict(raw, "command line" if overrides else source)
