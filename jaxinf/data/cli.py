"""The data subcommands of the command line (``jaxinf prepare``)."""

from __future__ import annotations

import sys

from jaxinf.data.errors import DataError


def prepare_command(input_path: str, out_dir: str, **fields: str) -> int:
    """``jaxinf prepare INPUT OUT_DIR [--text-field ...]``: prints what was kept and skipped; bad input is one line on stderr, exit 2 (a disk error: 3)."""
    from jaxinf.data.prepare import prepare

    try:
        report = prepare(input_path, out_dir, **fields)
    except DataError as e:  # bad input: one line, no traceback
        print(f"jaxinf prepare: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the disk (full, no permission): one line, exit 3 as for jaxinf run (jaxinf.cli.EXIT_CODES)
        print(f"jaxinf prepare: error: {e}", file=sys.stderr)
        return 3
    print(report.summary())
    print(f"wrote {out_dir} (TFDS array_record, split train; read it with data.documents={out_dir})")
    return 0
