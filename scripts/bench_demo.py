"""The demo's wall time per stage, and the cost of checkpointing while scoring.

1. Runs ``jaxinf demo --out DIR`` in a fresh process (or reuses DIR with
   ``--reuse``) and prints each stage's wall time from ``run.json``.
2. Scores the demo's documents again with the demo's factors
   (``factors.from``) at several ``scores.save_every`` intervals (the default
   100, and 10 and 1 batches), and prints the share of scoring time spent saving
   score chunks.

    python scripts/bench_demo.py [--out runs/bench-demo] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def jaxinf(*args: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jaxinf", "-q", *args], check=True, env=env)
    return time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/bench-demo")
    ap.add_argument("--reuse", action="store_true", help="reuse an existing demo in --out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    load = os.getloadavg()[0]
    if not args.reuse:
        shutil.rmtree(out, ignore_errors=True)
        total = jaxinf("demo", "--out", str(out))
        print(f"jaxinf demo: {total:.0f} s wall in all (load average at start {load:.1f}, {os.cpu_count()} cores)\n")
    record = json.loads((out / "run" / "run.json").read_text())
    print("| stage | wall time (s) | of which saving checkpoints (s) |")
    print("|---|---|---|")
    for stage, info in record["stages"].items():
        timing = info.get("timing") or {}
        seconds = timing.get("seconds", info.get("seconds"))
        print(f"| {stage} | {seconds if seconds is not None else '-'} | {timing.get('save_seconds', '-')} |")

    print("\n| scores.save_every (batches) | scoring (s) | saving chunks (s) | overhead |")
    print("|---|---|---|---|")
    for every in (100, 10, 1):
        run_out = out / f"save-every-{every}"
        shutil.rmtree(run_out, ignore_errors=True)
        jaxinf(
            "run",
            str(out / "config.yaml"),
            f"factors.from={out / 'run'}",
            f"scores.save_every={every}",
            f"run.out={run_out}",
        )
        t = json.loads((run_out / "run.json").read_text())["stages"]["scores"]["timing"]
        print(
            f"| {every} | {t['seconds']:.1f} | {t['save_seconds']:.2f} | "
            f"{100 * t['save_seconds'] / t['seconds']:.1f}% |"
        )


if __name__ == "__main__":
    main()
