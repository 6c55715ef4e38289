"""What is validated: a model, its documents and its queries as arrays (the built-in world or a config's).

The built-in world is derived from the demo (:mod:`jaxinf.demo`): the first
``n_documents`` documents of the demo corpus, the demo's word-level tokenizer,
a Llama of the demo's family shrunk until hundreds of retrainings fit in
minutes on two CPU cores, and the demo's factual and reasoning prompts with
their correct answers as completions (so the measurement is the NLL of the
right answer). Factual queries carry ``supports``: the indices of the
documents that state their fact (:func:`jaxinf.demo.corpus.supports`).

A config's world reads ``model.checkpoint``, ``data.documents`` and
``data.queries`` with the library's readers; documents are truncated to
``data.max_length`` tokens and ``supports`` ids are resolved to document
indices (an unknown id is an error naming the query).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxinf import config as cfg
from jaxinf.errors import UserError


class ValidationError(UserError):
    """Bad input to ``jaxinf validate`` or a retraining that cannot go on (one line, naming what)."""


@dataclasses.dataclass(frozen=True)
class World:
    """``lm`` (architecture and starting parameters), documents and queries as padded causal-LM batches.

    ``documents`` and ``queries`` are numpy dicts with ``tokens``, ``mask``, ``weights`` ``[N or Q, T]``;
    ``supports[q]`` lists the document indices known to carry query q's answer (empty when unknown).
    """

    lm: Any
    documents: dict[str, np.ndarray]
    doc_ids: list[str]
    doc_sources: list[str]
    queries: dict[str, np.ndarray]
    query_ids: list[str]
    query_kinds: list[str | None]
    supports: list[list[int]]
    track: Any
    name: str

    @property
    def num_documents(self) -> int:
        return len(self.doc_ids)


BUILTIN_MODEL = dict(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)


def builtin(n_documents: int = 128, per_task: int = 6, seed: int = 0) -> World:
    """The built-in world (module docstring): demo corpus and queries, a one-layer Llama at initialization."""
    from jaxinf import models
    from jaxinf.demo import corpus, train
    from jaxinf.engine import tasks

    docs = corpus.documents(seed, n_documents)
    texts = [d["text"] for d in docs]
    tok = train.build_tokenizer(texts + [q.prompt + " " + q.next for q in corpus.queries(seed, per_task)])
    ids = [e.ids for e in tok.encode_batch(texts)]
    T = int(max(map(len, ids)))
    queries = [q for q in corpus.queries(seed, per_task) if q.next]
    bos = tok.token_to_id("<bos>")
    q_ids = [
        [bos] + tok.encode(q.prompt, add_special_tokens=False).ids + tok.encode(q.next, add_special_tokens=False).ids
        for q in queries
    ]
    prompt_lengths = [1 + len(tok.encode(q.prompt, add_special_tokens=False).ids) for q in queries]
    hf = train.hf_config(tok.get_vocab_size(), max_positions=max(T, max(map(len, q_ids))), **BUILTIN_MODEL)
    lm = models.init(models.config_from_hf(hf), seed)
    sup = [corpus.supports(docs, q) for q in queries]
    index = {d["id"]: i for i, d in enumerate(docs)}
    return World(
        lm=lm,
        documents=_numpy(tasks.lm_batch(ids, T)),
        doc_ids=[d["id"] for d in docs],
        doc_sources=[d["source"] for d in docs],
        queries=_numpy(tasks.lm_batch(q_ids, None, prompt_lengths)),
        query_ids=[q.id for q in queries],
        query_kinds=[q.kind for q in queries],
        supports=[[index[s] for s in ss] for ss in sup],
        track="all",
        name=f"built-in: {n_documents} demo documents, {len(queries)} queries, Llama {BUILTIN_MODEL}",
    )


def from_config(config: cfg.Config) -> World:
    """The world of a config: ``model.checkpoint``, ``data.documents``, ``data.queries`` (module docstring)."""
    from jaxinf import models
    from jaxinf.data.queries import read_queries, support_rows
    from jaxinf.data.tokenize import TextEncoder
    from jaxinf.engine import tasks
    from jaxinf.run.inputs import check_queries, open_corpus

    for name in ("checkpoint",):
        if getattr(config.model, name) is None:
            raise ValidationError(
                f"model.{name}: needed by jaxinf validate with a config (omit the config for the built-in world)"
            )
    for name in ("documents", "queries"):
        if getattr(config.data, name) is None:
            raise ValidationError(f"data.{name}: needed by jaxinf validate with a config")
    assert (
        config.model.checkpoint is not None
        and config.data.documents is not None  # refused above
        and config.data.queries is not None
    )
    lm, tokenizer = models.from_hf(config.model.checkpoint, dtype=config.model.dtype, scan=config.model.scan_layers)
    encoder = TextEncoder(tokenizer)
    source = open_corpus(config)
    docs = source.documents(range(len(source)))
    ids = [
        e[: config.data.max_length].tolist()
        for e in encoder.encode_documents([d.text for d in docs], config.data.max_length)
    ]
    queries = read_queries(config.data.queries)
    encoded = check_queries(queries, encoder, config)  # jaxinf run's checks and warnings (unknown words)
    supports = support_rows(queries, (d.id for d in docs), getattr(source, "duplicate_of", None))
    return World(
        lm=lm,
        documents=_numpy(tasks.lm_batch(ids, max(map(len, ids)))),
        doc_ids=[d.id for d in docs],
        doc_sources=[d.source or "" for d in docs],
        queries=_numpy(tasks.lm_batch([e.ids.tolist() for e in encoded], None, [e.prompt_length for e in encoded])),
        query_ids=[q.id for q in queries],
        query_kinds=[q.kind for q in queries],
        supports=supports,
        track=config.factors.track,
        name=f"{config.model.checkpoint}: {len(docs)} documents of {config.data.documents}, {len(queries)} queries",
    )


def _numpy(batch: dict) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in batch.items()}
