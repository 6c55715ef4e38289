"""The run configuration's keys: one frozen dataclass per section, each field with its type, default, help text
and the first stage whose results it changes (:func:`key`), and what follows from them alone (the YAML names,
the results key, the keys two configs differ in, ``--help-config``). Reading them from files and the command line
is :mod:`jaxinf.config.reading`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from typing import Any

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
        "EK-FAC index: k x k cells of Q_S^T G Q_A kept per layer (those of the largest "
        "K-FAC eigenvalues e_S e_A), full (every cell: exact), or null (no index)",
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
    fsdp: bool = key(
        False,
        "parameters and the stored query gradients split over the data axis too (FSDP / ZeRO-3), each layer "
        "gathered as the layer loop reaches it: 1/(data x model) of them per device instead of 1/model, for models "
        "whose parameters do not fit",
        None,
    )
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


def to_dict(config: Config) -> dict:
    """The config as nested dicts with YAML key names (``factors.from``)."""
    out = {}
    for section in SECTIONS:
        obj = getattr(config, section)
        out[section] = {_FIELD_NAMES.get(f.name, f.name): getattr(obj, f.name) for f in dataclasses.fields(obj)}
    return out


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
