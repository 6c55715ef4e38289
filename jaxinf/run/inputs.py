"""What a run reads, once: model, tokenizer, tracked layers, documents with their batch plans, and queries.

Missing inputs are refused before anything is created (:func:`check_inputs`); the documents' token
counts are counted once per run and kept in the run directory (:func:`document_lengths`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf import config as cfg
from jaxinf.atomic import load_npy, save_npy, write_json
from jaxinf.engine import capture
from jaxinf.errors import UserError, missing
from jaxinf.run import preflight, rundir
from jaxinf.run.executor import DeviceExecutor, Executor
from jaxinf.run.store import RunStore

if TYPE_CHECKING:
    from jaxinf.data.batching import BatchPlan
    from jaxinf.data.documents import DocumentSource
    from jaxinf.data.queries import Query
    from jaxinf.data.tokenize import TextEncoder
    from jaxinf.engine.tasks import Task
    from jaxinf.models.lm import LM

log = logging.getLogger("jaxinf")


class InputError(UserError):
    """A missing or unusable input named by the config (file, directory, key)."""


def tracked_layers(lm, track) -> dict[str, capture.LayerSpec]:
    """The layers of ``lm`` (possibly abstract) that ``factors.track`` selects."""
    task = lm.task()
    dummy = {"tokens": jnp.zeros((1, 8), jnp.int32), "mask": jnp.ones((1, 8)), "weights": jnp.ones((1, 8))}
    return capture.select_layers(
        capture.find_layers(lambda p, b, pr: task.train_loss(p, b, pr, None), lm.params, dummy), track
    )


@dataclasses.dataclass
class Inputs:
    """What a run reads once: model, task, tracked layers, tokenizer, documents, queries and their plans."""

    lm: LM
    task: Task
    layers: dict[str, capture.LayerSpec]
    encoder: TextEncoder
    documents: DocumentSource  # the corpus scored (one column of the scores per document)
    lengths: np.ndarray  # tokens per document, before truncation or splitting
    plan: BatchPlan  # how the scored documents are grouped into batches
    fit_plan: BatchPlan  # the same for the documents the curvature is fitted on
    fit_documents: DocumentSource | Subset  # the first factors.max_documents documents (all of them without it)
    queries: list[Query]

    def batches(self, plan, source, process_index: int):
        """This process's batches of ``source`` under ``plan`` (:class:`jaxinf.data.batching.DocumentBatches`)."""
        from jaxinf.data.batching import DocumentBatches

        return DocumentBatches(source, self.encoder, plan, process_index=process_index)

    def subset_batches(self, config: cfg.Config, wanted: list[int], executor: Executor):
        """``(Subset, this process's batches of it)`` for the documents ``wanted`` alone, batched as the corpus is
        (a pass over a few documents: certifying the index's tails, the breakdowns of the top documents)."""
        from jaxinf.data.batching import make_batch_plan

        subset = Subset(self.documents, wanted)
        plan = make_batch_plan(
            self.lengths[wanted],
            batch_size=config.data.batch_size,
            max_length=config.data.max_length,
            long_documents=config.data.long_documents,
            buckets=buckets(config.data.max_length),
            process_count=executor.groups[1],
        )
        return subset, self.batches(plan, subset, executor.groups[0])


def check_inputs(config: cfg.Config) -> None:
    """One-line errors for missing inputs, before anything is created."""
    for key, value, kind in (
        ("model.checkpoint", config.model.checkpoint, "dir"),
        ("data.documents", config.data.documents, "any"),
        ("data.queries", config.data.queries, "file"),
    ):
        if value is None:
            raise InputError(f"{key}: not set (give it in the config or as {key}=PATH)")
        p = Path(value)
        if value.startswith("tfds:") or (kind == "any" and any(c in value for c in "*?[")):
            continue  # a TFDS name or a glob of shards: open_documents names what is missing
        if kind == "dir" and not p.is_dir():
            raise InputError(
                f"{key}: {value}: " + ("is a file, not a directory" if p.exists() else missing(p, "no such directory"))
            )
        if kind == "file" and not p.is_file():
            raise InputError(
                f"{key}: {value}: "
                + (
                    "is a directory, not a file"
                    if p.is_dir()
                    else "is not a regular file"
                    if p.exists()
                    else missing(p, "no such file")
                )
            )
        if kind == "any" and not p.exists():
            raise InputError(f"{key}: {value}: {missing(p, 'no such file or directory')}")
    if (
        config.factors.from_run is not None
        and config.run.out is not None
        and os.path.realpath(config.factors.from_run) == os.path.realpath(config.run.out)
    ):
        raise InputError(
            f"factors.from: {config.factors.from_run} is run.out itself (a run reuses its own curvature "
            "without factors.from; to start over keeping it, use another run.out with factors.from)"
        )
    documents = config.data.documents
    if (
        config.run.out is not None and documents is not None and Path(documents).is_dir()
    ):  # its files are listed (recursively) as shards
        out, corpus = Path(os.path.realpath(config.run.out)), Path(os.path.realpath(documents))
        if out == corpus or corpus in out.parents:
            raise InputError(
                f"{config.run.out}: is inside data.documents ({documents}), whose every file is read as a "
                f"document (the run's own files would be read as shards); choose a {rundir.output_key()} outside it"
            )
    for key, other in (("factors.from", config.factors.from_run), ("index.from", config.index.from_run)):
        if other is None:
            continue
        rundir.refuse_inside_run(Path(other), key)
        if not rundir.is_run(Path(other)):  # index.from was "X/state/index: no index here"
            raise InputError(f"{key}: {other}: not a jaxinf run directory ({rundir.why_not_run(Path(other))})")
    if config.index.from_run is not None and config.scores.mode != "index":  # here, not in the config's checks: a
        raise InputError(  # run recorded with it (it was ignored) is still read, queried and resumed
            f"index.from: {config.index.from_run}: read only with scores.mode: index, got scores.mode: "
            f"{config.scores.mode} (a pass over every document, the index never read); set scores.mode: index, "
            "or leave index.from out"
        )


def document_lengths(store: RunStore | None, documents, encoder, limit: int | None = None) -> np.ndarray:
    """Token counts of every document, counted once per corpus and tokenizer: kept in the run's ``state/plan/``
    and in the shared cache (:func:`token_count_cache`), both keyed by the documents' file and content, the
    tokenizer and the prefix limit, so a second run, another ``run.out`` or ``jaxinf plan --corpus`` on the same
    corpus does not tokenize it again.

    ``limit``: ``data.max_length`` when documents are truncated; a very long document is then counted in a bounded
    prefix (:meth:`jaxinf.data.tokenize.TextEncoder.encode_documents`). ``store`` None: the shared cache alone."""
    from jaxinf.data.batching import document_lengths as count
    from jaxinf.engine.progress import Progress

    key: dict = {"size": len(documents), "tokenizer": _text_hash(encoder.tokenizer.to_str())}
    if hasattr(documents, "content_digest"):  # by content (an edit within the same second and size changes it; the
        key["content"] = documents.content_digest()  # same documents moved or copied are the same counts)
    else:
        key["documents"] = _file_key(getattr(documents, "name", ""))
    if getattr(documents, "field_names", None) not in (None, ("id", "text", "source")):
        key["fields"] = list(documents.field_names)
    if limit is not None:
        key["prefix_limit"] = int(limit)
    places = (
        []
        if store is None
        else [(store.path("state", "plan", "lengths.json"), store.path("state", "plan", "lengths.npy"), False)]
    )
    shared = token_count_cache()
    if shared is not None:
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        places.append((shared / f"{name}.json", shared / f"{name}.npy", True))
    kept = [_read_counts(meta, path, key) for meta, path, _ in places]
    lengths = next((x for x in kept if x is not None), None)
    if lengths is None:
        progress = Progress("token counts", len(documents), unit="documents", interval=30.0)
        lengths = count(documents, encoder, limit=limit, progress=progress.at)
        progress.close()
    else:
        where = next(path for (_, path, _), x in zip(places, kept) if x is not None)
        log.info("token counts: %d documents, %d tokens, counted before (%s)", len(lengths), int(lengths.sum()), where)
    if jax.process_index() == 0:
        for (meta, path, is_shared), found in zip(places, kept):
            if found is not None:
                continue
            try:
                save_npy(path, lengths)
                write_json(meta, {**key, "counts_sha256": _counts_digest(lengths)})
            except OSError as e:
                if not is_shared:
                    raise  # the run directory's copy: a refused write is the run's failure
                log.info("token counts: not kept in the shared cache %s (%s)", shared, e)
    return lengths


TOKEN_COUNT_CACHE = "JAXINF_TOKEN_COUNTS"
"""The environment variable naming the shared token-count cache's directory (empty: no shared cache)."""


def token_count_cache() -> Path | None:
    """The shared token-count cache: ``$JAXINF_TOKEN_COUNTS`` (empty: off), else ``~/.cache/jaxinf/token-counts``
    (beside the compilation cache, :func:`jaxinf.cli.enable_compilation_cache`)."""
    where = os.environ.get(TOKEN_COUNT_CACHE)
    if where is None:
        return Path.home() / ".cache" / "jaxinf" / "token-counts"
    return Path(where) if where else None


def _counts_digest(lengths: np.ndarray) -> str:
    return hashlib.sha256(
        f"{lengths.dtype}{lengths.shape}".encode() + np.ascontiguousarray(lengths).tobytes()
    ).hexdigest()


def _read_counts(meta: Path, path: Path, key: dict) -> np.ndarray | None:
    """The counts kept at ``path`` if ``meta`` holds ``key`` and their checksum (anything else: None, count again).
    Without the checksum, counts edited or damaged into another valid ``.npy`` of the same size were trusted, and
    every later run on the corpus stopped at its first batch ("has 41 tokens but the plan counted 2") without naming
    the cache file."""
    try:
        kept = json.loads(meta.read_text())
        if not isinstance(kept, dict) or {k: v for k, v in kept.items() if k != "counts_sha256"} != key:
            return None
        lengths = load_npy(path)
    except (OSError, ValueError, EOFError):
        return None
    whole = lengths.ndim == 1 and len(lengths) == key["size"] and kept.get("counts_sha256") == _counts_digest(lengths)
    return lengths if whole else None


def _file_key(name: str) -> list:
    p = Path(name)
    if p.is_file():
        st = p.stat()
        return [str(p.resolve()), st.st_size, int(st.st_mtime)]
    return [name]


def _text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def buckets(max_length: int) -> tuple[int, ...]:
    """Padded batch lengths: multiples of ``max(16, min(64, max_length // 8))`` (see :func:`jaxinf.data.batching.bucket_lengths`).

    Short limits get fine buckets (16, 32, 48, 64 for 64 tokens), long ones at most about ten shapes.
    """
    from jaxinf.data.batching import bucket_lengths

    return bucket_lengths(max_length, smallest=max(16, min(64, max_length // 8)))


def load_inputs(
    config: cfg.Config,
    store: RunStore,
    executor: Executor | None = None,
    queries: list[Query] | None = None,
    corpus=None,
) -> Inputs:
    """Model (each parameter placed by the executor as it is read), tokenizer, tracked layers, documents with
    their plans (one slice of the corpus per group of processes on the ``data`` axis), and queries (``queries``:
    those :func:`read_checked_queries` read and checked before the run directory was touched; else read and
    checked here; ``corpus``: ``data.documents`` opened then, by :func:`checked_corpus`; else opened here)."""
    from jaxinf import models
    from jaxinf.data.batching import make_batch_plan
    from jaxinf.data.queries import read_queries
    from jaxinf.data.tokenize import TextEncoder

    t0 = time.perf_counter()
    assert (
        config.model.checkpoint is not None
        and config.data.documents is not None  # set: see check_inputs
        and config.data.queries is not None
    )
    executor = executor or DeviceExecutor()
    lm, tokenizer = models.from_hf(
        config.model.checkpoint,
        dtype=config.model.dtype,
        scan=config.model.scan_layers,
        remat=config.model.remat,
        place=executor.place_param,
    )
    log.info(
        "model: %s, %s parameters (%s), loaded in %.1fs",
        config.model.checkpoint,
        f"{lm.num_params:,}",
        config.model.dtype,
        time.perf_counter() - t0,
    )
    task = lm.task()
    layers = tracked_layers(lm, config.factors.track)
    n_tracked = sum(s.num_params for s in layers.values())
    log.info(
        "tracking %d layers (%s parameters) matching factors.track=%s",
        sum(len(s.layer_names) for s in layers.values()),
        f"{n_tracked:,}",
        config.factors.track,
    )
    preflight.log_query_rank(config.scores.query_rank, layers)
    encoder = TextEncoder(tokenizer)
    documents = corpus if corpus is not None else open_corpus(config)
    log.info("documents: %s", documents.report.summary())
    for dup, kept in getattr(documents, "duplicates", [])[:1000]:
        log.info("duplicate document %r skipped (the same text as %r)", dup, kept)
    lengths = document_lengths(
        store, documents, encoder, config.data.max_length if config.data.long_documents == "truncate" else None
    )
    from jaxinf.models.tokenizer import tokenizer_file

    preflight.check_corpus(
        lengths,
        getattr(documents, "name", config.data.documents),
        config.factors.max_documents,
        str(tokenizer_file(config.model.checkpoint)),
    )
    d = config.data
    plan_args: dict  # make_batch_plan's keywords (ints, a string, a tuple)
    plan_args = dict(
        batch_size=d.batch_size,
        max_length=d.max_length,
        long_documents=d.long_documents,
        process_count=executor.groups[1],
        buckets=buckets(d.max_length),
    )
    plan = make_batch_plan(lengths, **plan_args)
    log.info("documents: %s", plan.report.summary())
    n_fit = len(lengths) if config.factors.max_documents is None else min(config.factors.max_documents, len(lengths))
    fit_documents = documents if n_fit == len(lengths) else Subset(documents, range(n_fit))
    fit_plan = plan if n_fit == len(lengths) else make_batch_plan(lengths[:n_fit], **plan_args)
    if queries is None:
        queries = read_queries(config.data.queries)
        check_queries(queries, encoder, config)
    log.info("queries: %d from %s", len(queries), config.data.queries)
    return Inputs(lm, task, layers, encoder, documents, lengths, plan, fit_plan, fit_documents, queries)


def open_corpus(config: cfg.Config):
    """``data.documents`` opened with the ``data.*`` field names and ``data.dedupe`` (its validating scan)."""
    from jaxinf.data.sources import open_documents

    assert config.data.documents is not None  # see check_inputs
    return open_documents(
        config.data.documents,
        text_field=config.data.text_field,
        id_field=config.data.id_field,
        source_field=config.data.source_field,
        dedupe=config.data.dedupe,
    )


def checked_corpus(queries: list[Query], config: cfg.Config):
    """``data.documents`` opened (:func:`open_corpus`: its validating scan finds a file that is no corpus, bad UTF-8
    or JSON, a missing field, a repeated id, a shard that cannot be read), an empty corpus refused
    (:func:`jaxinf.run.preflight.check_corpus`) and the ``supports`` ids the queries name checked to be ids of its
    documents (:func:`jaxinf.data.queries.support_rows`), before the run directory is touched: an ``--overwrite``
    refused for its corpus keeps the old run where it is. The scan is the one the run needs anyway (the corpus is
    passed on to :func:`load_inputs`); the token counts, a tokenization of every document, are left to the run
    under its lock (a second run refused by the lock would otherwise tokenize the whole corpus for nothing), so a
    corpus whose every document is shorter than 2 tokens is refused after an ``--overwrite`` set the old run aside,
    and puts it back."""
    from jaxinf.data.documents import iter_documents
    from jaxinf.data.queries import support_rows

    corpus = open_corpus(config)
    if not len(corpus):  # named as such, not by the ids that supports names
        preflight.check_corpus(np.zeros(0, np.int64), getattr(corpus, "name", str(config.data.documents)), None)
    if any(q.supports for q in queries):
        support_rows(queries, (d.id for d in iter_documents(corpus)), getattr(corpus, "duplicate_of", None))
    return corpus


def read_checked_queries(config: cfg.Config, vocab_size: int) -> list[Query]:
    """``data.queries`` read, tokenized with the checkpoint's tokenizer and checked (:func:`check_queries`) before
    the run directory is touched: a bad query is refused before an ``--overwrite`` sets the old run aside."""
    from jaxinf import models
    from jaxinf.data.queries import read_queries
    from jaxinf.data.tokenize import TextEncoder

    assert config.model.checkpoint is not None and config.data.queries is not None  # see check_inputs
    queries = read_queries(config.data.queries)
    check_queries(queries, TextEncoder(models.load_tokenizer(config.model.checkpoint, vocab_size)), config)
    return queries


def check_queries(queries, encoder, config: cfg.Config) -> list:
    """Every query tokenized and checked against the settings (a completion with tokens, the query within
    ``data.max_length``, one batch shape) at start-up, before an ``--overwrite`` deletes the old run and before any
    pass: the queries stage would otherwise meet a bad query only after the curvature was fitted. A prompt or
    completion made only of the tokenizer's unknown token (words it does not know: the model sees none of them)
    is one warning line per query. Every command that reads queries checks them here (``jaxinf run``, ``query``,
    ``validate``). Returns their encodings (:func:`jaxinf.data.queries.encode_queries`)."""
    from jaxinf.data.queries import encode_queries, query_batches

    encoded = encode_queries(queries, encoder, max_length=config.data.max_length)
    query_batches(encoded, batch_size=config.data.query_batch_size, max_length=config.data.max_length)
    unk = getattr(getattr(encoder.tokenizer, "model", None), "unk_token", None)
    unk_id = encoder.tokenizer.token_to_id(unk) if isinstance(unk, str) else None
    if unk_id is None:
        return encoded
    for q, e in zip(queries, encoded):
        start = len(encoder.prefix)
        parts = {"prompt": e.ids[start : e.prompt_length], "completion": e.ids[e.prompt_length :]}
        unknown = [part for part, ids in parts.items() if len(ids) and np.all(ids == unk_id)]
        if unknown:
            n = sum(len(parts[part]) for part in unknown)
            log.warning(
                '%s: query "%s": every token of its %s is the tokenizer\'s unknown token %s (%d token%s): '
                "the model sees none of its words",
                q.origin,
                q.id,
                " and ".join(unknown),
                unk,
                n,
                "" if n == 1 else "s",
            )
    return encoded


class Subset:
    """The documents ``indices`` of a source, as a source of their own (index i is ``indices[i]``)."""

    def __init__(self, source, indices: list[int] | range):
        self.source, self.indices = source, list(indices)
        self.name = getattr(source, "name", "documents")

    def __len__(self) -> int:
        return len(self.indices)

    def texts(self, idx):
        return self.source.texts([self.indices[i] for i in idx])

    def documents(self, idx):
        return self.source.documents([self.indices[i] for i in idx])


def non_finite_loss(source, what: str) -> Callable[[int, int, int | None, float], str]:
    """The message of the per-batch loop (:func:`jaxinf.engine.loop.run_batches`) for a document of ``source`` whose
    ``what`` loss is not finite: the file, the document's line and its id."""

    def message(batch: int, row: int, index: int | None, value: float) -> str:
        assert index is not None, "the batches' rows name their documents (run_batches' fields hold index)"
        doc = source.documents([index])[0]
        shard_of = getattr(source, "shard_of", None)  # a corpus of shards: the shard, and the line or row in it
        name = shard_of(index) if shard_of is not None else getattr(source, "name", "documents")
        if value == float("-inf"):  # the scores stage's mark of a finite loss with a score that is not finite
            return f'{name}:{doc.line}: document "{doc.id}": its score against a query is not finite'
        return f'{name}:{doc.line}: document "{doc.id}": {what} loss is not finite ({value})'

    return message


def text_source(documents) -> Callable:
    """Texts by document id, found by one streaming pass over the corpus (JSONL or TFDS alike)."""

    from jaxinf.data.documents import iter_documents

    def texts(ids):
        wanted, found = set(map(str, ids)), {}
        for doc in iter_documents(documents, chunk=4096):
            if len(found) == len(wanted):
                break
            if doc.id in wanted:
                found[doc.id] = doc.text
        return found

    return texts
