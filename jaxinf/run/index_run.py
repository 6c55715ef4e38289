"""The EK-FAC index in a run: stage ``index`` (building it, one pass over the documents) and ``scores.mode: index``
(scores from it, the tails certified exact). The math is :mod:`jaxinf.engine.indexing`'s; the files are
:mod:`jaxinf.run.index_store`'s.

Building. The index needs each document's gradient under the *data's* labels, the gradient the scores use. With
``factors.fisher: empirical`` those are the gradients of the Lambda pass; with the true Fisher (the default) the
Lambda pass samples its labels from the model, so its rotated gradients are not the ones a score contracts, and
the index is one more forward and backward pass over the documents. Either way it is independent of the queries,
the damping and the eigenvalue correction, and every later query set is answered without a pass.

Scoring. The prepared queries are rotated into the eigenbasis (:func:`jaxinf.engine.indexing.index_queries`), multiplied
with the stored rows slice by slice, and summed into their documents (a split document has several rows), with a
bound on each score's error. The documents whose interval reaches any query's k-th score, in either tail, are
scored again exactly (one forward and backward pass over those documents only) and their exact scores replace the
index's, so ``topk.jsonl``'s top and bottom ``scores.topk`` are exactly what the scoring pass would give. With
several processes each reads and multiplies only its own slices of the rows, and the processes exchange the
products (:func:`_share`), so every process holds every score, as after the exact scoring pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import time
from pathlib import Path

import jax
import numpy as np

from jaxinf import config as cfg
from jaxinf.engine import indexing, programs
from jaxinf.engine import tails as running_tails
from jaxinf.engine.loop import Kept, run_batches
from jaxinf.run import rundir
from jaxinf.run.index_store import (
    FORMAT,
    PARTS,
    IndexError_,
    IndexReader,
    IndexWriter,
    load_selection,
    manifest_path,
    read_manifest,
    row_bytes,
    rows_per_slice,
    save_selection,
)
from jaxinf.run.inputs import Inputs, non_finite_loss
from jaxinf.run.saved import SavedState, batch_plan_key
from jaxinf.run.store import RunStore
from jaxinf.sharding.meshes import barrier, exchange

log = logging.getLogger("jaxinf")


EXCHANGE_BYTES = 1 << 30
"""With several processes, each reads and multiplies its own slices of the index and the processes exchange their
scores, bounds and losses (``16 (Q + 1)`` bytes a row): at most this many bytes of every process's together per
round (what each device of the all-gather holds)."""


def eigen_fingerprint(eigen) -> str:
    """A hash of every block's eigenvalues: which eigenbasis an index was built in."""
    h = hashlib.sha256()
    for k in sorted(eigen.e_A):
        for e in (eigen.e_A[k], eigen.e_S[k]):
            h.update(np.ascontiguousarray(np.asarray(jax.device_get(e), np.float64)).tobytes())
    return h.hexdigest()[:16]


def index_root(store: RunStore) -> Path:
    return store.stage("index").root


def _manifest(config: cfg.Config, store: RunStore, inputs: Inputs, eigen, sizes) -> dict:
    names = sorted(inputs.layers)
    layer_names = [n for k in names for n in inputs.layers[k].layer_names]
    blocks = {}
    for k in names:
        s = inputs.layers[k]
        blocks[k] = {
            "k_S": sizes[k][0],
            "k_A": sizes[k][1],
            "layers": len(s.layer_names),
            "bands_S": len(indexing.bands(sizes[k][0], s.d_out)),
            "bands_A": len(indexing.bands(sizes[k][1], s.d_in_aug)),
        }
    cells = sum(b["k_S"] * b["k_A"] * b["layers"] for b in blocks.values())
    n_bands = sum(b["bands_S"] * b["bands_A"] * b["layers"] for b in blocks.values())
    recorded = store.record.get("inputs", {})
    return {
        "format": FORMAT,
        "k": config.index.k,
        "dtype": config.index.dtype,
        "blocks": blocks,
        "cells": int(cells),
        "bands": int(n_bands),
        "layers": layer_names,
        "batches": int(inputs.plan.num_steps),
        "plan": batch_plan_key(inputs.plan),
        "rows": inputs.plan.rows_key(),
        "inputs": {
            "model": {k: v for k, v in recorded.items() if k not in ("documents", "queries")},
            "documents": (recorded.get("documents") or {}).get("sha256"),
            "eigen": eigen_fingerprint(eigen),
            "precision": config.run.precision,
        },
    }


BUFFER_BYTES = 2**30
"""The most index rows a pass holds between two flushes (on the device until the save, then on the host): a full
index of a wide layer makes rows of megabytes, and ``index.save_every`` batches of them would not fit."""


def flush_every(save_every: int, manifest: dict, rows_per_batch: int) -> int:
    """Batches between flushes of the index rows: ``index.save_every``, fewer when that many batches of rows would
    exceed :data:`BUFFER_BYTES` (at least 1)."""
    per_row = row_bytes(manifest["cells"], manifest["dtype"], manifest["bands"])
    return max(1, min(save_every, BUFFER_BYTES // max(1, per_row * rows_per_batch)))


class IndexBuild:
    """An index being written: its writer (the per-batch saves: this process's part, :class:`IndexWriter`), the order
    of the eigen-directions (``selection``), the eigenbases in that order that an index statistic rotates with
    (``basis``), and ``k``."""

    def __init__(self, config: cfg.Config, store: RunStore, inputs: Inputs, curv, eigen, executor):
        self.config, self.store, self.root = config, store, index_root(store)
        self.k = indexing.kept_directions(config.index.k)
        selection = indexing.select_cells(eigen, self.k)
        self.manifest = _manifest(config, store, inputs, eigen, indexing.block_sizes(inputs.layers, self.k))
        every = flush_every(config.index.save_every, self.manifest, inputs.plan.batch_size)
        if every < config.index.save_every:
            log.info(
                "index: rows flushed every %d batches (index.save_every=%d batches of rows would hold more than "
                "%.0f GiB)",
                every,
                config.index.save_every,
                BUFFER_BYTES / 2**30,
            )
        self.writer = IndexWriter(
            self.root,
            self.manifest,
            every,
            executor.groups,
            writes=executor.writes_group,
            primary=jax.process_index() == 0,
        )
        if self.writer.primary:
            save_selection(self.root, selection)
        self.selection = selection
        self.basis = indexing.ordered_basis(curv.Q_A, curv.Q_S, selection)
        store.mark("index", "running")

    def done(self, timing: dict) -> None:
        """Marks the index done once its last rows are on disk for every process: with several processes, each data
        group's first process writes its part and the others wait here for every part before they read them."""
        barrier("index written")
        m = self.writer.manifest
        per_row = row_bytes(m["cells"], m["dtype"], m["bands"])
        self.store.mark(
            "index",
            "done",
            k=m["k"],
            cells=m["cells"],
            bytes_per_row=int(per_row),
            eigen=m["inputs"]["eigen"],
            timing=timing,
        )
        log.info(
            "index: %d cells per document row (%s), %.1f MiB",
            m["cells"],
            m["dtype"],
            per_row * m["batches"] * (m["rows_per_batch"] or 0) / 2**20,
        )
        g, parts = self.writer.part
        if parts > 1 and self.writer.writes:
            log.info("index: this process wrote part %d of %d (%s)", g, parts, self.writer.files)


def build_index(config: cfg.Config, store: RunStore, inputs: Inputs, curv, eigen, executor) -> Path:
    """Stage ``index`` as a pass of its own (a finished run given ``index.k``, or ``scores.mode: index``): every
    document row's kept cells and band energies, written batch by batch (resumable)."""
    if store.status("index") == "done":
        try:  # a finished index must be on disk, whole (a rerun said finished, and jaxinf query "not built yet")
            IndexReader(index_root(store))
            return index_root(store)
        except IndexError_ as e:
            gone = not manifest_path(index_root(store)).exists()
            log.warning("index: %s; building it again", f"{index_root(store)}: missing" if gone else e)
            if jax.process_index() == 0:
                manifest_path(index_root(store)).unlink(missing_ok=True)  # its rows from the first batch, afresh
            barrier("index set aside")  # every process resumes from the same (removed) manifest
    build = IndexBuild(config, store, inputs, curv, eigen, executor)
    # the rows the Lambda pass writes where it writes them (so an index of its rebuilt here is the same to the bit)
    as_lambda = programs.index_in_lambda(config, executor.mesh is None)
    batches = inputs.batches(inputs.plan, inputs.documents, executor.groups[0])
    index_fn = programs.index(config, inputs.task, inputs.layers, as_lambda).jit(executor, batches)
    params = inputs.lm.params

    def step(carry, batch, i):
        out = index_fn(params, eigen, build.selection, batch) if as_lambda else index_fn(params, build.basis, batch)
        return carry, out, out["loss"]

    _, timing = run_batches(
        "index",
        step,
        batches.iterate,
        None,
        build.writer,
        total=len(batches),
        non_finite=non_finite_loss(inputs.documents, "document"),
        device=executor,
    )
    build.done(timing)
    return build.root


class WithIndex:
    """The saves of a pass that also writes the index (the scoring pass, or the Lambda pass under the empirical
    Fisher): each save writes the batches' index rows first (flushed), then hands the pass's own outputs ``keys`` to
    its own saves (score chunks, or the Lambda checkpoint), so they never run ahead of the rows; a resumed pass
    starts after its own last save and rewrites any rows past it with the same values."""

    INDEX_KEYS = ("cells", "bands", "loss")

    def __init__(self, saves, writer: IndexWriter, keys: tuple[str, ...]):
        self.saves, self.writer, self.keys = saves, writer, keys
        self.noun = f"{saves.noun} and index rows"
        self.local = tuple(k for k in writer.local if k not in keys)  # what the pass's own saves need is whole

    @property
    def every(self) -> int | None:
        """The sooner of the two: the pass's own saves, or the index rows' flushes (:func:`flush_every`)."""
        return min(e for e in (self.saves.every, self.writer.every) if e is not None)

    def resume(self, carry):
        return self.saves.resume(carry)

    def begin(self, start: int, total: int | None) -> None:
        self.writer.begin(start, total)
        self.saves.begin(start, total)

    def save(self, step: int, carry, batches) -> None:
        self.writer.save(step, carry, [({k: out[k] for k in self.INDEX_KEYS}, rows) for out, rows in batches])
        self.saves.save(step, carry, [({k: out[k] for k in self.keys}, rows) for out, rows in batches])


def lambda_with_index(config: cfg.Config, store: RunStore, inputs: Inputs, eigen, batches, executor):
    """Stage ``lambda`` and the index in one pass over every document (:func:`jaxinf.engine.programs.index_in_lambda`):
    the Lambda sums checkpointed as :func:`jaxinf.pipeline.accumulate` does, each batch's index rows written beside
    them. Returns Lambda and the pass's timing, the index marked done; or None where the index cannot ride on this
    pass: a Lambda pass resumed past the rows on disk (begun without the index, or with other index settings), which
    then runs alone and the index in a pass of its own. A pass killed after both were saved resumes both, so every
    row comes from the one statistic (:func:`jaxinf.engine.indexing.lambda_and_index_statistic`)."""
    build = IndexBuild(config, store, inputs, eigen, eigen, executor)
    checkpoints = store.stage("lambda").steps()  # rows are flushed before each checkpoint: written >= the newest
    if checkpoints and build.writer.manifest["written"] < checkpoints[-1]:
        log.info("index: not on the Lambda pass resumed at a checkpoint past its rows; a pass of its own follows")
        return None
    program = programs.lambda_and_index(config, inputs.task, inputs.layers)
    stage, update = program.stage, program.jit(executor, batches)
    assert stage is not None  # an accumulating program
    params = inputs.lm.params

    def step(carry, batch, i):
        carry, out = update(carry, params, eigen, build.selection, batch)
        return carry, out, out["loss"]

    saves = WithIndex(SavedState(store, "lambda", batches.plan, config.factors.save_every), build.writer, ())
    state, timing = run_batches(
        "lambda",
        step,
        batches.iterate,
        executor.init(stage),
        saves,
        total=len(batches),
        non_finite=non_finite_loss(inputs.documents, "lambda"),
        device=executor,
    )
    build.done(timing)
    log.info("index: written by the Lambda pass (empirical Fisher: its gradients are the scores')")
    return stage.finalize(state), timing


def source_root(config: cfg.Config, store: RunStore | None) -> Path:
    """The index a ``scores.mode: index`` run reads: ``index.from``'s, else this run's when it builds one
    (``index.k``), else ``factors.from``'s."""
    if config.index.from_run is not None:
        return Path(config.index.from_run) / "state" / "index"
    if config.index.k is None and config.factors.from_run is not None:
        return Path(config.factors.from_run) / "state" / "index"
    assert store is not None, "an index built by this run needs its store"  # check_available passes None only above
    return index_root(store)


def borrowed_index(run: Path) -> Path | None:
    """The run whose index ``run`` scored with (``scores.mode: index`` from its ``index.from`` or ``factors.from``)
    when it built none of its own, else None (no such run, or one that was to build its own)."""
    try:
        record = rundir.read_record(run)
        theirs = rundir.recorded_config(record, run) if record else None
    except (rundir.StoreError, cfg.ConfigError, TypeError, KeyError):
        return None
    if theirs is None or theirs.scores.mode != "index" or theirs.index.k is not None:
        return None
    return source_root(theirs, None).parent.parent


def check_available(config: cfg.Config) -> None:
    """Before anything is created: the index a ``scores.mode: index`` run reads from ``factors.from`` exists, is
    complete and readable (:class:`~jaxinf.run.index_store.IndexReader`); one line naming the file otherwise."""
    if config.scores.mode == "index" and (config.index.from_run is not None or config.index.k is None):
        root = source_root(config, None)
        source = borrowed_index(root.parent.parent) if read_manifest(root) is None else None
        if source is not None:
            key = "index.from" if config.index.from_run is not None else "factors.from"
            raise IndexError_(
                f"{key}: {root.parent.parent} built no EK-FAC index: it scored with that of {source}; "
                f"give index.from={source}"
            )
        IndexReader(root)


def check_rows(m: dict, where: Path, documents: str | None, inputs: Inputs) -> None:
    """Refuses, in one line, an index (manifest ``m`` at ``where``) built over other documents or rows than this
    run's (``documents``: the SHA-256 of its documents, :func:`jaxinf.run.fingerprint.documents_fingerprint`): what
    the documents and their batch plan decide, known before any pass (:func:`check_borrowed`)."""
    if m["inputs"]["documents"] != documents:
        rebuild = (  # jaxinf query takes no index.k: the run that built the index builds it again
            f"{where.parent.parent.parent}: restore the documents it was built over, or run its jaxinf run again to "
            "rebuild it"
            if rundir.in_query()
            else "rebuild it: index.k"
        )
        raise IndexError_(f"{where}: built over other documents than {inputs.documents.name} ({rebuild})")
    # the rows must be the same; their batches and processes may differ (an index from before "rows": the same plan)
    if not (m["rows"] == inputs.plan.rows_key() if "rows" in m else m["plan"] == batch_plan_key(inputs.plan)):
        raise IndexError_(
            f"{where}: built over documents cut into other rows (another data.max_length, data.long_documents or "
            f"data.text_field than the index's run: give that run's, or rebuild the index)"
        )


def check_borrowed(config: cfg.Config, store: RunStore, inputs: Inputs, documents: dict) -> None:
    """At the start of a ``scores.mode: index`` run that reads another run's index (``index.from``, ``factors.from``,
    ``jaxinf query``): its documents and rows (:func:`check_rows`), before any pass or query gradient, so that a
    refusal leaves nothing behind."""
    borrowed = config.index.from_run is not None or (config.index.k is None and config.factors.from_run is not None)
    if config.scores.mode != "index" or not borrowed:
        return
    reader = IndexReader(source_root(config, store))
    check_rows(reader.manifest, reader.root / "manifest.json", documents.get("sha256"), inputs)


WRONG_SELECTION = {
    "rows": "not the order of the eigenvalues the index was built in",
    "cols": "not the order of the eigenvalues the index was built in",
    "cells": "not the cells the eigenvalues the index was built in select",
}
"""What a part of ``selection.npz`` that differs from its recomputation is, in :func:`check_index`'s refusal."""


def check_index(reader: IndexReader, store: RunStore, inputs: Inputs, eigen) -> None:
    """Refuses, in one line, an index built over other documents, rows, layers or eigenbasis than this run's."""
    m, where = reader.manifest, reader.root / "manifest.json"
    check_rows(m, where, (store.record.get("inputs", {}).get("documents") or {}).get("sha256"), inputs)
    if m["layers"] != [n for k in sorted(inputs.layers) for n in inputs.layers[k].layer_names]:
        raise IndexError_(f"{where}: built for other tracked layers (factors.track)")
    try:  # the k the query's rotation keeps must be the one the rows were written with (a hand-edited manifest)
        sizes = indexing.block_sizes(inputs.layers, indexing.kept_directions(m["k"]))
        consistent = {n: (b["k_S"], b["k_A"]) for n, b in m["blocks"].items()} == {
            n: tuple(v) for n, v in sizes.items()
        }
    except (TypeError, ValueError, KeyError, AttributeError):
        consistent = False
    if not consistent:
        raise IndexError_(
            f"{where}: its k ({m['k']!r}) does not give its blocks' cells (a damaged manifest: rebuild it)"
        )
    if m["inputs"]["eigen"] != eigen_fingerprint(eigen):
        raise IndexError_(f"{where}: built in another eigenbasis (the factors were refitted: rebuild it)")
    # the order of the directions is a function of the eigenvalues: a damaged selection.npz (an index out of range,
    # a block missing, another shape or dtype) was a traceback in the rotation or NaN scores, a repeated one wrong ones
    expected = jax.device_get(indexing.select_cells(eigen, indexing.kept_directions(m["k"])))
    for part, want in ((p, getattr(expected, p)) for p in PARTS):
        for name in sorted(want):
            got = reader.selection.get(f"{part}/{name}")
            if got is None or got.dtype.kind not in "iu" or not np.array_equal(got, np.asarray(want[name])):
                raise IndexError_(
                    f"{reader.root / 'selection.npz'}: {part}/{name} is "
                    f"{'missing' if got is None else WRONG_SELECTION[part]} "
                    f"(a damaged index: remove its manifest.json and run the run {reader.root.parent.parent} again)"
                )


def _checked_rows(reader: IndexReader, lo: int, hi: int, documents: int) -> dict[str, np.ndarray]:
    """Rows ``[lo, hi)`` of the index, each a document of the run's (or -1, padding) with finite values: a damaged
    index was an IndexError traceback (a document out of range) or wrote ``"loss": Infinity`` into documents.jsonl."""
    rebuild = f"remove its manifest.json and run the run {reader.root.parent.parent} again"
    rows = reader.read(lo, hi)  # checked against each batch's checksum
    rows["cells"] = rows["cells"].astype(np.float32, copy=False)  # float32 rows stay the page cache's, uncopied
    bad = np.flatnonzero((rows["documents"] < -1) | (rows["documents"] >= documents))
    if bad.size:
        raise IndexError_(
            f"{reader.where('documents', lo + int(bad[0]))} names document {rows['documents'][bad[0]]}, not one "
            f"of the {documents} documents (a damaged index: {rebuild})"
        )
    for name in ("cells", "bands", "loss"):
        finite = np.isfinite(rows[name]).reshape(hi - lo, -1).all(axis=1)
        if not finite.all():
            raise IndexError_(
                f"{reader.where(name, lo + int(np.flatnonzero(~finite)[0]))} is not finite (a damaged index: {rebuild})"
            )
    return rows


def _slice_scores(reader: IndexReader, rows: tuple[int, int] | None, documents: int, q_cells, q_rest, eps) -> dict:
    """The index scores ``[Q, R]`` of rows ``[lo, hi)`` and their bounds, with the rows' documents and losses; nothing
    (``rows`` None: a process with no slice in the last round), or the refusal of damaged rows as ``error``."""
    if rows is None:
        return {"documents": np.zeros(0, np.int64)}
    try:
        r = _checked_rows(reader, *rows, documents)
    except IndexError_ as e:
        return {"error": np.asarray(str(e))}
    return {
        "documents": np.asarray(r["documents"], np.int64),
        "scores": indexing.index_scores(q_cells, r["cells"]),
        "bound": indexing.score_bounds(q_rest, indexing.residual_norms(r["bands"], eps)),
        "loss": np.asarray(r["loss"], np.float64),
    }


def _share(part: dict) -> list[dict]:
    """Every process's :func:`_slice_scores` (the one process's own, alone), exactly (as bytes,
    :func:`jaxinf.sharding.meshes.exchange`); damaged rows on any process refused on all, in the same words."""
    if jax.process_count() == 1:
        parts = [part]
    else:
        buffer = io.BytesIO()
        np.savez(buffer, **part)
        parts = [dict(np.load(io.BytesIO(raw), allow_pickle=False)) for raw in exchange(buffer.getvalue())]
    for p in parts:
        if "error" in p:
            raise IndexError_(str(p["error"]))
    return [p for p in parts if p["documents"].size]


def scores_from_index(config: cfg.Config, store: RunStore, inputs: Inputs, qg, curv, eigen, executor) -> dict:
    """Stage ``scores`` with ``scores.mode: index``: every document's score from the index, the documents that may
    be in some query's top or bottom ``scores.topk`` scored exactly; saved as the stage's result."""
    N, Q = inputs.plan.num_documents, qg.num_queries
    like = {
        "scores": jax.ShapeDtypeStruct((Q, N), np.float64),
        "loss": jax.ShapeDtypeStruct((N,), np.float64),
        "bound": jax.ShapeDtypeStruct((Q, N), np.float64),
        "fidelity": jax.ShapeDtypeStruct((Q,), np.float64),
        "certified": jax.ShapeDtypeStruct((N,), np.bool_),
    }
    if store.status("scores") == "done":
        saved = store.load_result("scores", like)
        if saved is not None:
            return {k: np.asarray(v) for k, v in saved.items()}
    reader = IndexReader(source_root(config, store))
    check_index(reader, store, inputs, eigen)
    store.mark("scores", "running", mode="index")
    t0 = time.perf_counter()
    selection = load_selection(reader.selection)
    k = indexing.kept_directions(reader.manifest["k"])
    iq = jax.jit(
        lambda q, QA, QS, L, sel: indexing.index_queries(
            q, QA, QS, L, sel, inputs.layers, k, config.run.matmul_precision
        )
    )(qg, curv.Q_A, curv.Q_S, curv.Lambda, selection)
    q_cells, q_rest = executor.fetch(iq.cells).astype(np.float32), executor.fetch(iq.rest).astype(np.float64)
    fidelity = executor.fetch(iq.fidelity).astype(np.float64)
    rotate = time.perf_counter() - t0
    t1 = time.perf_counter()
    scores, bound, loss = np.zeros((Q, N)), np.zeros((Q, N)), np.zeros(N)
    eps = indexing.RESOLUTION[reader.manifest["dtype"]]
    processes, me = jax.process_count(), jax.process_index()
    rows = rows_per_slice(reader.manifest)
    if processes > 1:  # the rows shared among the processes, each round's exchange bounded
        rows = max(1, min(rows, EXCHANGE_BYTES // (processes * 16 * (Q + 1)), -(-reader.rows // processes)))
    slices = list(reader.slices(rows))
    read = 0
    for first in range(0, len(slices), processes):  # each process reads and multiplies its own slice of each round
        mine = slices[first + me] if first + me < len(slices) else None
        read += 0 if mine is None else mine[1] - mine[0]
        for part in _share(_slice_scores(reader, mine, N, q_cells, q_rest, eps)):
            docs = part["documents"]
            real = docs >= 0
            np.add.at(scores.T, docs[real], part["scores"].T[real])
            np.add.at(bound.T, docs[real], part["bound"].T[real])
            np.add.at(loss, docs[real], part["loss"][real])
    product = time.perf_counter() - t1
    if processes > 1:
        log.info("scores: this process read %d of the index's %d rows", read, reader.rows)
    k = min(config.scores.topk, N)
    certified, rounds = np.zeros(N, bool), [0, 0]
    tails = None
    if np.any(bound > 0):
        found = []  # each round's tails

        def rescore(docs: np.ndarray) -> np.ndarray:
            exact, round_tails = exact_scores(config, inputs, qg, docs.tolist(), executor)
            found.append(round_tails)
            return exact

        scores, bound, certified, rounds = indexing.certify(scores, bound, k, rescore)
        for more in found:  # one set of tails: each query's top rows of both rounds
            tails = more if tails is None else running_tails.merge(tails, more, programs.tail_slots(config, N))
        tails = None if tails is None else jax.tree.map(np.asarray, tails)
    results = {"scores": scores, "loss": loss, "bound": bound, "fidelity": fidelity, "certified": certified}
    store.save_result(
        "scores",
        results,
        mode="index",
        index=str(reader.root),
        rotate_seconds=rotate,
        product_seconds=product,
        rescored=int(certified.sum()),
        rescored_rounds=rounds,
        slices=len(slices),
        seconds=time.perf_counter() - t0,
        fidelity_min=float(fidelity.min()),
        fidelity_mean=float(fidelity.mean()),
    )
    log.info(
        "scores: from the index (%d cells per row): product and bounds in %.2fs; predicted correlation with exact scores %.3f "
        "(lowest query %.3f); %d documents rescored exactly to certify the top and bottom %d",
        reader.manifest["cells"],
        product,
        fidelity.mean(),
        fidelity.min(),
        int(certified.sum()),
        k,
    )
    if tails is not None:  # the exports' breakdowns of the rescored top documents (not saved with the scores)
        results["tails"] = tails
    return results


def exact_scores(config: cfg.Config, inputs: Inputs, qg, wanted: list[int], executor):
    """``([Q, len(wanted)], tails)``: the exact scores of the documents ``wanted`` (one scoring pass over them
    alone), and that pass's :class:`~jaxinf.engine.tails.Tails` (host arrays, documents numbered as in the corpus)."""
    from jaxinf.data.batching import scatter_columns

    subset, batches = inputs.subset_batches(config, wanted, executor)
    program = programs.scores(config, inputs.task, inputs.layers, self_influence=False, tails=len(wanted))
    score = program.jit(executor, batches)
    tails = executor.jit(
        lambda: programs.tails_init(config, inputs.layers, qg.num_queries, len(wanted)),
        out_shardings=executor.replicated(),
    )()

    def step(carry, batch, i):
        out = score(inputs.lm.params, qg, None, batch, carry)
        return out.pop("tails"), out, out["loss"]

    kept = Kept(every=1)
    tails, _ = run_batches(
        "certify",
        step,
        batches.iterate,
        tails,
        kept,
        total=len(batches),
        non_finite=non_finite_loss(subset, "document"),
        device=executor,
    )
    out = np.zeros((qg.num_queries, len(wanted)))
    for o, rows in kept.batches:
        scatter_columns(out, o["scores"], rows["index"])
    tails = jax.tree.map(executor.fetch, tails)
    in_corpus = np.where(tails.index >= 0, np.asarray(wanted)[np.maximum(tails.index, 0)], -1)  # subset -> corpus
    return out, dataclasses.replace(tails, index=in_corpus)
