"""The persistent compilation cache that jaxinf run and demo turn on: where it goes, and that it is used."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = """
from jaxinf.cli import enable_compilation_cache
print(enable_compilation_cache())
import jax, jax.numpy as jnp
jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()
"""


def _run(env_value):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    if env_value is not None:
        env["JAXINF_COMPILATION_CACHE"] = env_value
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()[-1]


def test_programs_are_cached_in_the_configured_directory_and_can_be_turned_off(tmp_path):
    cache = tmp_path / "xla"
    assert _run(str(cache)) == str(cache)
    first = sorted(p.name for p in cache.iterdir())
    assert any(name.startswith("jit__lambda") for name in first)
    assert _run(str(cache)) == str(cache)  # a second process finds the same entries
    assert sorted(p.name for p in cache.iterdir()) == first
    assert _run("") == "None"  # empty: off
