"""The keys of ``jaxinf validate``'s work directory (:mod:`jaxinf.validate.driver`): each a hash of what a result
depends on, the content of the world (:func:`world_fingerprint`), the code (:func:`code_version`) and the settings
that change it (:func:`training_settings`, :func:`retraining_settings`, :func:`scores_settings`), so that nothing
stale is ever reused."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import jax
import numpy as np

from jaxinf import config as cfg
from jaxinf.atomic import ArrayFileError, write_json
from jaxinf.validate.world import World

log = logging.getLogger("jaxinf")
T = TypeVar("T")


def saved(path: Path, read: Callable[[Path], T]) -> T | None:
    """What ``read`` gets from the file ``path`` of the work directory, or None when it is missing or damaged (cut
    short or garbage: jaxinf writes each atomically, so a hand or another program did it), with a warning naming it:
    the result is computed again, as a damaged PBRF chunk is (:func:`jaxinf.validate.pbrf`)."""
    if not path.exists():
        return None
    try:
        return read(path)
    except (OSError, ValueError, KeyError, EOFError) as e:
        why = e.reason if isinstance(e, ArrayFileError) else " ".join(str(e).split())[:160]
        log.warning("%s: unreadable (%s); computing it again", path, why)
        return None


def code_version() -> str:
    """A hash of the code that computes every result: the source of every ``jaxinf`` module and the versions of
    jax, jaxlib, flax and optax (any change to any of them is a new key: nothing computed by other code is kept)."""
    global _CODE_VERSION
    if _CODE_VERSION is None:
        import importlib.metadata as md

        import jaxinf

        h = hashlib.sha256()
        root = Path(jaxinf.__file__).parent
        for f in sorted(root.rglob("*.py")):
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
        for name in ("jax", "jaxlib", "flax", "optax"):
            try:
                h.update(f"{name}={md.version(name)}\0".encode())
            except md.PackageNotFoundError:
                pass
        _CODE_VERSION = h.hexdigest()[:16]
    return _CODE_VERSION


_CODE_VERSION: str | None = None


def _hash_arrays(h, named) -> None:
    for name, x in named:
        x = np.ascontiguousarray(np.asarray(x))
        h.update(f"{name}|{x.dtype.str}|{x.shape}\0".encode())
        h.update(x.tobytes())


def world_fingerprint(world: World) -> str:
    """A hash of the content validate trains and measures on: the documents' and queries' token, mask and weight
    arrays (so the files as read and tokenized, not their paths), the documents' ids, the starting parameters and
    the architecture."""
    h = hashlib.sha256()
    _hash_arrays(h, sorted(world.documents.items()))
    _hash_arrays(h, (("q:" + k, v) for k, v in sorted(world.queries.items())))
    h.update(json.dumps(world.doc_ids).encode())
    h.update(repr(world.lm.config).encode())
    _hash_arrays(h, ((jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(world.lm.params)))
    return h.hexdigest()


def key(relevant: dict) -> str:
    """The key of ``relevant``: the first 16 hex digits of the SHA-256 of its sorted JSON."""
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def training_settings(config: cfg.Config, world_fp: str) -> dict:
    """Everything the full model and the retrainings depend on."""
    v = config.validate
    return dict(
        code=code_version(),
        world=world_fp,
        start=v.start,
        steps=v.steps,
        lr=v.learning_rate,
        batch=v.batch_size,
        fraction=v.fraction,
        seed=v.seed,
    )


def retraining_settings(config: cfg.Config, training: dict) -> dict:
    """Everything the retrainings depend on beyond the training key: the protocol (docs/validation.md)."""
    return dict(
        training=key(training), subset_steps=config.validate.subset_steps, subset_init=config.validate.subset_init
    )


def scores_settings(config: cfg.Config, training: dict, layers) -> dict:
    """Everything the scores depend on beyond the strategy and damping (which name their files)."""
    return dict(
        training=key(training), layers=sorted(layers), fisher=config.factors.fisher, factors_seed=config.factors.seed
    )


def keyed_dir(root: Path, relevant: dict) -> Path:
    """``root/<hash of relevant>``, with ``key.json`` recording what was hashed."""
    d = root / key(relevant)
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "key.json").exists():
        write_json(d / "key.json", relevant)
    return d
