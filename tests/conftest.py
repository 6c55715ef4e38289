"""Shared test helpers."""

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
