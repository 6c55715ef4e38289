"""A cold ``jaxinf run`` with each pass's other programs compiled ahead (:mod:`jaxinf.engine.ahead`) against one
without, on the bench world of ``bench_vs_kronfluence.py``.

    python scripts/bench_compile_ahead.py [--size small] [--documents N] [--repeat 3] [--json PATH]

Each round runs ``jaxinf run`` twice, in fresh processes, each with an empty compilation cache: once as it is, once
with ``JAXINF_COMPILE_AHEAD=0`` (every program compiled by its first batch, on the main thread), in alternating
order from round to round so that a drift in the host's load falls on both. Then the same pair again with the
cache each cold run filled (warm), which compiles nothing. Reported: the whole process, each pass's seconds and its
first batch's call (``compile_seconds``), min / median / max over the rounds, and the scores of the two settings
compared (they must be the same bits: the same programs run).

``--documents`` takes the first N documents of the world (a few batches make compilation a larger share of the
run, so its saving stands out of the host's noise).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

PASSES = ("covariance", "lambda", "scores")


def run_once(base: list[str], out: Path, cache: Path, ahead: bool) -> dict:
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAXINF_COMPILATION_CACHE": str(cache)}
    env["JAXINF_COMPILE_AHEAD"] = "1" if ahead else "0"
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "jaxinf", "-q", "run", *base, f"run.out={out}", "--overwrite"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"jaxinf run failed: {r.stderr[-3000:]}")
    seconds = time.perf_counter() - t0
    stages = json.loads((out / "run.json").read_text())["stages"]
    row = {"seconds": seconds}
    for name in PASSES:
        timing = stages[name].get("timing", {})
        row[name] = timing.get("seconds")
        row[name + " compile"] = timing.get("compile_seconds")
    row["scores.npy"] = np.load(out / "scores.npy")
    return row


def main(argv=None) -> None:
    import bench_vs_kronfluence as bench

    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="small", choices=list(bench.SIZES))
    ap.add_argument("--documents", type=int, help="the first N documents of the world")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--root", default="/tmp/jaxinf-bench-ahead")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    size = bench.SIZES[args.size]
    root = Path(args.root)
    w = bench.build(root / "world", size)
    docs = w["docs"]
    if args.documents:
        docs = root / "world" / f"docs-{args.documents}.jsonl"
        lines = Path(w["docs"]).read_text().splitlines(keepends=True)[: args.documents]
        docs.write_text("".join(lines))
    base = bench.run_settings({**w, "docs": docs}, size, query_svd="randomized")
    rows: dict[str, list[dict]] = {k: [] for k in ("ahead, cold", "plain, cold", "ahead, warm", "plain, warm")}
    for r in range(args.repeat):
        order = (True, False) if r % 2 == 0 else (False, True)
        caches = {}
        for ahead in order:
            label = "ahead" if ahead else "plain"
            caches[ahead] = Path(tempfile.mkdtemp(prefix=f"xla-{label}-", dir=root))
            rows[f"{label}, cold"].append(run_once(base, root / f"run-{label}", caches[ahead], ahead))
            print(f"round {r + 1}: {label}, cold: {rows[f'{label}, cold'][-1]['seconds']:.1f}s", flush=True)
        for ahead in order:
            label = "ahead" if ahead else "plain"
            rows[f"{label}, warm"].append(run_once(base, root / f"run-{label}", caches[ahead], ahead))
            print(f"round {r + 1}: {label}, warm: {rows[f'{label}, warm'][-1]['seconds']:.1f}s", flush=True)
            shutil.rmtree(caches[ahead])
    same = all(
        np.array_equal(a["scores.npy"], b["scores.npy"]) for a, b in zip(rows["ahead, cold"], rows["plain, cold"])
    )
    print(f"\nscores of the two settings the same bits in every round: {same}\n")
    cols = ["seconds", *[c for p in PASSES for c in (p, p + " compile")]]
    print("| run | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    summary = {}
    for label, rs in rows.items():
        cells = []
        for c in cols:
            xs = [x[c] for x in rs if x[c] is not None]
            summary.setdefault(label, {})[c] = xs
            cells.append(f"{min(xs):.1f} / {statistics.median(xs):.1f} / {max(xs):.1f}" if xs else "")
        print(f"| {label} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"same_scores": same, "min/median/max of": cols, "runs": summary}))


if __name__ == "__main__":
    main()
