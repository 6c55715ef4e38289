"""The ``jaxinf`` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxinf", description="EK-FAC influence functions for LLMs in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the built-in end-to-end example")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from jaxinf import example

        example.main()
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
