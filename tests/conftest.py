"""Shared test helpers. Keep this file small; add fixtures below as needed."""

from __future__ import annotations

import os

import pytest


def require_or_skip(available: bool, reason: str) -> None:
    """Skip the test when an oracle, data set or tool is missing, unless JAXINF_REQUIRE_ORACLES=1
    (as in CI), where a missing one is a failure."""
    if available:
        return
    if os.environ.get("JAXINF_REQUIRE_ORACLES") == "1":
        pytest.fail(f"required by JAXINF_REQUIRE_ORACLES=1 but missing: {reason}")
    pytest.skip(reason)
