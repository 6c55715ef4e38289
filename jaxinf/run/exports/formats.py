"""The files of a run directory's exports: one writer and one reader per format, defined once here.

The exports stage (:mod:`jaxinf.run.exports.stage`) and the converter of released data
(:mod:`jaxinf.analysis.release`) write them; the analysis (:mod:`jaxinf.analysis`) reads them.
This module imports nothing of the engine, so reading a run needs no JAX.

- ``scores.npy``: float [Q, N], C order; row q is query-file line q, column n is
  document-file line n. Read in column chunks or rows with ``pread``, never whole.
- ``queries.jsonl``: ``{"id", "prompt", "completion", "kind", "task", "answer", "loss"}``
  (id, prompt and completion required; ``loss`` is the completion's NLL in nats). ``answer`` is
  the query's correct answer; an optional ``model_answer`` (an extra field of the query file,
  carried through) is the answer the model's completion gives, when that is known.
- ``documents.jsonl``: ``{"id", "source", "tokens"}`` and optionally ``"text"``.
- ``topk.jsonl``: ``{"query": id, "top": [{"id", "source", "score", "snippet"}...], "bottom": [...]}``.
- ``layers.json``: ``{"names": [tracked layer names in model order]}``.
- ``layer_scores.npy``: float [Q, K, L], per-layer scores of query q's top-K documents in the
  order of that query's ``top`` list in topk.jsonl.
- ``topk_tokens.jsonl``: ``{"query", "document", "rank", "tokens": [{"text", "piece", "score"}...]}``,
  one line per (query, top document), every token of the document in order: ``text`` the token
  as the vocabulary spells it (``##ing``, ``Ġthe``), ``piece`` (optional) its text in place as the
  tokenizer decodes the document (``ing``, `` the``; :func:`jaxinf.data.tokenize.token_pieces`).

Fallbacks, all recorded in ``notes`` and shown in the report: a query whose ``kind`` is
missing or not one of ``factual``/``reasoning``/``control`` is put in the ``unknown`` kind;
a document without ``source`` is put in the ``unknown`` source; documents without
``tokens`` disable the by-token source multipliers. Everything else that is malformed is an
:class:`AnalysisError` whose one-line message names the file, line and field.
"""

from __future__ import annotations

import json
import math
import os
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jaxinf import atomic
from jaxinf.atomic import ArrayFileError, load_npy, npy_header
from jaxinf.errors import UserError

KINDS = ("factual", "reasoning", "control")
UNKNOWN = "unknown"


class AnalysisError(UserError):
    """A run-directory file the analysis cannot use; the message is one line naming the file and field."""


# ----------------------------------------------------------------------------- JSONL


# the C scanner behind json.loads, without its per-call overhead (typeshed does not declare the attribute)
_SCAN = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; bad JSON is an AnalysisError.

    Each line must hold exactly one JSON object (anything after it but whitespace is an error).
    """
    path = Path(path)
    scan = _SCAN
    try:
        f = open(path, "rb")
    except OSError as e:  # a directory where the file belongs, an unreadable file
        raise AnalysisError(f"{path.name}: cannot read {path} ({e.strerror})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            try:  # decoded line by line, so a damaged file is named with its line
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise AnalysisError(f"{path.name} line {lineno}: invalid UTF-8 at byte {e.start + 1}") from None
            try:
                obj, end = scan(line, 0)
                if type(obj) is not dict or line[end:].strip():
                    raise ValueError
            except (StopIteration, ValueError):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise AnalysisError(f"{path.name} line {lineno}: invalid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise AnalysisError(
                        f"{path.name} line {lineno}: expected a JSON object, got {type(obj).__name__}"
                    ) from None
            yield lineno, obj


def write_jsonl(path: Path, records: Iterable[Mapping]) -> None:
    """Write records one JSON object per line (UTF-8, no ASCII escaping), atomically."""
    atomic.write_jsonl(path, records)


def _id_str(value, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise AnalysisError(f"{where}: field id must be a string or an integer, got {value!r}")
    return str(value)


# ----------------------------------------------------------------------------- queries


@dataclass
class Queries:
    """The query file. ``kinds`` holds the normalized kind (unknown -> "unknown")."""

    ids: list[str]
    prompts: list[str]
    completions: list[str]
    kinds: list[str]
    raw_kinds: list[object]
    tasks: list[str | None]
    answers: list[list[str] | None]
    loss: np.ndarray  # float64 [Q], NaN where absent
    model_answers: list[list[str] | None] = field(default_factory=list)  # one per query when read from a file

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def has_loss(self) -> bool:
        return bool(np.isfinite(self.loss).any())


def read_exported_queries(path: Path) -> Queries:
    """An exported ``queries.jsonl`` (not the query file a run reads: that is :func:`jaxinf.data.queries.read_queries`)."""
    path = Path(path)
    if not path.exists():
        raise AnalysisError(f"{path.name}: missing (expected at {path})")
    ids, prompts, completions, kinds, raw_kinds, tasks, answers, model_answers, losses = ([] for _ in range(9))
    seen: dict[str, int] = {}
    for lineno, obj in iter_jsonl(path):
        where = f"{path.name} line {lineno}"
        for key in ("id", "prompt", "completion"):
            if key not in obj:
                raise AnalysisError(f"{where}: missing field {key}")
        qid = _id_str(obj["id"], where)
        if qid in seen:
            raise AnalysisError(f"{where}: duplicate id {qid!r} (first on line {seen[qid]})")
        seen[qid] = lineno
        for key in ("prompt", "completion"):
            if not isinstance(obj[key], str):
                raise AnalysisError(f"{where}: field {key} must be a string")
        kind = obj.get("kind")
        task = obj.get("task")
        if task is not None and not isinstance(task, str):
            raise AnalysisError(f"{where}: field task must be a string, got {task!r}")
        answer = _answer_field(obj, "answer", where)
        model_answer = _answer_field(obj, "model_answer", where)
        loss = obj.get("loss")
        if loss is None:
            loss = math.nan
        elif isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isfinite(loss) or loss <= 0:
            raise AnalysisError(f"{where}: field loss must be a positive finite number of nats, got {loss!r}")
        ids.append(qid)
        prompts.append(obj["prompt"])
        completions.append(obj["completion"])
        raw_kinds.append(kind)
        kinds.append(kind if kind in KINDS else UNKNOWN)
        tasks.append(task)
        answers.append(answer)
        model_answers.append(model_answer)
        losses.append(float(loss))
    if not ids:
        raise AnalysisError(f"{path.name}: no queries")
    return Queries(
        ids, prompts, completions, kinds, raw_kinds, tasks, answers, np.asarray(losses, np.float64), model_answers
    )


def _answer_field(obj: dict, key: str, where: str) -> list[str] | None:
    """The items of an answer field (a string, a number or a non-empty list of them) as strings; None if absent."""
    answer = obj.get(key)
    if answer is None:
        return None
    items = answer if isinstance(answer, list) else [answer]
    if not items or not all(isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in items):
        raise AnalysisError(f"{where}: field {key} must be a string, a number or a non-empty list of them")
    return [str(a) for a in items]


def write_queries(path: Path, records: Iterable[Mapping]) -> None:
    write_jsonl(path, records)


# ----------------------------------------------------------------------------- documents


@dataclass
class Documents:
    """The document file, held compactly: ids and texts are fetched on demand by a second pass.

    ``source_codes[n]`` indexes ``source_names``; documents without a source get the code of
    ``"unknown"``. ``tokens`` is None when any document lacks a token count.
    """

    path: Path
    n: int
    source_codes: np.ndarray
    source_names: list[str]
    tokens: np.ndarray | None
    n_missing_source: int
    n_missing_tokens: int
    n_with_text: int

    def fetch(self, indices: Iterable[int]) -> dict[int, tuple[str, str | None]]:
        """(id, text or None) of the documents at the given file positions, in one streaming pass."""
        want = set(int(i) for i in indices)
        out: dict[int, tuple[str, str | None]] = {}
        if not want:
            return out
        last = max(want)
        with open(self.path, encoding="utf-8") as f:
            n = 0
            for line in f:
                if not line.strip():
                    continue
                if n in want:
                    obj = json.loads(line)
                    text = obj.get("text")
                    out[n] = (str(obj["id"]), text if isinstance(text, str) else None)
                    if n == last:
                        break
                n += 1
        return out


def read_documents(path: Path) -> Documents:
    """Read documents.jsonl into compact arrays (source codes, token counts, id hashes), in one pass."""
    path = Path(path)
    if not path.exists():
        raise AnalysisError(f"{path.name}: missing (expected at {path})")
    codes = array("i")
    tokens = array("q")
    hashes = array("q")
    names: dict[str, int] = {}
    n_missing_source = n_missing_tokens = n_text = 0
    for lineno, obj in iter_jsonl(path):
        did = obj.get("id")
        if type(did) is not str:
            if did is None:
                raise AnalysisError(f"{path.name} line {lineno}: missing field id")
            did = _id_str(did, f"{path.name} line {lineno}")
        hashes.append(hash(did))
        src = obj.get("source")
        code = names.get(src) if type(src) is str else None
        if code is None:
            if src is None or src == "":
                n_missing_source += 1
                src = UNKNOWN
            elif not isinstance(src, str):
                raise AnalysisError(f"{path.name} line {lineno}: field source must be a string, got {src!r}")
            code = names.setdefault(src, len(names))
        codes.append(code)
        tok = obj.get("tokens")
        if type(tok) is int and tok >= 0:
            tokens.append(tok)
        elif tok is None:
            n_missing_tokens += 1
            tokens.append(0)
        else:
            raise AnalysisError(f"{path.name} line {lineno}: field tokens must be a non-negative integer, got {tok!r}")
        if "text" in obj and isinstance(obj["text"], str):
            n_text += 1
    if not codes:
        raise AnalysisError(f"{path.name}: no documents")
    _check_unique_ids(path, np.frombuffer(hashes, np.int64))
    return Documents(
        path=path,
        n=len(codes),
        source_codes=np.frombuffer(codes, f"i{codes.itemsize}").astype(np.int32),
        source_names=list(names),
        tokens=None if n_missing_tokens else np.frombuffer(tokens, np.int64).copy(),
        n_missing_source=n_missing_source,
        n_missing_tokens=n_missing_tokens,
        n_with_text=n_text,
    )


def _check_unique_ids(path: Path, hashes: np.ndarray) -> None:
    """Duplicate ids are an error; hashes find candidates cheaply, a second pass confirms them."""
    order = np.argsort(hashes, kind="stable")
    sh = hashes[order]
    dup = np.flatnonzero(sh[1:] == sh[:-1])
    if dup.size == 0:
        return
    candidates = set(order[dup].tolist()) | set(order[dup + 1].tolist())
    first: dict[str, int] = {}
    n = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if n in candidates:
                did = str(json.loads(line)["id"])
                if did in first:
                    raise AnalysisError(f"{path.name} line {lineno}: duplicate id {did!r} (first on line {first[did]})")
                first[did] = lineno
            n += 1


def write_documents(path: Path, records: Iterable[Mapping]) -> None:
    write_jsonl(path, records)


# ----------------------------------------------------------------------------- scores


class ScoreMatrix:
    """A read-only view of ``scores.npy`` that reads rows or column chunks with ``pread``.

    Nothing is memory-mapped, so the resident memory is the chunk being processed, never the
    file. Only C-ordered 2-D floating-point arrays are accepted (``np.save`` of a C-contiguous
    array, as the pipeline writes).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.exists():
            raise AnalysisError(f"{self.path.name}: missing (expected at {self.path})")
        try:
            shape, fortran, dtype, self.offset = npy_header(self.path, self.path.name)
        except ArrayFileError as e:
            raise AnalysisError(str(e)) from None
        if dtype.kind != "f":
            raise AnalysisError(f"{self.path.name}: dtype {dtype} is not floating point")
        if len(shape) != 2:
            raise AnalysisError(f"{self.path.name}: expected a 2-D [queries, documents] array, got shape {shape}")
        if fortran and shape[0] > 1 and shape[1] > 1:
            raise AnalysisError(
                f"{self.path.name}: Fortran-ordered array; save it C-ordered (np.save(path, np.ascontiguousarray(scores)))"
            )
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = dtype  # a file shorter than its header says was refused by npy_header

    def _read(self, f, out_row: np.ndarray, q: int, start: int) -> None:
        nbytes = out_row.size * self.dtype.itemsize
        pos = self.offset + (q * self.shape[1] + start) * self.dtype.itemsize
        view = memoryview(out_row).cast("B")  # type: ignore[arg-type]  # an ndarray is a buffer
        got = 0
        while got < nbytes:
            n = os.preadv(f.fileno(), [view[got:]], pos + got)
            if n <= 0:
                raise AnalysisError(f"{self.path.name}: short read at byte {pos + got}")
            got += n

    def row(self, q: int) -> np.ndarray:
        """Row q as float64."""
        buf = np.empty(self.shape[1], self.dtype)
        with open(self.path, "rb") as f:
            self._read(f, buf, q, 0)
        return buf.astype(np.float64)

    def column_chunks(self, size: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first column, float64 [Q, c]) for consecutive chunks of at most ``size`` columns."""
        Q, N = self.shape
        buf = np.empty((Q, min(size, N)), self.dtype)
        with open(self.path, "rb") as f:
            for start in range(0, N, size):
                c = min(size, N - start)
                for q in range(Q):
                    self._read(f, buf[q, :c], q, start)
                yield start, buf[:, :c].astype(np.float64)


def write_scores(path: Path, scores: np.ndarray) -> None:
    """Write ``scores.npy`` (float32, C order), atomically."""
    atomic.save_npy(path, np.ascontiguousarray(scores, dtype=np.float32))


# ----------------------------------------------------------------------------- topk.jsonl


@dataclass
class TopK:
    """topk.jsonl, keyed by query id: lists of {"id", "source", "score", "snippet"}."""

    top: dict[str, list[dict]] = field(default_factory=dict)
    bottom: dict[str, list[dict]] = field(default_factory=dict)


def write_topk(path: Path, records: Iterable[Mapping]) -> None:
    """Write topk.jsonl: one ``{"query", "top": [...], "bottom": [...]}`` per query."""
    write_jsonl(path, records)


def read_topk(path: Path) -> TopK | None:
    path = Path(path)
    if not path.exists():
        return None
    out = TopK()
    for lineno, obj in iter_jsonl(path):
        where = f"{path.name} line {lineno}"
        if "query" not in obj:
            raise AnalysisError(f"{where}: missing field query")
        qid = _id_str(obj["query"], where)
        for key in ("top", "bottom"):
            lst = obj.get(key, [])
            if not isinstance(lst, list) or not all(isinstance(e, dict) and "id" in e for e in lst):
                raise AnalysisError(f"{where}: field {key} must be a list of objects with an id")
            getattr(out, key)[qid] = lst
    return out


# ----------------------------------------------------------------------------- layers and tokens


def write_layer_exports(run_dir: Path, names: Sequence[str], layer_scores: np.ndarray) -> None:
    """Write ``layers.json`` and ``layer_scores.npy`` ([Q, K, L], K in each query's topk.jsonl order)."""
    run_dir = Path(run_dir)
    layer_scores = np.asarray(layer_scores)
    if layer_scores.ndim != 3 or layer_scores.shape[2] != len(names):
        raise ValueError(f"layer_scores must be [Q, K, {len(names)}], got {layer_scores.shape}")
    atomic.write_json(run_dir / "layers.json", {"names": list(names)})
    atomic.save_npy(run_dir / "layer_scores.npy", np.ascontiguousarray(layer_scores, dtype=np.float32))


def read_layer_exports(run_dir: Path) -> tuple[list[str], np.ndarray] | None:
    """(names, layer_scores) or None when not exported; inconsistent files are an AnalysisError."""
    run_dir = Path(run_dir)
    lj, ls = run_dir / "layers.json", run_dir / "layer_scores.npy"
    if not lj.exists() and not ls.exists():
        return None
    if not lj.exists() or not ls.exists():
        missing = lj.name if not lj.exists() else ls.name
        raise AnalysisError(f"{missing}: missing while {(ls if missing == lj.name else lj).name} is present")
    try:
        meta = json.loads(lj.read_text())
    except json.JSONDecodeError as e:
        raise AnalysisError(f"layers.json: invalid JSON ({e.msg})") from None
    names = meta.get("names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise AnalysisError("layers.json: field names must be a non-empty list of strings")
    try:
        arr = load_npy(ls, name="layer_scores.npy")
    except ArrayFileError as e:
        raise AnalysisError(str(e)) from None
    if arr.ndim != 3 or arr.shape[2] != len(names):
        raise AnalysisError(
            f"layer_scores.npy: shape {arr.shape} but layers.json has {len(names)} names (expected [Q, K, {len(names)}])"
        )
    if arr.dtype.kind != "f":
        raise AnalysisError(f"layer_scores.npy: dtype {arr.dtype} is not floating point")
    bad = np.argwhere(~np.isfinite(arr))
    if bad.size:
        q, k, l = bad[0]
        raise AnalysisError(
            f"layer_scores.npy: non-finite value at query row {q}, top rank {k}, layer {l} ({names[l]})"
        )
    return names, arr.astype(np.float64)


def write_topk_tokens(path: Path, records: Iterable[Mapping]) -> None:
    """Write topk_tokens.jsonl: ``{"query", "document", "rank", "tokens": [{"text", "piece", "score"}...]}`` per line."""
    write_jsonl(path, records)


@dataclass
class TokenRecord:
    query: str
    document: str
    rank: int
    texts: list[str]
    scores: np.ndarray
    pieces: list[str] | None = None  # each token's decoded text in place, when exported


def iter_topk_tokens(path: Path) -> Iterator[TokenRecord]:
    path = Path(path)
    for lineno, obj in iter_jsonl(path):
        where = f"{path.name} line {lineno}"
        for key in ("query", "document", "rank", "tokens"):
            if key not in obj:
                raise AnalysisError(f"{where}: missing field {key}")
        toks = obj["tokens"]
        if not isinstance(toks, list) or not all(
            isinstance(t, dict)
            and isinstance(t.get("text"), str)
            and isinstance(t.get("score"), (int, float))
            and not isinstance(t.get("score"), bool)
            for t in toks
        ):
            raise AnalysisError(f"{where}: field tokens must be a list of {{text: str, score: number}}")
        given = [t.get("piece") for t in toks]
        pieces: list | None = None
        if any(p is not None for p in given):
            bad = next((i for i, p in enumerate(given) if not isinstance(p, str)), None)
            if bad is not None:
                raise AnalysisError(
                    f"{where}: field tokens[{bad}].piece must be a string (every token has one or none does)"
                )
            pieces = given
        scores = np.asarray([t["score"] for t in toks], np.float64)
        if not np.isfinite(scores).all():
            raise AnalysisError(
                f"{where}: non-finite token score at token {int(np.flatnonzero(~np.isfinite(scores))[0])}"
            )
        rank = obj["rank"]
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise AnalysisError(f"{where}: field rank must be a non-negative integer")
        yield TokenRecord(
            _id_str(obj["query"], where),
            _id_str(obj["document"], where),
            rank,
            [t["text"] for t in toks],
            scores,
            pieces,
        )


# ----------------------------------------------------------------------------- run.json


def read_run_record(run_dir: Path) -> dict:
    """The run's record: ``run.json``, or its copy ``state/run.json`` (with a warning) when ``run.json`` is damaged
    or missing, read by the one reader of both (:func:`jaxinf.run.rundir.read_record`); {} when the run has neither
    (a converted release); both damaged is one line naming both. A run.json of its ``config`` alone (scores another
    tool wrote, with a run.json written for them) is read as it is. Its ``config`` (the resolved config), ``cwd`` (the
    working directory ``jaxinf run`` was started in, against which the config's relative paths were read, absent in
    runs older than the field) and ``inputs`` (the fingerprint of each input's content) are what the report uses."""
    from jaxinf.run import rundir

    return rundir.read_record(Path(run_dir), config_only=True) or {}


def read_index_fidelity(path: Path) -> dict | None:
    """``index.json`` of a run scored from the EK-FAC index (each query's predicted correlation with the exact
    scores, the documents rescored to certify the tails), or None when there is none (exact scores)."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        return {
            "rescored_documents": int(data["rescored_documents"]),
            "predicted_correlation": {q["id"]: float(q["predicted_correlation"]) for q in data["queries"]},
        }
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AnalysisError(f"{path}: malformed index fidelity ({e})") from None
