"""The "Every shipped config" table of docs/benchmarks.md: ``jaxinf plan`` of each config, one row each.

    python scripts/plan_configs.py                       # configs/paper/*.yaml and configs/plan/*.yaml
    python scripts/plan_configs.py configs/plan/pythia-6.9b_8xh100.yaml

Each config is planned in its own process (``jaxinf plan CONFIG --json``, which simulates the devices its
mesh needs and compiles every step without running it); the row gives the mesh, documents per step, the
largest step's peak memory per device against the config's ``plan.device_memory_gib``, and the scoring
step's FLOPs per document and hours for the config's ``plan.documents``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GiB = 2**30


def row(config: Path) -> str:
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plan.json"
        r = subprocess.run(
            [sys.executable, "-m", "jaxinf", "plan", str(config), "--json", str(out)],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        if not out.exists():
            raise SystemExit(f"{config}: jaxinf plan failed ({r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
        plan = json.loads(out.read_text())
    memory = (yaml.safe_load(config.read_text()).get("plan") or {}).get("device_memory_gib")
    m = plan["meshes"][0]
    largest = max(m["steps"], key=lambda s: s["peak"])
    scores = next(s for s in m["steps"] if s["name"] == "scores")
    fits = "-" if memory is None else ("yes" if largest["peak"] <= memory * GiB else "**no**")
    return (
        f"| `{config.relative_to(REPO)}` | {m['data']}x{m['model']} ({m['devices']}) | {m['global_batch']} | "
        f"{largest['name']} {largest['peak'] / GiB:.1f} | {memory if memory is not None else '-'} | {fits} | "
        f"{scores['flops_per_document'] / 1e12:.1f} | {scores['hours']:.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", type=Path)
    args = parser.parse_args()
    configs = [c.resolve() for c in args.configs] or sorted((REPO / "configs" / "paper").glob("*.yaml")) + sorted(
        (REPO / "configs" / "plan").glob("*.yaml")
    )
    print(
        "| config | mesh (devices) | documents / step | largest step, GiB | memory GiB | fits | "
        "scores TFLOP / doc | scores hours |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for c in configs:
        print(row(c), flush=True)


if __name__ == "__main__":
    main()
