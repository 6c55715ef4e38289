"""``jaxinf analyze RUN_DIR [--from-release RELEASE_JSON]``."""

from __future__ import annotations

from pathlib import Path

from jaxinf.analysis.driver import analyze


def analyze_command(args) -> int:
    """Run the analysis; a bad input raises :class:`~jaxinf.run.exports.formats.AnalysisError` (one line on stderr
    and exit status 2 from the command line). Holds the run directory's lock
    (:class:`jaxinf.run.lock.RunLock`) while it writes there, as ``jaxinf run`` does."""
    from jaxinf.run.lock import RunLock
    from jaxinf.run.rundir import LOCK_FILE, refuse_inside_run

    # a conversion (--from-release) needs an absent or empty directory, so it is not locked before it is made; a
    # directory with neither run.json nor scores.npy is refused unwritten (no lock file left in someone's folder),
    # unless it has a lock file already: a run or validation that has not written them yet may hold it
    root = Path(args.run_dir)
    refuse_inside_run(root, "RUN_DIR")
    ours = root.is_dir() and any((root / name).exists() for name in ("run.json", "scores.npy", LOCK_FILE))
    lock = RunLock(root, reader=True).acquire() if not args.from_release and ours else None
    try:
        return _analyze(args)
    finally:
        if lock is not None:
            lock.release()


def _analyze(args) -> int:
    if args.from_release:
        from jaxinf.analysis.release import convert_release

        convert_release(Path(args.from_release), Path(args.run_dir))
        print(f"analyze: converted {args.from_release} into {args.run_dir}")
    s = analyze(Path(args.run_dir))
    out = Path(args.run_dir)
    print(
        f"analyze: wrote {out / 'summary.json'}, {out / 'report' / 'index.html'} and {out / 'report' / 'summary.md'}"
        f" in {s['timings']['total_s']:.1f} s"
    )
    for n in s["notes"]:
        print(f"analyze: note: {n}")
    return 0
