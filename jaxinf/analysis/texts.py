"""Where the analysis gets document texts (to search answers and show snippets) when documents.jsonl has none.

A text source maps document ids to texts: the corpus JSONL named in ``run.json``
(:func:`jsonl_text_source`), or any callable the caller passes (``jaxinf run`` passes one
that streams its corpus, JSONL or TFDS alike).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

#: A text source maps document ids (as strings) to their texts; ids it cannot find are
#: simply absent from the result. The pipeline may pass any such callable (e.g. a TFDS reader).
TextSource = Callable[[Sequence[str]], Mapping[str, str]]

_LEADING_ID = re.compile(r'\s*\{\s*"id"\s*:\s*("(?:[^"\\]|\\.)*"|-?\d+)\s*[,}]')


def jsonl_text_source(path: Path) -> TextSource:
    """A text source over a corpus JSONL file (``{"id", "text", ...}`` lines), read in one streaming pass per call."""
    path = Path(path)

    def texts(ids: Sequence[str]) -> dict[str, str]:
        want = set(map(str, ids))
        out: dict[str, str] = {}
        if not want:
            return out
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                m = _LEADING_ID.match(line)  # lines that start with their id are skipped unparsed
                if m is not None and str(json.loads(m.group(1))) not in want:
                    continue
                obj = json.loads(line)
                did = str(obj.get("id"))
                if did in want and did not in out and isinstance(obj.get("text"), str):
                    out[did] = obj["text"]
                    if len(out) == len(want):
                        break
        return out

    return texts


def corpus_changed(path: Path, record: Mapping, data: Mapping) -> str | None:
    """Why the corpus file ``path`` is not the one the run of ``record`` (its run.json) scored, or None when it is.

    The file is opened as the run opened it (``data``: the record's ``config.data``) and its kept documents' digest
    (:meth:`jaxinf.data.documents.JsonlDocuments.content_digest`) compared with the record's
    ``inputs.documents``; a run that recorded no content digest (a source read by name or listing) is not checked.
    """
    from jaxinf.data.errors import DataError
    from jaxinf.data.sources import open_documents

    try:
        recorded = record["inputs"]["documents"]
        count, digest = int(recorded["count"]), str(recorded["sha256"])
    except (ValueError, KeyError, TypeError):
        return None
    if recorded.get("kind") in ("name", "stat"):
        return None
    fields = {k: data[k] for k in ("text_field", "id_field", "source_field", "dedupe") if isinstance(data.get(k), str)}
    try:
        now = open_documents(path, **fields)
    except DataError as e:
        return str(e)
    content = getattr(now, "content_digest", None)
    if content is None or (len(now), content()) == (count, digest):
        return None
    return f"{path}: its documents changed since the run scored them"
