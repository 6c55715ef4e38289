"""The LDS of each strategy under each retraining protocol of ``jaxinf validate``, at several training lengths.

For every training length (``validate.steps``) and every protocol (``validate.subset_steps`` fixed or epochs
times ``validate.subset_init`` shared or fresh) this runs ``jaxinf validate`` on the built-in world (or the world
of the extra ``section.key=value`` overrides) and writes one markdown row: the protocol, the steps each
retraining ran, and each strategy's LDS at the first damping with its 95% bootstrap interval over the subsets.
The runs of one length share one output directory, so the full model and the scores are computed once per
length and only the retrainings differ (``docs/validation.md``: what is kept, keyed by what). Rows are
appended to ``--table`` as each run finishes, so an interrupted sweep keeps what it measured; a rerun into the
same ``--out`` reuses every finished retraining.

    python scripts/validate_protocols.py --steps 500,200,800 --out /tmp/protocols --table /tmp/protocols.md \\
        [--protocols fixed/shared,epochs/shared,fixed/fresh,epochs/fresh] [section.key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from jaxinf.validate import driver

PROTOCOLS = [("fixed", "shared"), ("epochs", "shared"), ("fixed", "fresh"), ("epochs", "fresh")]
NAMES = {"identity": "identity", "diagonal": "diagonal", "kfac": "K-FAC", "ekfac": "EK-FAC"}


def row(steps: int, result: dict, seconds: float) -> str:
    proc = result["procedure"]
    cells = [str(steps), proc["subset_steps"], proc["subset_init"], str(proc["retraining_steps"])]
    for e in result["lds"].values():
        lo, hi = e["ci95"]
        cells.append(f"{e['mean']:.3f} [{lo:.2f}, {hi:.2f}]" if e["mean"] is not None else "undefined")
    ek, ident = result["lds"].get("ekfac", {}).get("mean"), result["lds"].get("identity", {}).get("mean")
    cells.append(f"{ek / ident:.2f}" if ek is not None and ident else "")
    cells.append(f"{seconds:.0f}")
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="500,200,800", help="training lengths (validate.steps), in the order run")
    ap.add_argument(
        "--protocols",
        default=",".join(f"{a}/{b}" for a, b in PROTOCOLS),
        help="subset_steps/subset_init pairs, in the order run",
    )
    ap.add_argument("--out", required=True, help="a directory per length is made under it")
    ap.add_argument("--table", required=True, help="markdown file the rows are appended to")
    ap.add_argument("overrides", nargs="*", help="section.key=value for every run")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    table = Path(args.table)
    first = driver.load_config(None, args.overrides)
    strategies = first.validate.strategies
    if not table.exists():
        header = (
            ["steps", "subset_steps", "subset_init", "steps per retraining"]
            + [f"{NAMES[s]} LDS [95% bootstrap CI]" for s in strategies]
            + ["EK-FAC / identity", "s"]
        )
        table.write_text("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n")
    for steps in [int(x) for x in args.steps.split(",")]:
        for subset_steps, subset_init in (p.split("/") for p in args.protocols.split(",")):
            config = driver.load_config(
                None,
                args.overrides
                + [
                    f"validate.steps={steps}",
                    f"validate.subset_steps={subset_steps}",
                    f"validate.subset_init={subset_init}",
                ],
            )
            t0 = time.perf_counter()
            result = driver.validate(config, Path(args.out) / f"steps{steps}")
            with table.open("a") as f:
                f.write(row(steps, result, time.perf_counter() - t0) + "\n")
            print(row(steps, result, time.perf_counter() - t0), flush=True)


if __name__ == "__main__":
    main()
