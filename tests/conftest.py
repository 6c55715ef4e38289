"""Shared test helpers."""

import importlib
import os

import pytest


def require_oracle(available: bool, reason: str) -> None:
    """Skip when an oracle (kronfluence, transformers, chromium, ../shared data) is absent.

    In CI (``JAXINF_REQUIRE_ORACLES=1``, set by .ci/run) an absent oracle fails the test instead.
    """
    if available:
        return
    if os.environ.get("JAXINF_REQUIRE_ORACLES") == "1":
        pytest.fail(f"required oracle missing: {reason}")
    pytest.skip(reason)


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
                name, tmp_path_factory.mktemp(f"{name}-{dtype or 'float32'}"), dtype=torch_dtype)
        return built[key]

    return get
