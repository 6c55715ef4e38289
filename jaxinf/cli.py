"""The ``jaxinf`` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxinf", description="EK-FAC influence functions for LLMs in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the built-in end-to-end example")
    prep = sub.add_parser("prepare", help="convert a documents JSONL file to a TFDS array_record dataset")
    prep.add_argument("input", metavar="INPUT.jsonl", help="documents, one JSON object per line")
    prep.add_argument("out_dir", metavar="OUT_DIR", help="the dataset directory to write (must not exist or be empty)")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        from jaxinf.data.cli import prepare_command

        return prepare_command(args.input, args.out_dir)
    if args.command == "demo":
        from jaxinf import example

        example.main()
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
