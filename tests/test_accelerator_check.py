"""scripts/accelerator_check.sh at tiny shapes on the CPU, so that the accelerator check cannot rot (heavy)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.heavy
def test_accelerator_check_runs_end_to_end_at_tiny_shapes(tmp_path):
    env = {
        **os.environ,
        "JAXINF_CHECK_SMALL": "1",
        "PYTHONPATH": str(ROOT),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "accelerator_check.sh"), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    names = ("devices.txt", "engine_float32.md", "engine_bfloat16.md", "vs_kronfluence.json", "parity.txt")
    for name in (*names, "compile_ahead.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    for dtype in ("float32", "bfloat16"):
        table = (tmp_path / f"engine_{dtype}.md").read_text()
        assert f"({dtype})" in table and "| scores (4 queries, rank 4) |" in table
        mfu = [line.rsplit("|", 2)[-2].strip() for line in table.splitlines() if line.startswith("| scores (")]
        assert mfu and mfu[0].endswith("%"), table
    assert " passed" in (tmp_path / "parity.txt").read_text()
    assert "same bits in every round: True" in (tmp_path / "compile_ahead.md").read_text()
