"""The exports' breakdowns kept by the scoring pass (``jaxinf.engine.tails``) against a second pass over each
query's top documents, on the bench world of ``bench_vs_kronfluence.py``.

    python scripts/bench_exports.py [--size small] [--root DIR] [--baseline REPO] [--repeat 3] [--json PATH]

Each round, in fresh ``python -m jaxinf`` processes with a warm compilation cache (a first call of each fills it):

1. ``jaxinf run`` (exact EK-FAC with the bench's settings): every stage's time from its ``run.json``; its exports
   take the per-layer and per-token scores of the top documents from the scoring pass.
2. The same run directory with ``topk.jsonl`` and the tails saved beside the score chunks (``state/scores.carry``)
   removed, run again: the exports stage runs again alone, and since the scoring pass is then resumed from its
   saved chunks with no tails (no batch computed) the breakdowns come from a second pass over the top documents:
   the path every run took before the tails, and a resumed one before they were saved.
3. With ``--baseline REPO`` (a checkout of an earlier commit): step 1 with that code, for the scoring stage side by
   side (what keeping the tails costs the scoring pass) and the whole process.

Printed and written (``--json``): per round the stage times of each, and the largest difference between the two
paths' ``layer_scores.npy`` and per-token scores.
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def jaxinf(repo: Path, args, cache: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(repo), "JAXINF_COMPILATION_CACHE": str(cache)}
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "jaxinf", "-q", *map(str, args)], env=env, capture_output=True, text=True, cwd=repo
    )
    if r.returncode:
        raise SystemExit(f"jaxinf {' '.join(map(str, args[:2]))} failed: {r.stderr[-3000:]}")
    return time.perf_counter() - t0


def stages(run: Path) -> dict:
    from bench_index import stage_seconds

    exports = json.loads((run / "run.json").read_text())["stages"].get("exports", {})
    return {
        **stage_seconds(run),
        **(
            {"documents_scored_again": exports["documents_scored_again"]} if "documents_scored_again" in exports else {}
        ),
    }


def breakdowns(run: Path) -> tuple[np.ndarray, np.ndarray]:
    tokens = [
        t["score"] for line in (run / "topk_tokens.jsonl").read_text().splitlines() for t in json.loads(line)["tokens"]
    ]
    return np.load(run / "layer_scores.npy"), np.asarray(tokens)


def main(argv=None) -> None:
    import bench_vs_kronfluence as bench

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=list(bench.SIZES))
    ap.add_argument("--root", default="/tmp/jaxinf-bench-exports")
    ap.add_argument("--baseline", help="a checkout of an earlier commit, run beside this one")
    ap.add_argument("--query-rank", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    size, root = bench.SIZES[args.size], Path(args.root)
    w = bench.build(root / "world", size)
    base = [*bench.run_settings(w, size, query_svd="full", query_rank=args.query_rank), "scores.topk=100"]
    repos = {"this": ROOT, **({"baseline": Path(args.baseline).resolve()} if args.baseline else {})}
    caches = {name: root / f"xla-{name}" for name in repos}
    for name, repo in repos.items():  # fills each code's compilation cache
        jaxinf(repo, ["run", *base, f"run.out={root / name}", "--overwrite"], caches[name])
    rounds = []
    for _ in range(args.repeat):
        row: dict = {}
        for name, repo in repos.items():
            seconds = jaxinf(repo, ["run", *base, f"run.out={root / name}", "--overwrite"], caches[name])
            row[name] = {"process_seconds": round(seconds, 1), "stages": stages(root / name)}
        kept = breakdowns(root / "this")
        (root / "this" / "topk.jsonl").unlink()
        shutil.rmtree(root / "this" / "state" / "scores.carry")  # else the rerun takes the saved tails
        seconds = jaxinf(ROOT, ["run", *base, f"run.out={root / 'this'}"], caches["this"])
        again = breakdowns(root / "this")
        row["second_pass"] = {
            "process_seconds": round(seconds, 1),
            "stages": stages(root / "this"),
            "layer_scores_max_abs_difference": float(np.abs(kept[0] - again[0]).max()),
            "layer_scores_max_abs": float(np.abs(again[0]).max()),
            "token_scores_max_abs_difference": float(np.abs(kept[1] - again[1]).max()),
            "token_scores_max_abs": float(np.abs(again[1]).max()),
        }
        print(json.dumps(row), flush=True)
        rounds.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps({"size": args.size, "rounds": rounds}, indent=1) + "\n")


if __name__ == "__main__":
    main()
