"""The ``jaxinf`` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxinf", description="EK-FAC influence functions for LLMs in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the built-in end-to-end example")
    an = sub.add_parser("analyze", help="the paper's statistics and the report of a run directory")
    an.add_argument("run_dir", help="run directory (scores.npy, queries.jsonl, documents.jsonl)")
    an.add_argument("--from-release", metavar="RELEASE_JSON",
                    help="first convert Ruis et al.'s release_{7B,35B}.json into RUN_DIR (absent or empty)")
    args = parser.parse_args(argv)
    if args.command == "analyze":
        from jaxinf.analysis.cli import run_analyze

        return run_analyze(args)
    if args.command == "demo":
        from jaxinf import example

        example.main()
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
