"""Queries: JSONL as in the design, and the release format of Ruis et al. (2024).

JSONL, one object per line (only ``prompt`` and ``completion`` required)::

    {"id": "q7", "prompt": "...", "completion": "...", "kind": "reasoning", "task": "slopes", "answer": "-43"}

- ``prompt``: a string (it may be empty when the tokenizer puts a BOS token in front).
- ``completion``: a non-empty string (empty or only whitespace is an error naming the query).
- ``id``: a string or integer, default the 1-based line number; unique in the file.
- ``kind``: ``factual``, ``reasoning`` or ``control`` when given; ``task``: a string;
  ``answer``: a string or a finite number (kept as text); ``supports``: a list of ids (strings or integers) of the
  documents known to carry the answer (recall in ``jaxinf validate``). Other fields go to ``extra``.

The release format (``../shared/data/ruis2024/release_*.json``): one JSON object
with ``model`` (``"7B"`` or ``"35B"``), ``test_ids``, ``prompts`` and
``completions`` (100 each). Kinds and tasks follow the paper's index ranges:
0-39 factual (``factual``); 40-59 reasoning (``two_step_arithmetic`` for 7B,
``linear_equations`` for 35B); 60-79 reasoning (``slopes``); 80-89 control
(``factual_control``); 90-99 control (``reasoning_control``).

Query tokens are the prompt's tokens followed by the completion's, each
encoded on its own (:meth:`jaxinf.data.tokenize.TextEncoder.encode_queries`);
only the completion's tokens are targets (``weights``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jaxinf.data.batching import Batch, bucket_lengths
from jaxinf.data.documents import (
    STRICT_JSON,
    Document,
    DuplicateKey,
    _iter_raw_lines,
    check_id,
    check_string,
    decode_line,
)
from jaxinf.data.errors import DataError, type_name, where
from jaxinf.data.tokenize import EncodedQuery, TextEncoder

KINDS = ("factual", "reasoning", "control")

# (first index, last index, kind, task for 7B, task for 35B), from the paper's release.
RELEASE_LAYOUT = (
    (0, 39, "factual", "factual", "factual"),
    (40, 59, "reasoning", "two_step_arithmetic", "linear_equations"),
    (60, 79, "reasoning", "slopes", "slopes"),
    (80, 89, "control", "factual_control", "factual_control"),
    (90, 99, "control", "reasoning_control", "reasoning_control"),
)


@dataclass(frozen=True)
class Query:
    """One query. ``index`` is its row in the scores; ``origin`` says where it came from (for messages)."""

    index: int
    id: str
    prompt: str
    completion: str
    kind: str | None = None
    task: str | None = None
    answer: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    origin: str = ""
    supports: tuple[str, ...] = ()


def _check_completion(completion: str, qid: str, at: str) -> None:
    if not completion.strip():
        raise DataError(f'{at}: query "{qid}" has an empty completion')


def parse_query(obj: Any, path: str, line: int, index: int) -> Query:
    """The validated query of one JSONL line; :class:`DataError` naming file, line and field otherwise."""
    at = where(path, line)
    if not isinstance(obj, dict):
        raise DataError(f"{at}: expected a JSON object, got {type_name(obj)}")
    for name in ("prompt", "completion"):
        if name not in obj:
            raise DataError(f'{at}: missing field "{name}"')
    prompt = check_string(obj["prompt"], "prompt", path, line)
    completion = check_string(obj["completion"], "completion", path, line)
    qid = check_id(obj["id"], path, line) if "id" in obj else str(line)
    _check_completion(completion, qid, at)
    kind = obj.get("kind")
    if kind is not None and kind not in KINDS:
        shown = json.dumps(kind) if isinstance(kind, str) else type_name(kind)
        raise DataError(f'{at}: field "kind" must be one of {", ".join(KINDS)}, got {shown}')
    task = check_string(obj["task"], "task", path, line) if obj.get("task") is not None else None
    answer = obj.get("answer")
    if answer is not None:
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise DataError(f'{at}: field "answer" must be a string or a number, got {type_name(answer)}')
        if isinstance(answer, float) and not math.isfinite(answer):  # NaN, 1e999: kept as the text "NaN"
            raise DataError(f'{at}: field "answer" must be a string or a finite number, got {json.dumps(answer)}')
        answer = check_string(answer, "answer", path, line) if isinstance(answer, str) else json.dumps(answer)
    supports = obj.get("supports")
    if supports is None:
        supports = []
    if not isinstance(supports, list):
        raise DataError(f'{at}: field "supports" must be a list of document ids, got {type_name(supports)}')
    supports = tuple(check_id(s, f'{at}: field "supports" item {i}', None) for i, s in enumerate(supports))
    extra = {
        k: v for k, v in obj.items() if k not in ("id", "prompt", "completion", "kind", "task", "answer", "supports")
    }
    return Query(
        index=index,
        id=qid,
        prompt=prompt,
        completion=completion,
        kind=kind,
        task=task,
        answer=answer,
        extra=extra,
        origin=at,
        supports=supports,
    )


def _check_unique(queries: Sequence[Query]) -> None:
    seen: dict[str, str] = {}
    for q in queries:
        if q.id in seen:
            raise DataError(f'{q.origin}: duplicate query id "{q.id}" (first at {seen[q.id]})')
        seen[q.id] = q.origin


def support_rows(
    queries: Sequence[Query], document_ids: Iterable[str], duplicate_of: Callable[[str], str | None] | None = None
) -> list[list[int]]:
    """Each query's ``supports`` as rows of the documents whose ids ``document_ids`` lists in document order; a
    :class:`DataError` naming the query and the first id no document has. Only the ids some query names are kept
    (``document_ids`` may be a pass over millions). The one check of ``supports`` (``jaxinf run``, ``query``,
    ``validate``).

    ``duplicate_of`` (the corpus's, with ``data.dedupe: exact``): the id of the document kept in place of a skipped
    duplicate, so that an id the corpus has but skipped is named as such, with the id to name instead."""
    wanted = {s for q in queries for s in q.supports}
    rows: dict[str, int] = {}
    if wanted:
        for i, doc_id in enumerate(document_ids):
            if doc_id in wanted:
                rows[doc_id] = i
    for q in queries:
        missing = [s for s in q.supports if s not in rows]
        if missing:
            kept = duplicate_of(missing[0]) if duplicate_of is not None else None
            if kept is not None:
                raise DataError(
                    f'{q.origin}: query "{q.id}": supports names document "{missing[0]}", which data.dedupe: exact '
                    f'skipped as a duplicate of "{kept}" (the same text); name "{kept}" instead'
                )
            raise DataError(f'{q.origin}: query "{q.id}": supports names unknown document id "{missing[0]}"')
    return [[rows[s] for s in q.supports] for q in queries]


def read_queries_jsonl(path: str | os.PathLike) -> list[Query]:
    """The queries of a JSONL file in file order (blank lines skipped); :class:`DataError` on bad input."""
    path = str(path)
    out: list[Query] = []
    for number, _, raw in _iter_raw_lines(path):
        obj = decode_line(raw, path, number, strip_bom=number == 1)
        if obj is not None:
            out.append(parse_query(obj, path, number, len(out)))
    if not out:
        raise DataError(f"{path}: no queries")
    _check_unique(out)
    return out


def _load_release(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    try:
        obj = STRICT_JSON.decode(raw.decode("utf-8"))
    except DuplicateKey as e:
        raise DataError(f'{path}: field "{e.args[0]}" appears twice (which one is meant?)') from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: invalid UTF-8 at byte {e.start + 1}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON object, got {type_name(obj)}")
    return obj


def _release_list(obj: dict, name: str, path: str, n: int | None) -> list:
    if name not in obj:
        raise DataError(f'{path}: missing field "{name}"')
    value = obj[name]
    if not isinstance(value, list) or (n is not None and len(value) != n):
        got = f"{len(value)} items" if isinstance(value, list) else type_name(value)
        raise DataError(f'{path}: field "{name}" must be a list of {n} items, got {got}')
    return value


def read_release(path: str | os.PathLike) -> list[Query]:
    """The 100 queries of a release file of Ruis et al., with kinds and tasks by index range (module docstring)."""
    path = str(path)
    obj = _load_release(path)
    model = obj.get("model")
    if model not in ("7B", "35B"):
        raise DataError(f'{path}: field "model" must be "7B" or "35B", got {json.dumps(model)}')
    n = RELEASE_LAYOUT[-1][1] + 1
    ids = _release_list(obj, "test_ids", path, n)
    prompts = _release_list(obj, "prompts", path, n)
    completions = _release_list(obj, "completions", path, n)
    out = []
    for lo, hi, kind, task7, task35 in RELEASE_LAYOUT:
        for i in range(lo, hi + 1):
            at = f"{path}: query {i}"
            qid = check_id(ids[i], f'{path}: field "test_ids" item {i}', None)
            prompt = check_string(prompts[i], f"prompts[{i}]", path, None)
            completion = check_string(completions[i], f"completions[{i}]", path, None)
            _check_completion(completion, qid, at)
            out.append(
                Query(
                    index=i,
                    id=qid,
                    prompt=prompt,
                    completion=completion,
                    kind=kind,
                    task=task7 if model == "7B" else task35,
                    extra={"model": model},
                    origin=at,
                )
            )
    _check_unique(out)
    return out


def release_documents(path: str | os.PathLike) -> list[Document]:
    """The documents a release file ships (``training_ids``, ``training_sequences``, ``training_sources``), in its order."""
    path = str(path)
    obj = _load_release(path)
    ids = _release_list(obj, "training_ids", path, None)
    texts = _release_list(obj, "training_sequences", path, len(ids))
    sources = _release_list(obj, "training_sources", path, len(ids))
    return [
        Document(
            index=i,
            id=check_id(ids[i], f'{path}: field "training_ids" item {i}', None),
            text=check_string(texts[i], f"training_sequences[{i}]", path, None),
            source=check_string(sources[i], f"training_sources[{i}]", path, None),
            line=i,
        )
        for i in range(len(ids))
    ]


def read_queries(path: str | os.PathLike) -> list[Query]:
    """Queries of ``data.queries``: a ``.jsonl`` file, or a release ``.json`` file of Ruis et al."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: no such file")
    if p.suffix == ".json":
        return read_release(p)
    return read_queries_jsonl(p)


def encode_queries(
    queries: Sequence[Query], encoder: TextEncoder, *, max_length: int | None = None
) -> list[EncodedQuery]:
    """Tokens of every query (prefix + prompt + completion) and where its completion starts.

    Raises :class:`DataError` naming the query when its completion has no
    tokens, when nothing precedes the completion (no prompt tokens and no BOS,
    so its first token could not be a target), or when it is longer than ``max_length``.
    """
    encoded = encoder.encode_queries([q.prompt for q in queries], [q.completion for q in queries])
    for q, e in zip(queries, encoded):
        if e.completion_length == 0:
            raise DataError(f'{q.origin}: query "{q.id}": the completion has no tokens')
        if e.prompt_length == 0:
            raise DataError(
                f'{q.origin}: query "{q.id}": nothing precedes the completion (empty prompt and no BOS '
                "token), so its first token cannot be predicted"
            )
        if max_length is not None and len(e.ids) > max_length:
            raise DataError(
                f'{q.origin}: query "{q.id}" has {len(e.ids)} tokens, more than data.max_length ({max_length})'
            )
    return encoded


def query_batches(
    encoded: Sequence[EncodedQuery], *, batch_size: int | None = None, max_length: int | None = None
) -> list[Batch]:
    """Query batches in query order, all of one shape ``[B, T]`` (one compilation).

    ``B`` is ``batch_size``, or the number of queries when that is fewer (a batch
    never holds only padding rows; default: all queries in one batch); the last
    batch is filled with padding rows (mask 0, ``index`` -1). ``T`` is the smallest
    bucket length of ``max_length`` that holds the longest query (default: the
    longest query). Keys: ``tokens``, ``mask``, ``weights`` (1 exactly at the
    completion tokens) and ``index`` (the query's row, -1 for padding).
    """
    if not encoded:
        raise DataError("data.queries: no queries")
    longest = max(len(e.ids) for e in encoded)
    buckets = bucket_lengths(max_length if max_length is not None else longest)
    if longest > buckets[-1]:
        raise DataError(f"data.max_length: a query has {longest} tokens, more than {buckets[-1]}")
    T = next(b for b in buckets if b >= longest)
    B = min(batch_size or len(encoded), len(encoded))
    out = []
    for lo in range(0, len(encoded), B):
        batch = {
            "tokens": np.zeros((B, T), np.int32),
            "mask": np.zeros((B, T), np.float32),
            "weights": np.zeros((B, T), np.float32),
            "index": np.full((B,), -1, np.int32),
        }
        for j, e in enumerate(encoded[lo : lo + B]):
            n = len(e.ids)
            batch["tokens"][j, :n] = e.ids
            batch["mask"][j, :n] = 1.0
            batch["weights"][j, e.prompt_length : n] = 1.0
            batch["index"][j] = lo + j
        out.append(batch)
    return out
