"""Shared test helpers. Keep this file minimal.

Oracles and data that live outside the repository (``../shared/...``) are
optional by default: a test that needs one skips with the reason. With
``JAXINF_REQUIRE_ORACLES=1`` in the environment a missing one fails the test
instead, so a full check cannot pass by skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def require_oracle(what: str | os.PathLike | bool, reason: str):
    """``what`` (a path that must exist, or a flag that must be true); else skip with ``reason``, or fail under JAXINF_REQUIRE_ORACLES=1."""
    ok = what if isinstance(what, bool) else Path(what).exists()
    if ok:
        return what
    if os.environ.get("JAXINF_REQUIRE_ORACLES") == "1":
        pytest.fail(f"{reason} (required: JAXINF_REQUIRE_ORACLES=1)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(name="require_oracle")
def _require_oracle_fixture():
    """The :func:`require_oracle` rule, as a fixture."""
    return require_oracle
