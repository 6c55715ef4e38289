"""Run configuration: frozen dataclasses read from YAML, with ``section.key=value`` overrides.

Every key has a type, a default and a docstring-like help text, and names the
first pipeline stage whose results it changes (``affects``). A resumed run
compares its config with the one it started with: a key that changes the
results of a stage that has already saved progress is refused, listing the
differing keys; keys that affect no result (``run.out``, ``mesh.*``, save
intervals) may change freely, e.g. to resume on a slice of another size.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from jaxinf.errors import UserError

STAGES = ("covariance", "eigen", "lambda", "queries", "scores", "exports", "analysis", "index")
"""Every stage of a run, each after the stages it depends on. The index (``index.k``) comes last: it depends on
the documents and the eigenbasis only, so a new index over a finished run recomputes nothing else; a run with
``scores.mode: index`` builds it before its scores (:mod:`jaxinf.pipeline`)."""


class ConfigError(UserError):
    """A config file, key or value that cannot be used; the message names the file and the key."""


def key(default, help: str, affects: str | None, choices: tuple | None = None):
    """A config field: its default, what it means, and the first stage whose results it changes."""
    assert affects is None or affects in STAGES, affects
    factory = (lambda: list(default)) if isinstance(default, list) else None
    kw = dict(default_factory=factory) if factory else dict(default=default)
    return dataclasses.field(metadata=dict(help=help, affects=affects, choices=choices), **kw)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    checkpoint: str | None = key(
        None, "Hugging Face directory: config.json, *.safetensors, tokenizer.json", "covariance"
    )
    dtype: str = key("float32", "compute and parameter dtype", "covariance", ("float32", "bfloat16", "float64"))
    scan_layers: bool = key(True, "stack the decoder layers under lax.scan (faster compiles for deep models)", None)
    remat: bool = key(
        False,
        "recompute each layer's activations in the backward pass (with scan_layers): less memory "
        "per document, one more forward pass",
        None,
    )


@dataclasses.dataclass(frozen=True)
class DataConfig:
    documents: str | None = key(
        None,
        "documents: a file, directory or glob of JSONL (.gz, .zst), Parquet or Arrow "
        "shards, a datasets save_to_disk directory, a TFDS directory (jaxinf prepare) or "
        "tfds:NAME",
        "covariance",
    )
    text_field: str = key("text", "documents: the field (column, feature) holding the text", "covariance")
    id_field: str = key("id", "documents: the field holding the id (absent: the line or row)", "exports")
    source_field: str = key(
        "source",
        'documents: the field holding the source (absent: the shard\'s name, or "unknown" for a single file)',
        "exports",
    )
    dedupe: str = key(
        "none",
        "documents: exact skips a document whose text equals an earlier one's (counted, listed in "
        "the log); not for TFDS datasets",
        "covariance",
        ("none", "exact"),
    )
    queries: str | None = key(None, "queries: JSONL, or the Ruis et al. release JSON", "queries")
    max_length: int = key(512, "tokens per document (longer documents are truncated or split)", "covariance")
    long_documents: str = key(
        "truncate", "what to do with documents longer than max_length", "covariance", ("truncate", "split")
    )
    batch_size: int = key(8, "documents per batch (per process)", "covariance")
    query_batch_size: int = key(8, "queries per batch when computing query gradients", None)


@dataclasses.dataclass(frozen=True)
class FactorsConfig:
    strategy: str = key(
        "ekfac", "curvature: identity | diagonal | kfac | ekfac", "lambda", ("identity", "diagonal", "kfac", "ekfac")
    )
    fisher: str = key(
        "sampled",
        "labels for the curvature: sampled from the model (true Fisher) or the data's",
        "covariance",
        ("sampled", "empirical"),
    )
    track: str | list[str] = key("mlp", "tracked layers: mlp | all | a list of name patterns", "covariance")
    max_documents: int | None = key(None, "documents used to fit the curvature (null: all)", "covariance")
    seed: int = key(0, "PRNG seed of the sampled labels", "covariance")
    from_run: str | None = key(
        None, "reuse the fitted factors of another run directory (YAML key: factors.from)", "covariance"
    )
    save_every: int = key(100, "batches between checkpoints of the covariance and Lambda sums", None)


@dataclasses.dataclass(frozen=True)
class ScoresConfig:
    damping: float | None = key(
        None, "damping lambda, a finite number >= 0 (null: 0.1 x mean(Lambda) per layer)", "queries"
    )
    query_rank: int | None = key(None, "rank of the preconditioned query gradients (null: full)", "queries")
    query_svd: str = key(
        "randomized",
        "how the rank-r truncation finds the top singular vectors: randomized (a "
        "range finder with a fixed key, then a small SVD) | full (the SVD of each whole matrix)",
        "queries",
        ("randomized", "full"),
    )
    normalize: str = key(
        "none",
        "none (raw, kronfluence's convention) | per_nat (divided by the completion NLL)",
        "exports",
        ("none", "per_nat"),
    )
    self_influence: bool = key(False, "also compute each document's self-influence (self_influence.npy)", "scores")
    topk: int = key(20, "top and bottom documents per query in topk.jsonl and the report", "exports")
    save_every: int = key(100, "batches between saved score chunks", None)
    mode: str = key(
        "exact",
        "exact (a scoring pass over every document) | index (scores from the EK-FAC index, "
        "index.k, or factors.from's index; the top and bottom scores.topk certified exact)",
        "scores",
        ("exact", "index"),
    )


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    k: int | str | None = key(
        None,
        "EK-FAC index: eigen-directions kept per factor and layer (the block "
        "(Q_S^T G Q_A)[:k, :k] of the largest eigenvalues), full (every cell: exact), or "
        "null (no index)",
        "index",
    )
    dtype: str = key("float32", "EK-FAC index: storage dtype of the kept cells", "index", ("float32", "float16"))
    save_every: int = key(100, "EK-FAC index: batches between flushes of the index rows", None)
    from_run: str | None = key(
        None,
        "EK-FAC index: with scores.mode: index, read the index of this run directory "
        "(YAML key: index.from; null: this run's, or factors.from's; jaxinf query sets it)",
        "scores",
    )


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = key(1, "devices along the data axis (documents)", None)
    model: int = key(1, "devices along the model axis (parameters, factors, query gradients)", None)
    coordinator: str | None = key(
        None,
        "multi-process runs: HOST:PORT of process 0's coordinator, or auto (TPU pods, "
        "SLURM, Open MPI); null: one process",
        None,
    )
    num_processes: int | None = key(
        None, "multi-process runs: number of processes (with mesh.coordinator=HOST:PORT)", None
    )
    process_id: int | None = key(
        None, "multi-process runs: this process's index, 0 .. num_processes-1 (with mesh.coordinator=HOST:PORT)", None
    )


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    device_memory_gib: float | None = key(
        None, "jaxinf plan: memory per device in GiB; a step that needs more fails the plan (null: no check)", None
    )
    device_flops: float = key(1e14, "jaxinf plan: sustained FLOP/s per device for the time estimate", None)
    hosts: int = key(1, "jaxinf plan: processes of the planned slice (each feeds its own documents)", None)
    documents: int = key(5_000_000, "jaxinf plan: documents to score in the time estimate", None)
    tokens_per_document: int | None = key(
        None, "jaxinf plan: mean tokens per document in the time estimate (null: data.max_length)", None
    )
    queries: int = key(80, "jaxinf plan: number of queries (the query file is not read)", None)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    out: str = key("runs/default", "the run directory", None)
    precision: str = key("float32", "working precision of the engine", "covariance", ("float32", "float64"))
    matmul_precision: str = key(
        "highest",
        "matmul precision of every statistic contraction on an accelerator: highest "
        "(float32), high (bf16x3 or TF32), default (one bf16 pass); the model keeps its own; "
        "docs/method.md, Matmul precision",
        "covariance",
        ("default", "high", "highest"),
    )


@dataclasses.dataclass(frozen=True)
class ValidateConfig:
    subsets: int = key(32, "jaxinf validate: random subsets of the documents, each retrained (LDS)", None)
    fraction: float = key(0.5, "jaxinf validate: share of the documents in each subset, in (0, 1)", None)
    seeds: int = key(
        5,
        "jaxinf validate: retrainings per subset (seeds of the minibatch order), averaged (5, as "
        "kronfluence's LDS protocol)",
        None,
    )
    seed: int = key(0, "jaxinf validate: seed of the subsets and of the PBRF's document sample", None)
    strategies: list[str] = key(
        ["identity", "diagonal", "kfac", "ekfac"],
        "jaxinf validate: strategies compared (also ekfac-index: EK-FAC through the index at index.k)",
        None,
    )
    index_ks: list[int | str] = key(
        [],
        "jaxinf validate: sizes (index.k values) of the index fidelity table against "
        "exact EK-FAC, beside equal-byte baselines (index.k is added when ekfac-index "
        "is compared)",
        None,
    )
    dampings: list[float | None] = key(
        [None, 0.001],
        "jaxinf validate: dampings compared (null: the heuristic); the first is the one of lds, recall and pbrf",
        None,
    )
    start: str = key(
        "scratch",
        "jaxinf validate (YAML key: validate.from): the training being explained starts from "
        "the model's initialization (scratch) or its checkpoint's weights (checkpoint)",
        None,
        ("scratch", "checkpoint"),
    )
    steps: int = key(
        500,
        "jaxinf validate: optimizer steps of the full model (and of each retraining with validate.subset_steps: fixed)",
        None,
    )
    subset_steps: str = key(
        "fixed",
        "jaxinf validate: optimizer steps of each retraining: fixed (validate.steps, as "
        "the full model) or epochs (as many passes over its subset as the full model makes over "
        "all documents: steps scale with validate.fraction)",
        None,
        ("fixed", "epochs"),
    )
    subset_init: str = key(
        "shared",
        "jaxinf validate: where each retraining starts: shared (the full model's starting "
        "parameters) or fresh (its own initialization, seed 1000 (subset + 1) + seed; needs "
        "validate.from: scratch)",
        None,
        ("shared", "fresh"),
    )
    bootstrap: int = key(
        1000, "jaxinf validate: resamples of the subsets (with replacement) behind each LDS's 95% interval", None
    )
    learning_rate: float = key(0.003, "jaxinf validate: AdamW learning rate (after a linear warm-up of steps/10)", None)
    batch_size: int = key(16, "jaxinf validate: documents per minibatch", None)
    group: int = key(16, "jaxinf validate: retrainings run together as one vmap-ed program", None)
    recall_k: list[int] = key([1, 5, 10], "jaxinf validate: k of Recall@k (queries with a supports field)", None)
    pbrf: bool = key(
        False,
        "jaxinf validate: also compute the proximal Bregman response of a sample of documents "
        "(small models: seconds to minutes per document on a CPU)",
        None,
    )
    pbrf_documents: int = key(32, "jaxinf validate: documents sampled for the PBRF", None)
    pbrf_epsilon: float | None = key(None, "jaxinf validate: up-weighting of a document in the PBRF (null: 1/N)", None)
    pbrf_iterations: int = key(
        2000,
        "jaxinf validate: most L-BFGS iterations of each PBRF optimization (it stops "
        "earlier, at validate.pbrf_tolerance)",
        None,
    )
    pbrf_tolerance: float = key(
        1e-3,
        "jaxinf validate: a PBRF optimization stops (converged) when its gradient norm "
        "is at most this share of its start",
        None,
    )
    builtin_documents: int = key(128, "jaxinf validate without model.checkpoint: documents of the built-in world", None)


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    factors: FactorsConfig = dataclasses.field(default_factory=FactorsConfig)
    scores: ScoresConfig = dataclasses.field(default_factory=ScoresConfig)
    index: IndexConfig = dataclasses.field(default_factory=IndexConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    plan: PlanConfig = dataclasses.field(default_factory=PlanConfig)
    validate: ValidateConfig = dataclasses.field(default_factory=ValidateConfig)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
_YAML_NAMES = {
    ("factors", "from"): "from_run",
    ("validate", "from"): "start",
    ("index", "from"): "from_run",
}  # YAML key -> field name, where a keyword is in the way
_FIELD_NAMES = {v: k[1] for k, v in _YAML_NAMES.items()}


def _section_class(name: str):
    return typing.get_type_hints(Config)[name]


def _fields(section: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(_section_class(section))}


def yaml_name(section: str, field: str) -> str:
    return f"{section}.{_FIELD_NAMES.get(field, field)}"


def all_keys() -> list[str]:
    """Every config key, as written in YAML (``section.key``)."""
    return [yaml_name(s, f) for s in SECTIONS for f in _fields(s)]


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


def from_dict(raw: dict, source: str = "config") -> Config:
    """A validated :class:`Config` from nested dicts; errors name ``source`` and the key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    sections = {}
    for section, values in raw.items():
        if section not in SECTIONS:
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
        sections[section] = _section_class(section)(**kwargs)
    config = Config(**sections)
    _check_values(config, source)
    return config


def _check_values(config: Config, source: str) -> None:
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


def to_dict(config: Config) -> dict:
    """The config as nested dicts with YAML key names (``factors.from``)."""
    out = {}
    for section in SECTIONS:
        obj = getattr(config, section)
        out[section] = {_FIELD_NAMES.get(f.name, f.name): getattr(obj, f.name) for f in dataclasses.fields(obj)}
    return out


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
        raise ConfigError(f"command line: {path}: cannot parse value {value!r} ({e.problem})") from None
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


def affects(section: str, field: str) -> str | None:
    return _fields(section)[field].metadata["affects"]


def results_key(config: Config) -> str:
    """A hash of every key that changes some result (keys with ``affects`` set)."""
    relevant = {yaml_name(s, f): v for (s, f), v in _result_keys(config).items()}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _result_keys(config: Config) -> dict[tuple[str, str], Any]:
    out = {}
    for section in SECTIONS:
        obj = getattr(config, section)
        for f in dataclasses.fields(obj):
            if f.metadata["affects"] is not None:
                out[(section, f.name)] = getattr(obj, f.name)
    return out


def changed_keys(old: Config, new: Config) -> list[tuple[str, str]]:
    """Keys that change results and differ between two configs, with the first stage each affects."""
    a, b = _result_keys(old), _result_keys(new)
    # _result_keys holds only the keys that affect some stage
    return [(yaml_name(*k), typing.cast(str, affects(*k))) for k in a if a[k] != b[k]]


def describe() -> str:
    """Every key with its default and meaning: what ``jaxinf run --help-config`` prints."""
    lines = []
    for section in SECTIONS:
        lines.append(f"{section}:")
        for f in dataclasses.fields(_section_class(section)):
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            lines.append(f"  {_FIELD_NAMES.get(f.name, f.name)}: {json.dumps(default)}    # {f.metadata['help']}")
    return "\n".join(lines)
