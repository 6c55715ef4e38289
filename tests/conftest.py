"""Shared test helpers. Keep this file minimal.

Oracles and data that live outside the repository (``../shared/...``) are
optional by default: a test that needs one skips with the reason. With
``JAXINF_REQUIRE_ORACLES=1`` in the environment a missing one fails the test
instead, so a full check cannot pass by skipping.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

# No shared token-count cache in ~/.cache (jaxinf.run.inputs.token_count_cache): every test counts its own corpus,
# as a first run does, unless it turns the cache on itself (tests/test_plan_corpus.py). Subprocesses inherit it.
os.environ.setdefault("JAXINF_TOKEN_COUNTS", "")


def require_oracle(what: str | os.PathLike | bool, reason: str):
    """``what`` (a path that must exist, or a flag that must be true); else skip with ``reason``, or fail under JAXINF_REQUIRE_ORACLES=1."""
    ok = what if isinstance(what, bool) else Path(what).exists()
    if ok:
        return what
    if os.environ.get("JAXINF_REQUIRE_ORACLES") == "1":
        pytest.fail(f"required oracle missing under JAXINF_REQUIRE_ORACLES=1: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(name="require_oracle")
def _require_oracle_fixture():
    """The :func:`require_oracle` rule, as a fixture."""
    return require_oracle


def oracle(name: str):
    """The imported oracle module ``name`` (torch, transformers, ...), through :func:`require_oracle`."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        require_oracle(False, f"oracle {name} cannot be imported ({e})")


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """``hf_checkpoint(name, dtype=None)``: the directory of a tiny random transformers checkpoint.

    ``name`` is a key of ``models_support.CHECKPOINTS``; ``dtype`` (a torch dtype
    name such as "bfloat16") casts the weights before saving. Built once per session.
    """
    built = {}

    def get(name: str, dtype: str | None = None):
        import models_support

        key = (name, dtype)
        if key not in built:
            torch_dtype = None if dtype is None else getattr(oracle("torch"), dtype)
            built[key] = models_support.save_checkpoint(
                name, tmp_path_factory.mktemp(f"{name}-{dtype or 'float32'}"), dtype=torch_dtype
            )
        return built[key]

    return get
