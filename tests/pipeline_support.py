"""A tiny world for pipeline tests: a checkpoint directory, a corpus, queries and a config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def make_world(root: Path, n_documents: int = 48, n_queries: int = 6, seed: int = 0) -> dict:
    """Writes ``model/`` (a random tiny Llama with a word-level tokenizer), ``docs.jsonl`` and ``queries.jsonl``."""
    from jaxinf import models
    from jaxinf.demo import corpus, train

    root.mkdir(parents=True, exist_ok=True)
    docs = corpus.documents(seed, n_documents)
    queries = corpus.queries(seed, per_task=2)[:n_queries]
    texts = [d["text"] for d in docs] + [q.prompt + " 1 2 3 ." for q in queries]
    tok = train.build_tokenizer(texts)
    hf = train.hf_config(
        tok.get_vocab_size(), hidden=32, layers=2, heads=4, kv_heads=2, intermediate=48, max_positions=64
    )
    lm = models.init(models.config_from_hf(hf), seed)
    models.save_hf(lm, root / "model", hf, tok)
    with open(root / "docs.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    with open(root / "queries.jsonl", "w") as f:
        for i, q in enumerate(queries):  # the first query names a supporting document (exported as given)
            f.write(
                json.dumps(
                    {
                        "id": q.id,
                        "prompt": q.prompt,
                        "completion": "1 2 3 .",
                        "kind": q.kind,
                        "task": q.task,
                        "answer": q.answer or None,
                        **({"supports": [docs[0]["id"]]} if i == 0 else {}),
                    }
                )
                + "\n"
            )
    return {"model": root / "model", "docs": root / "docs.jsonl", "queries": root / "queries.jsonl"}


def overrides(world: dict, out: Path, **extra) -> list[str]:
    base = {
        "model.checkpoint": world["model"],
        "data.documents": world["docs"],
        "data.queries": world["queries"],
        "data.max_length": 48,
        "data.batch_size": 4,
        "factors.save_every": 2,
        "scores.save_every": 2,
        "scores.topk": 3,
        "run.out": out,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def env(cache_dir: Path) -> dict:
    """Environment for ``jaxinf`` subprocesses: the repository importable, one shared compilation cache."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    e["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    e["PYTHONUNBUFFERED"] = "1"
    return e


def jaxinf(args: list[str], environment: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jaxinf", *map(str, args)], capture_output=True, text=True, env=environment, **kw
    )
