"""Content fingerprints of a run's inputs, and what a changed input does to a resumed run.

``run.json`` records, under ``inputs``, a SHA-256 of

- every file of the model checkpoint (``config.json``, ``*.safetensors``, the
  safetensors index) and, separately, of ``tokenizer.json``;
- the documents: of every kept document, and of the first ``factors.max_documents``
  of them (the ones the curvature is fitted on), taken from the 8-byte digests of
  their lines (JSONL, compressed or not) or of their id, source and text (Parquet, Arrow, TFDS) that the
  validating scan computes as it reads them (``content_digest`` of every document source; no other pass),
  and of each shard (``shard_digests``), so the log names the shards that changed;
- the queries: of their parsed content (id, prompt, completion, kind, task, answer),
  so again no other read of the file.

On a resume the fingerprints are compared with the recorded ones
(:func:`check_model`, :func:`reconcile`). Which input does what, and why, is in
docs/data.md ("Changed inputs"):

- model or tokenizer changed: refused (:class:`InputChanged`, one line naming
  the file): every stage depends on them, so nothing could be kept and going on
  would silently start over;
- the documents the curvature was fitted on changed: every stage is recomputed;
- only later documents changed: scores, exports and analysis are recomputed,
  the curvature and the query gradients are kept;
- queries changed: query gradients, scores, exports and analysis are recomputed;
  only their ids or labels (kind, task, answer, supports, extra fields): the exports
  and the analysis.

Stages are recomputed by deleting their checkpoints and marking them pending, and
the exports of the old inputs are deleted with them, so a run directory never
holds results of old and new inputs side by side.

Hashing a checkpoint reads it once; the hash is kept with the file's size, mtime,
ctime and inode, and a resume whose files have the same ones reuses it instead of
reading the weights again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from jaxinf import config as cfg
from jaxinf.atomic import file_sha256
from jaxinf.run.rundir import StoreError, in_query, output_key
from jaxinf.run.store import RunStore

log = logging.getLogger("jaxinf")

# Files of a finished run that the exports stage writes (fingerprinted as they are written: :func:`written_changed`).
EXPORT_FILES = (
    "scores.npy",
    "self_influence.npy",
    "queries.jsonl",
    "documents.jsonl",
    "topk.jsonl",
    "layers.json",
    "layer_scores.npy",
    "topk_tokens.jsonl",
    "index_bounds.npy",
    "index.json",
)
# ... and with the analysis's (deleted when those stages are recomputed).
EXPORTS = (*EXPORT_FILES, "summary.json", "report")
TOKENIZER_FILES = ("tokenizer.json",)
MODEL_PATTERNS = ("config.json", "*.safetensors", "model.safetensors.index.json")


class InputChanged(StoreError):
    """An input of a run that changed since the run started, where the change cannot be absorbed by recomputing."""


def stamp(path: Path) -> list[int]:
    """What changes whenever a file's content can have changed: size, mtime, ctime (ns) and inode."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def files_fingerprint(paths: list[Path], previous: dict | None) -> dict:
    """``{file name: {"sha256", "stamp"}}`` of ``paths``; a hash recorded in ``previous`` under the same stamp is reused."""
    previous = previous or {}
    out = {}
    for p in sorted(paths):
        st = stamp(p)
        old = previous.get(p.name)
        digest = old["sha256"] if old is not None and old.get("stamp") == st else file_sha256(p)
        out[p.name] = {"sha256": digest, "stamp": st}
    return out


def written(store: RunStore, names: tuple[str, ...]) -> dict:
    """The fingerprint (:func:`files_fingerprint`) of the files among ``names`` that a stage has just written."""
    return files_fingerprint([p for p in map(store.path, names) if p.is_file()], None)


def written_changed(store: RunStore, stage: str) -> list[str]:
    """The files a finished stage recorded as it wrote them (:func:`written`) that are gone or hold other bytes now:
    an output edited by hand is written again on a rerun, not kept as the run's result."""
    recorded = store.record["stages"].get(stage, {}).get("files") or {}
    changed = []
    for name, entry in recorded.items():
        path = store.path(name)
        if not path.is_file() or files_fingerprint([path], recorded)[name]["sha256"] != entry["sha256"]:
            changed.append(name)
    return changed


def model_files(checkpoint: str | Path) -> tuple[list[Path], list[Path]]:
    """(weight and config files, tokenizer files) of a checkpoint directory."""
    root = Path(checkpoint)
    model = {p for pattern in MODEL_PATTERNS for p in root.glob(pattern) if p.is_file()}
    tokenizer = [root / name for name in TOKENIZER_FILES if (root / name).is_file()]
    return sorted(model), tokenizer


def documents_fingerprint(documents, n_fit: int) -> dict:
    """Fingerprint of all kept documents and of the first ``n_fit`` (those the curvature is fitted on).

    Every reader of :mod:`jaxinf.data` keeps per-document digests from its validating scan (``content_digest``,
    ``shard_digests``). A source without them (a user's own): a directory by its files' names, sizes and mtimes,
    anything else by its name only.
    """
    digest = getattr(documents, "content_digest", None)
    if digest is not None:
        out = {
            "path": str(documents.name),
            "count": len(documents),
            "sha256": digest(),
            "fit": {"count": int(n_fit), "sha256": digest(n_fit)},
        }
        shards = getattr(documents, "shard_digests", None)
        if shards is not None:
            out["shards"] = shards()
        return out
    root = Path(str(documents.name))
    if root.is_dir():
        listing = sorted(
            (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()
        )
        whole = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
        kind = "stat"
    else:
        whole, kind = hashlib.sha256(str(documents.name).encode()).hexdigest(), "name"
    return {
        "path": str(documents.name),
        "count": len(documents),
        "sha256": whole,
        "kind": kind,
        "fit": {"count": int(n_fit), "sha256": whole},
    }


def queries_fingerprint(queries, path: str) -> dict:
    """Fingerprint of the parsed queries (their content, not their line numbers)."""
    rows = [{k: v for k, v in dataclasses.asdict(q).items() if k != "origin"} for q in queries]
    measured = [[q.prompt, q.completion] for q in queries]  # all the query gradients and scores depend on
    return {
        "path": str(path),
        "count": len(rows),
        "sha256": hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest(),
        "measured": hashlib.sha256(json.dumps(measured).encode()).hexdigest(),
    }


def changed_shards(before: list | None, now: list | None) -> str:
    """`` (shards a, b changed)``: the shards whose content digests differ, for a log line; empty when unknown."""
    if not before or not now:
        return ""
    old = {s["name"]: s["sha256"] for s in before}
    new = {s["name"]: s["sha256"] for s in now}
    names = [n for n in sorted(set(old) | set(new)) if old.get(n) != new.get(n)]
    if not names or len(names) == len(set(old) | set(new)) == 1:
        return ""
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return f" (shard{'s' if len(names) > 1 else ''} {shown} changed)"


def _started(store: RunStore) -> list[str]:
    return [s for s in cfg.STAGES if store.status(s) != "pending" or store.stage(s).steps()]


def check_model(store: RunStore, checkpoint: str) -> dict:
    """Fingerprints of the model and tokenizer files; refuses a run whose saved results used other ones.

    Returns ``{"model": {...}, "tokenizer": {...}}`` for :func:`reconcile` to record.
    """
    old = store.record.get("inputs") or {}
    model, tokenizer = model_files(checkpoint)
    current: dict[str, dict[str, Any]] = {
        "model": {"path": str(checkpoint), "files": files_fingerprint(model, old.get("model", {}).get("files"))},
        "tokenizer": {
            "path": str(checkpoint),
            "files": files_fingerprint(tokenizer, old.get("tokenizer", {}).get("files")),
        },
    }
    started = _started(store)
    for kind in ("model", "tokenizer"):
        if kind not in old or not started:
            continue
        before, now = old[kind]["files"], current[kind]["files"]
        for name in sorted(set(before) | set(now)):
            if before.get(name, {}).get("sha256") != now.get(name, {}).get("sha256"):
                what = "is new" if name not in before else "is gone" if name not in now else "changed"
                if "model.checkpoint" in store.moved:  # another directory than the run read: not an edit
                    raise InputChanged(
                        f"model.checkpoint: {checkpoint} is not the {kind} this run was computed with (that of "
                        f"{store.moved['model.checkpoint']}: {name} {'differs' if what == 'changed' else what}; "
                        f"every stage depends on it); give that {kind} (a copy is accepted), or another "
                        f"{output_key()} for this one"
                    )
                raise InputChanged(
                    f"{Path(checkpoint) / name}: {what} since this run started (stage {started[0]} onwards was "
                    f"computed with the {kind} as it was; every stage depends on it); restore it, or start over "
                    f"with --overwrite or another {output_key()}"
                )
    return current


def check_unchanged(model_fp: dict, checkpoint: str) -> None:
    """Raises if a model or tokenizer file changed between hashing and loading it (a mix of two versions)."""
    model, tokenizer = model_files(checkpoint)
    for kind, paths in (("model", model), ("tokenizer", tokenizer)):
        for p in paths:
            if model_fp[kind]["files"].get(p.name, {}).get("stamp") != stamp(p):
                raise InputChanged(f"{p}: changed while it was being read; run again when it no longer changes")


def curvature_fingerprint(source: RunStore | None) -> dict | None:
    """Which fitted curvature the run ``source`` holds (None for no run): its path and a hash of the checksums
    saved with its covariance, eigendecomposition and Lambda, which a refit of that run changes. A run that reuses
    it (``factors.from``, ``jaxinf query``) records it among its inputs (:func:`reconcile`): its query gradients,
    preconditioned with that curvature, are never resumed against another."""
    if source is None:
        return None
    from jaxinf.run.store import MANIFEST

    h = hashlib.sha256()
    for stage in ("covariance", "eigen", "lambda"):
        manifest = source.stage(stage, keep=1).root / "0" / MANIFEST
        h.update(f"{stage}:".encode() + (manifest.read_bytes() if manifest.is_file() else b"-"))
    return {"path": str(source.root), "sha256": h.hexdigest()}


def reconcile(
    store: RunStore, model_fp: dict, documents: dict, queries: dict, factors: dict | None = None
) -> list[str]:
    """Compares the documents, queries and reused curvature (``factors``: :func:`curvature_fingerprint` of
    ``factors.from``) with the recorded fingerprints, invalidates the stages that depend on a changed one (logging
    which and why), records all fingerprints in ``run.json``, and returns the invalidated stages."""
    old = store.record.get("inputs")
    current = {**model_fp, "documents": documents, "queries": queries}
    if factors is not None:
        current["factors"] = factors
    started = _started(store)
    invalid: list[str] = []
    if old is None and started:
        log.warning(
            "%s: no input fingerprints recorded (the run was started by an older jaxinf, or its factors were "
            "imported); the saved results are taken to match the current inputs",
            store.root,
        )
    elif old is not None and started:
        reasons = []
        od, oq = old.get("documents", {}), old.get("queries", {})
        _refuse_other_inputs(store, started, od, documents, oq, queries)
        where_ = changed_shards(od.get("shards"), documents.get("shards"))
        if od.get("fit") != documents["fit"]:
            reasons.append(
                (
                    "covariance",
                    f"{documents['path']}{where_}: the first {documents['fit']['count']} "
                    "documents (those the curvature is fitted on) changed",
                )
            )
        elif (od.get("sha256"), od.get("count")) != (documents["sha256"], documents["count"]):
            reasons.append(("scores", f"{documents['path']}{where_}: the documents changed"))
        if (oq.get("sha256"), oq.get("count")) != (queries["sha256"], queries["count"]):
            if oq.get("measured") is not None and oq.get("measured") == queries["measured"]:
                reasons.append(
                    (
                        "exports",
                        f"{queries['path']}: only the queries' ids or labels changed (not their "
                        "prompts or completions)",
                    )
                )
            else:
                reasons.append(("queries", f"{queries['path']}: the queries changed"))
        refitted = factors is not None and old.get("factors", factors)["sha256"] != factors["sha256"]
        if refitted:  # the query gradients were preconditioned with it (and an index built in its eigenbasis)
            assert factors is not None
            reasons.append(("queries", f"factors.from: {factors['path']}: its curvature was fitted again"))
        if reasons:
            first = min(cfg.STAGES.index(stage) for stage, _ in reasons)
            invalid = [s for s in cfg.STAGES[first:] if s in started]
            if not refitted and all(stage == "queries" for stage, _ in reasons):  # the index: the documents only
                invalid = [s for s in invalid if s != "index"]
            for _, why in reasons:
                log.warning("%s since this run started; recomputing %s", why, ", ".join(invalid) or "nothing")
            invalidate(store, invalid)
    store.update(inputs=current)
    return invalid


def _refuse_other_inputs(
    store: RunStore, started: list[str], od: dict, documents: dict, oq: dict, queries: dict
) -> None:
    """Refuses documents or queries given under another path than the run read them from (``store.moved``) whose
    content differs from what the saved results were computed with: unlike an edit in place, which leaves nothing to
    keep the old results for, these are other inputs, and recomputing would discard results the old ones still hold.
    The same content under another path goes on (a queries file whose ids or labels alone differ too: only the
    exports are written again), and so does other content of which no saved result depends (a run stopped before
    its first stage that reads it). The message names the cheapest way on: the run's curvature (or its index) reused
    for the other inputs in another output directory, not ``--overwrite``, which discards it."""
    key, root = output_key(), store.root

    def saved(first: str, but: tuple[str, ...] = ()) -> bool:  # a result computed from it, not written again cheaply
        later = cfg.STAGES[cfg.STAGES.index(first) :]
        return any(s in later and s not in ("exports", "analysis", *but) for s in started)

    from_run = (store.record.get("config") or {}).get("factors", {}).get("from")  # the curvature it reused, if any
    fitted = from_run if isinstance(from_run, str) and from_run else str(root)
    reuse = f"factors.from={fitted} with another {key} reuses this run's curvature"
    if (
        "data.documents" in store.moved
        and (od.get("sha256"), od.get("count")) != (documents["sha256"], documents["count"])
        and saved("covariance" if od.get("fit") != documents["fit"] else "scores")
    ):
        raise StoreError(
            f"data.documents: {documents['path']} holds other documents than {store.moved['data.documents']}, "
            f"which this run's saved results were computed with; "
            + ("give another --out" if in_query() else f"{reuse} (fitted on those) to score these")
        )
    if "data.queries" in store.moved and (oq.get("sha256"), oq.get("count")) != (queries["sha256"], queries["count"]):
        if (oq.get("measured") is not None and oq.get("measured") == queries["measured"]) or not saved(
            "queries", but=("index",)
        ):
            return  # only ids or labels (the exports, written again from the saved scores), or nothing saved yet
        if in_query():
            raise StoreError(
                f"QUERIES: {queries['path']} holds other queries than {store.moved['data.queries']}, which {root} "
                f"answers; give another --out for them"
            )
        indexed = store.status("index") == "done"
        raise StoreError(
            f"data.queries: {queries['path']} holds other queries than {store.moved['data.queries']}, which this "
            f"run's saved results answer; "
            + (f"jaxinf query {root} {queries['path']} --out DIR scores them from its index, or " if indexed else "")
            + f"{reuse} to score them"
        )


def invalidate(store: RunStore, stages: list[str]) -> None:
    """Deletes the checkpoints of ``stages`` (and the exports, if they are among them) and marks them pending."""
    import jax

    if not stages:
        return
    if jax.process_index() == 0:
        for s in stages:
            store.stage(s).clear()
            store.carry(s).clear()
        if "exports" in stages or "scores" in stages:
            for name in EXPORTS:
                p = store.path(name)
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
    for s in stages:
        store.record["stages"][s] = {"status": "pending"}
