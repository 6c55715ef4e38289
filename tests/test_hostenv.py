"""The C heap setting of ``jaxinf.hostenv.reuse_freed_memory``: when it applies, and that it stops the page faults."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from jaxinf.hostenv import computes_on_cpu, reuse_freed_memory

ROOT = Path(__file__).resolve().parents[1]

# Each call of the jitted function writes a fresh 64 MiB output; deleting it frees the block for a later call.
# The fewest faults of any call: glibc's own settings map a fresh block for every call; with the freed blocks
# kept, a call takes one again (a block freed too late for the next call makes the heap grow instead).
FAULTS_PER_CALL = """
import json, resource
from jaxinf.hostenv import reuse_freed_memory
applied = reuse_freed_memory()
import jax, jax.numpy as jnp
x = jnp.ones((16 * 2**20,), jnp.float32)
double = jax.jit(lambda x: x * 2.0)
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = double(x).block_until_ready()
    del y
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "fewest_faults": min(faults)}))
"""


def fewest_faults(heap: str) -> dict:
    env = {**os.environ, "JAXINF_HOST_HEAP": heap, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", FAULTS_PER_CALL], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_freed_buffers_are_reused_instead_of_faulted_in_again():
    pages = 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    glibc = fewest_faults("default")
    kept = fewest_faults("reuse")
    assert not glibc["applied"] and kept["applied"]
    assert glibc["fewest_faults"] > pages / 2      # glibc maps a fresh block for every output
    assert kept["fewest_faults"] < pages / 10      # a freed block is taken again


def test_the_heap_is_left_alone_for_an_accelerator_or_on_request():
    assert computes_on_cpu({"JAX_PLATFORMS": "cpu"})
    assert not computes_on_cpu({"JAX_PLATFORMS": "cuda"})
    assert not computes_on_cpu({"JAX_PLATFORMS": "cpu,tpu"})
    assert not reuse_freed_memory({"JAXINF_HOST_HEAP": "default", "JAX_PLATFORMS": "cpu"})
    assert not reuse_freed_memory({"JAX_PLATFORMS": "cuda"})
    with pytest.raises(ValueError, match="JAXINF_HOST_HEAP='off': expected 'reuse'"):
        reuse_freed_memory({"JAXINF_HOST_HEAP": "off"})


def test_the_command_names_a_bad_setting_in_one_line():
    env = {**os.environ, "JAXINF_HOST_HEAP": "off", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "jaxinf", "run", "run.out=unused"], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip() == ("jaxinf run: error: JAXINF_HOST_HEAP='off': expected 'reuse' (the default) or "
                                "'default' (glibc's own malloc settings)")
