"""Handlers of ``jaxinf compare`` and ``jaxinf kronfluence import|export`` (see :mod:`jaxinf.cli`)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def _strict(x):
    """The report with NaN and infinities as null (strict JSON)."""
    if isinstance(x, dict):
        return {k: _strict(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_strict(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def compare_command(args) -> int:
    """Prints the comparison table (or the JSON report with ``--json -``); writes the JSON to ``--json PATH``."""
    from jaxinf.atomic import write_json
    from jaxinf.interop.compare import compare, format_table
    from jaxinf.interop.kronfluence import InteropError

    if args.topk < 1:  # a negative k sliced all but the last |k| documents: a negative overlap, reported as such
        raise InteropError(f"--topk {args.topk}: must be at least 1")
    if args.json not in (None, "-"):  # a path that cannot take the file is refused before the comparison
        from jaxinf.run.rundir import check_output_file

        check_output_file(args.json, "--json")
    from jaxinf.run.lock import reading

    with reading((args.run,)):  # never read while a jaxinf run rewrites it (jaxinf.run.lock.reading)
        report = compare(args.kronfluence, args.run, factors=args.factors, scores=args.scores, topk=args.topk)
    table = format_table(report)
    report = _strict(report)
    if args.json == "-":
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    sys.stdout.write(table)
    if args.json is not None:
        write_json(Path(args.json), report)
    return 0


def import_command(args) -> int:
    from jaxinf import config as cfg
    from jaxinf.interop.transfer import import_factors

    config = cfg.load(*cfg.config_arguments(args.config, args.overrides))
    root = import_factors(args.kronfluence, config, factors_name=args.factors, overwrite=args.overwrite)
    print(f"{root}: curvature imported; `jaxinf run` with this config (or factors.from={root}) scores with it")
    return 0


def export_command(args) -> int:
    from jaxinf.interop.transfer import export_factors
    from jaxinf.run.lock import reading

    with reading((args.run,)):  # never read while a jaxinf run rewrites it (jaxinf.run.lock.reading)
        out = export_factors(args.run, args.out, overwrite=args.overwrite)
    print(f"{out}: kronfluence factors (use it as OUTPUT_DIR/ANALYSIS_NAME/factors_NAME)")
    return 0


def add_parsers(sub) -> None:
    """The ``compare`` and ``kronfluence`` subcommands."""
    cmp = sub.add_parser("compare", help="a kronfluence analysis against a run: factors per layer, scores per query")
    cmp.add_argument(
        "--kronfluence",
        required=True,
        metavar="DIR",
        help="kronfluence's OUTPUT_DIR/ANALYSIS_NAME (or one factors_* or scores_* directory)",
    )
    cmp.add_argument("--run", required=True, metavar="RUN_DIR", help="the jaxinf run directory")
    cmp.add_argument("--factors", metavar="NAME", help="the factors_NAME to use when there are several")
    cmp.add_argument(
        "--scores",
        metavar="NAME",
        action="append",
        help="a scores_NAME to use when there are several (repeat for pairwise and self-influence)",
    )
    cmp.add_argument("--topk", type=int, default=10, help="k of the top-k overlap per query (default 10)")
    cmp.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH ('-': print it instead)")
    cmp.set_defaults(handler=compare_command)

    kron = sub.add_parser("kronfluence", help="factor interchange with kronfluence: import or export")
    ksub = kron.add_subparsers(dest="action", required=True)
    imp = ksub.add_parser("import", help="kronfluence factors into the run directory of a config (run.out)")
    imp.add_argument("kronfluence", metavar="DIR", help="a kronfluence factors_* directory (or its analysis directory)")
    imp.add_argument("config", nargs="?", help="YAML config of the run (its model, factors.* and run.* settings)")
    imp.add_argument("overrides", nargs="*", default=[], metavar="section.key=value", help="config overrides")
    imp.add_argument("--factors", metavar="NAME", help="the factors_NAME to import when there are several")
    imp.add_argument("--overwrite", action="store_true", help="replace whatever the run directory holds")
    imp.set_defaults(handler=import_command)
    exp = ksub.add_parser("export", help="a run's factors as a kronfluence factors_* directory")
    exp.add_argument("run", metavar="RUN_DIR", help="the jaxinf run directory")
    exp.add_argument(
        "out", metavar="OUT_DIR", help="the factors directory to write (e.g. influence_results/NAME/factors_jaxinf)"
    )
    exp.add_argument("--overwrite", action="store_true", help="replace the factor files of OUT_DIR")
    exp.set_defaults(handler=export_command)
