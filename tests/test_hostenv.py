"""The C heap's huge pages (``jaxinf.hostenv.huge_page_environment``): when they apply, that the ``jaxinf``
command starts itself again with them, and that they stop the page faults of XLA's large CPU buffers."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from jaxinf.hostenv import HUGE_PAGES_TUNABLE, heap_mode, huge_page_environment, transparent_huge_pages

ROOT = Path(__file__).resolve().parents[1]
GLIBC, THP = ("glibc", "2.36"), "madvise"
HUGE = HUGE_PAGES_TUNABLE + "=1"

needs_huge_pages = pytest.mark.skipif(
    huge_page_environment({"JAX_PLATFORMS": "cpu"}) is None,
    reason=f"this host's C library ({platform.libc_ver()}) or kernel (transparent huge pages: "
    f"{transparent_huge_pages()}) gives no huge pages to malloc",
)

# Each call of the jitted function writes a fresh 64 MiB output; deleting it frees the block. The fewest faults of
# any call: with 4 KiB pages every call faults in all of them.
FEWEST_FAULTS = """
import json, resource
import jax, jax.numpy as jnp
x = jnp.ones((16 * 2**20,), jnp.float32)
double = jax.jit(lambda x: x * 2.0)
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = double(x).block_until_ready()
    del y
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(min(faults)))
"""


def cpu_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAXINF_HOST_HEAP")}
    return {
        **env,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        **extra,
    }


def fewest_faults(env: dict[str, str]) -> int:
    out = subprocess.run([sys.executable, "-c", FEWEST_FAULTS], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_huge_pages
def test_huge_pages_stop_the_page_faults_of_large_buffers():
    pages = 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    assert fewest_faults(cpu_env()) > pages / 2  # every 4 KiB page, every call
    assert fewest_faults(huge_page_environment(cpu_env())) < pages / 10  # 2 MiB at a time


@needs_huge_pages
def test_the_command_starts_itself_again_with_huge_pages_once():
    code = (
        "import os, sys\n"
        "print('tunables:', os.environ.get('GLIBC_TUNABLES'), flush=True)\n"
        "from jaxinf.cli import entry\n"
        "sys.argv = ['jaxinf', '--help']\n"
        "entry()\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert [x for x in lines if x.startswith("tunables:")] == ["tunables: None", f"tunables: {HUGE}"]
    assert any("usage: jaxinf" in x for x in lines)


def test_a_caller_of_main_is_never_started_again():
    """``jaxinf.cli.main()`` from a script or notebook runs in that process as it is (no restart, the script's
    own lines run once), and says in one line which heap it has."""
    code = (
        "import os, sys\n"
        "print('started', flush=True)\n"
        "from jaxinf.cli import main\n"
        "sys.argv = ['jaxinf', 'plan', '--help']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('still here', os.environ.get('GLIBC_TUNABLES'), flush=True)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("started") == 1 and "still here None" in r.stdout
    assert heap_mode({}) == "default" and heap_mode({"GLIBC_TUNABLES": "a=1:" + HUGE}) == "huge-pages"


def test_huge_pages_apply_on_the_cpu_with_glibc_and_the_kernel_s_consent():
    cpu = {"JAX_PLATFORMS": "cpu"}
    assert huge_page_environment(cpu, GLIBC, THP) == {**cpu, "GLIBC_TUNABLES": HUGE}
    assert huge_page_environment({**cpu, "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, GLIBC, "always") == {
        **cpu,
        "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:" + HUGE,
    }
    assert huge_page_environment({**cpu, "GLIBC_TUNABLES": HUGE}, GLIBC, THP) is None  # started again already
    assert huge_page_environment({**cpu, "GLIBC_TUNABLES": HUGE_PAGES_TUNABLE + "=0"}, GLIBC, THP) is None
    assert huge_page_environment(cpu, ("glibc", "2.31"), THP) is None  # no such tunable
    assert huge_page_environment(cpu, ("", ""), THP) is None  # not glibc
    assert huge_page_environment(cpu, GLIBC, "never") is None
    assert huge_page_environment({"JAX_PLATFORMS": "cuda"}, GLIBC, THP) is None  # the device's buffers
    assert huge_page_environment({"JAX_PLATFORMS": "cpu,tpu"}, GLIBC, THP) is None
    assert huge_page_environment({**cpu, "JAXINF_HOST_HEAP": "default"}, GLIBC, THP) is None
    with pytest.raises(ValueError, match="JAXINF_HOST_HEAP='off': expected 'huge-pages'"):
        huge_page_environment({**cpu, "JAXINF_HOST_HEAP": "off"}, GLIBC, THP)


def test_the_kernel_s_mode_is_read_from_its_bracket(tmp_path):
    mode = tmp_path / "enabled"
    mode.write_text("always [madvise] never\n")
    assert transparent_huge_pages(str(mode)) == "madvise"
    mode.write_text("always madvise [never]\n")
    assert transparent_huge_pages(str(mode)) == "never"
    assert transparent_huge_pages(str(tmp_path / "absent")) == "never"


def test_the_command_names_a_bad_setting_in_one_line():
    r = subprocess.run(
        [sys.executable, "-m", "jaxinf", "run", "run.out=unused"],
        env=cpu_env(JAXINF_HOST_HEAP="off"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "jaxinf: error: JAXINF_HOST_HEAP='off': expected 'huge-pages' (the default) or "
        "'default' (glibc's own malloc settings)"
    )
