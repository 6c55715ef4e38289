"""XLA:CPU settings tried on the forward and backward pass of the bench Llama, each against torch in the same process.

Issue 27 asks where XLA's CPU forward+backward loses to torch's and whether a flag, runtime or library path closes
it. Each setting below runs ``scripts/bench_fwd_bwd.py`` in a fresh process with the setting added to ``XLA_FLAGS``
(flags are read once, when jax initializes), which times jaxinf's Llama step (linear layers as one
``[batch * tokens, d_in]`` product) and transformers' Llama in torch on the same shapes, side by side; the ratio
JAX / torch of one process is what is compared (both share whatever else the host is doing). A setting this jaxlib
does not know (XLA aborts on an unknown flag) is reported as not accepted.

    python scripts/bench_xla_flags.py [--repeats 7] [--rounds 2] [--only NAME ...] [--json PATH]

Settings that change the numbers (fast math) are measured for the record only: jaxinf keeps IEEE float32.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SETTINGS: dict[str, str] = {
    "default": "",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn custom calls": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
    "no multi-threaded Eigen": "--xla_cpu_multi_thread_eigen=false",
    "concurrency-optimized scheduler": "--xla_cpu_enable_concurrency_optimized_scheduler=true",
    "custom matmul tiling": "--xla_cpu_enable_custom_matmul_tiling=true",
    "no fusion emitters": "--xla_cpu_use_fusion_emitters=false",
    "no multi-output fusion": "--xla_cpu_use_multi_output_fusion=false",
    "vector width 256": "--xla_cpu_prefer_vector_width=256",
    "max ISA AVX2": "--xla_cpu_max_isa=AVX2",
    "parallel codegen split 1": "--xla_cpu_parallel_codegen_split_count=1",
    "fast math (changes numbers)": "--xla_cpu_enable_fast_math=true",
}


def measure(flags: str, repeats: int) -> dict:
    """One fresh process of ``bench_fwd_bwd.py`` with ``flags`` added to ``XLA_FLAGS``: its rows in milliseconds."""
    env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()}
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_fwd_bwd.py"), "--repeats", str(repeats)],
        env=env,
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": last[:300]}
    ms = {name: float(v) for name, v in re.findall(r"^\| (.+?) \| ([\d.]+) \|", r.stdout, re.M)}
    jax_ms = next(v for k, v in ms.items() if k.startswith("JAX, linear layers as one"))
    torch_ms = next(v for k, v in ms.items() if k.startswith("torch"))
    gflops = re.search(r"XLA (\d+) GFLOP/s", r.stdout)
    return {
        "jax_ms": jax_ms,
        "torch_ms": torch_ms,
        "ratio": jax_ms / torch_ms,
        "xla_gflops": int(gflops.group(1)) if gflops else None,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7, help="timed calls per step in each process")
    ap.add_argument("--rounds", type=int, default=2, help="fresh processes per setting (their median is reported)")
    ap.add_argument("--only", action="append", help="a setting's name (repeatable); all when absent")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    chosen = {k: v for k, v in SETTINGS.items() if not args.only or k in args.only}
    results = {}
    print(
        "| setting | XLA_FLAGS | JAX ms | torch ms | JAX / torch | 2048^2 product GFLOP/s |\n|---|---|---|---|---|---|",
        flush=True,
    )
    for name, flags in chosen.items():
        runs = [measure(flags, args.repeats) for _ in range(args.rounds)]
        ok = [r for r in runs if "error" not in r]
        if not ok:
            results[name] = {"flags": flags, "error": runs[0]["error"]}
            print(f"| {name} | `{flags}` | not accepted: {runs[0]['error'][:80]} | | | |", flush=True)
            continue
        row = {k: statistics.median(r[k] for r in ok) for k in ("jax_ms", "torch_ms", "ratio")}
        row["ratios"] = [round(r["ratio"], 3) for r in ok]
        row["xla_gflops"] = ok[0]["xla_gflops"]
        results[name] = {"flags": flags, **row}
        print(
            f"| {name} | `{flags or '(none)'}` | {row['jax_ms']:.1f} | {row['torch_ms']:.1f} | "
            f"{row['ratio']:.2f} ({', '.join(f'{x:.2f}' for x in row['ratios'])}) | {row['xla_gflops']} |",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
