"""The data subcommands of the command line (``jaxinf prepare``)."""

from __future__ import annotations


def prepare_command(args) -> int:
    """``jaxinf prepare INPUT OUT_DIR [--text-field ...]``: prints what was kept and skipped. Bad input raises
    :class:`~jaxinf.data.errors.DataError` (a :class:`~jaxinf.errors.UserError`), which the command line reports in
    one line (exit 2); a write the machine refuses is exit 3 there."""
    from jaxinf.data.prepare import prepare

    report = prepare(
        args.input, args.out_dir, text_field=args.text_field, id_field=args.id_field, source_field=args.source_field
    )
    print(report.summary())
    print(f"wrote {args.out_dir} (TFDS array_record, split train; read it with data.documents={args.out_dir})")
    return 0
