"""scripts/bf16_agreement.py's metrics (docs/benchmarks.md's bfloat16 table) on synthetic score matrices."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bf16_agreement.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("bf16_agreement", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_agreement_of_identical_scaled_and_reversed_matrices(script):
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((3, 50))
    same = script.agreement(ref.copy(), ref)
    assert same["min_pearson"] == pytest.approx(1) and same["min_spearman"] == pytest.approx(1)
    assert same["min_top"] == same["min_bottom"] == 1
    assert same["max_entry_error"] == same["rel_error"] == 0
    # a wrong scale leaves every ranking intact: only the errors can see it
    double = script.agreement(2 * ref, ref)
    assert double["min_pearson"] == pytest.approx(1) and double["min_top"] == 1
    assert double["rel_error"] == pytest.approx(1) and double["max_entry_error"] == pytest.approx(1)
    flipped = script.agreement(-ref, ref)
    assert flipped["mean_pearson"] == pytest.approx(-1)
    assert flipped["mean_top"] == flipped["mean_bottom"] == 0


def test_agreement_reports_the_worst_query_and_both_tails(script):
    ref = np.tile(np.arange(30, dtype=float), (2, 1))
    x = ref.copy()
    x[1, [0, 29]] = x[1, [29, 0]]  # query 1: the most and the least influential documents swap places
    a = script.agreement(x, ref, k=10)
    assert a["min_top"] == a["min_bottom"] == pytest.approx(0.9)
    assert a["mean_top"] == pytest.approx(0.95)
    assert a["min_pearson"] < a["mean_pearson"] < 1
    assert a["max_entry_error"] == pytest.approx(1)  # |0 - 29| / 29
    with pytest.raises(ValueError, match="one shape"):
        script.agreement(x[:, :-1], ref)


def test_factor_errors_take_the_worst_layer(script):
    eye = np.eye(4)
    ref = {"a": {"A": eye, "S": eye, "Lambda": eye}, "b": {"A": eye, "S": eye, "Lambda": eye}}
    x = {"a": {"A": eye, "S": 1.1 * eye, "Lambda": eye}, "b": {"A": 1.5 * eye, "S": eye, "Lambda": eye}}
    assert script.factor_errors(x, ref) == pytest.approx({"A": 0.5, "S": 0.1, "Lambda": 0.0})
    with pytest.raises(ValueError, match="different modules"):
        script.factor_errors({"a": x["a"]}, ref)
