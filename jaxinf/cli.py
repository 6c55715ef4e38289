"""The ``jaxinf`` command line: run, query, plan, validate, demo, analyze, prepare, compare, kronfluence.

Every verb is a handler ``<verb>_command(args) -> int`` (here, or in the ``cli`` module of its sub-package:
``analysis/cli.py``, ``data/cli.py``, ``interop/cli.py``, whose ``add_parsers`` adds the verbs it owns). A handler
raises :class:`~jaxinf.errors.UserError` or :class:`~jaxinf.errors.EnvironmentFailure` subclasses and never prints
an error itself: :func:`main` reports every command's the same way.

Bad input (a config key, a file, a line, a tensor) is reported as one line on
stderr, ``jaxinf COMMAND: error: ...``, with exit status 2 and no traceback;
whatever was already computed stays in the run directory. :data:`EXIT_CODES`
lists every status (docs/data.md shows the same table).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

EXIT_CODES = {
    0: "success",
    1: "jaxinf plan: a planned step does not fit (plan.device_memory_gib); any command: an unexpected error "
    "(a bug: a traceback)",
    2: "bad input, config or run directory, or an argument the command line refuses (an unknown option, a value of "
    "another kind), one line naming the file, line, key, path or argument: also a run directory in "
    "use by another process, a changed model or tokenizer, a refused --overwrite",
    3: "the machine refused a write: no space left, a file-size limit, a read-only or unwritable run directory; one "
    "line naming the path and the stage; everything finished is kept and the same command resumes; also host "
    "memory exhausted (an allocation refused)",
    4: "another process of a multi-process run stopped (killed, preempted, crashed); one line naming the stage; "
    "everything finished is kept; start every process again with the same command to resume",
    130: "interrupted (Ctrl-C); the same command resumes",
}


def _setup_logging(quiet: bool) -> None:
    from jaxinf.run.failures import HideLibraryTracebacks

    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="jaxinf: %(message)s", stream=sys.stderr, force=True
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(HideLibraryTracebacks())
    for noisy in ("absl", "orbax", "jax._src", "tensorflow_datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def enable_compilation_cache() -> str | None:
    """XLA's persistent compilation cache, on by default: a second run of the same programs skips compiling them.

    The directory is ``$JAXINF_COMPILATION_CACHE`` (empty: off), else ``$JAX_COMPILATION_CACHE_DIR`` when the
    user set JAX's own, else ``~/.cache/jaxinf/xla``. Every program is cached, however quick its compilation.
    """
    import jax

    where = os.environ.get("JAXINF_COMPILATION_CACHE")
    if where is None:
        where = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(Path.home() / ".cache" / "jaxinf" / "xla")
    if not where:
        return None
    jax.config.update("jax_compilation_cache_dir", where)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return where


def run_command(args) -> int:
    from jaxinf import config as cfg
    from jaxinf import pipeline

    if args.help_config:
        print(cfg.describe())
        return 0
    config = _given_config(args)
    enable_compilation_cache()
    pipeline.run(config, overwrite=args.overwrite)
    return 0


def _given_config(args):
    """The config of a command that needs one (``run``, ``plan``): its file and overrides, in any order; neither
    given is one line saying what to give (argparse's "required: config, section.key=value" read as if both were)."""
    from jaxinf import config as cfg

    path, overrides = cfg.config_arguments(args.config, args.overrides)
    if path is None and not overrides:
        raise cfg.ConfigError(
            "give a config file or section.key=value overrides (configs/reference.yaml lists every key)"
        )
    return cfg.load(path, overrides)


def query_command(args) -> int:
    from jaxinf.run import rundir
    from jaxinf.run.lock import reading

    run_dir = Path(args.run)
    if (run_dir / "manifest.json").is_file() and run_dir.parent.name == "state":  # the index directory itself
        run_dir = run_dir.parent.parent
    rundir.refuse_inside_run(run_dir, "RUN_OR_INDEX")
    with reading((run_dir,)):  # never read while a jaxinf run rewrites it, nor rewritten while read
        return _query(args, run_dir)


QUERY_SETS = {
    "data.queries": "QUERIES, the command's second argument",
    "run.out": "--out",
    "factors.from": "RUN_OR_INDEX: the curvature of the run queried",
    "index.from": "RUN_OR_INDEX: the run queried",
    "scores.mode": "index: jaxinf query scores with the run's index",
    "index.k": "RUN_OR_INDEX: the run's index, as built; a query builds none",
    "index.dtype": "RUN_OR_INDEX: the run's index, as built",
}
"""The keys ``jaxinf query`` sets itself, and from what: an override of one was taken over the command's own argument
(``data.queries=X`` scored X, not QUERIES, without a word) or met a check that named a key the user never wrote
(``run.out=RUN``: "factors.from: RUN is run.out itself"; ``index.k=8``: "index.k: 8 builds this run's index, but
scores.mode: index reads that of index.from"; ``index.dtype=float32`` against a float16 index: accepted, recorded,
and never applied)."""


def _query(args, run_dir: Path) -> int:
    from jaxinf import config as cfg
    from jaxinf import pipeline
    from jaxinf.run import rundir

    for override in args.overrides:
        key = override.split("=", 1)[0].strip()
        if key in QUERY_SETS:
            raise cfg.ConfigError(f"command line: {key}: set by jaxinf query itself ({QUERY_SETS[key]}); leave it out")
    record = rundir.read_record(run_dir) if run_dir.is_dir() else None
    if record is None or "config" not in record:
        raise cfg.ConfigError(f"{run_dir}: not a jaxinf run directory ({rundir.why_not_run(run_dir)})")
    if not (run_dir / "state" / "index" / "manifest.json").is_file():
        k = ((record.get("config") or {}).get("index") or {}).get("k")
        if k is not None:  # the run was started to build one: it is being built, or the run stopped first
            status = ((record.get("stages") or {}).get("index") or {}).get("status", "pending")
            raise cfg.ConfigError(
                f"{run_dir}: its EK-FAC index (index.k={k}) is not built yet (stage index {status}); let the run "
                "finish, or resume it with the same jaxinf run command, then query it"
            )
        from jaxinf.run.index_run import borrowed_index

        source = borrowed_index(run_dir)
        if source is not None:
            raise cfg.ConfigError(
                f"{run_dir}: the run built no EK-FAC index: it scored with that of {source}; query it"
            )
        raise cfg.ConfigError(
            f"{run_dir}: the run has no EK-FAC index (build one: jaxinf run CONFIG index.k=32, or index.k=full)"
        )
    if not Path(args.queries).is_file():
        what = (
            "is a directory, not a queries file"
            if Path(args.queries).is_dir()
            else "is not a regular file"
            if Path(args.queries).exists()
            else "no such queries file"
        )
        raise cfg.ConfigError(f"{args.queries}: {what}")
    where = Path(os.path.abspath(run_dir))  # RUN given as '.' or '..': beside the run, not '-queries' inside it
    out = args.out or str(where.parent / f"{where.name}-{Path(args.queries).stem}")
    raw = cfg.to_dict(rundir.recorded_config(record, run_dir))
    raw["data"]["queries"], raw["run"]["out"] = str(args.queries), str(out)
    curvature_from = raw["factors"]["from"] or str(run_dir)  # where the run's own curvature lives
    if os.path.realpath(out) in (os.path.realpath(run_dir), os.path.realpath(curvature_from)):  # loops: no raise
        raise cfg.ConfigError(
            f"--out {out}: is the run whose index and curvature the queries are scored against; choose another --out"
        )
    raw["factors"]["from"], raw["scores"]["mode"], raw["index"]["k"] = curvature_from, "index", None
    raw["index"]["from"] = str(run_dir)
    raw["scores"]["self_influence"] = False
    for launch in ("coordinator", "num_processes", "process_id"):  # how the run's processes met, not the query's
        raw["mesh"][launch] = None
    config = cfg.with_overrides(raw, list(args.overrides), str(run_dir / "run.json"))
    enable_compilation_cache()
    # its messages name the option it has, not the config's run.out, and the keys its run fixes, not factors.from
    with rundir.output_named("--out"), rundir.queried():
        pipeline.run(config, overwrite=args.overwrite)
    return 0


MAX_PLANNED_DEVICES = 1 << 24
"""The largest mesh ``jaxinf plan`` lays out (16.7M devices; the largest machines have some hundred thousand)."""


def plan_command(args) -> int:
    from jaxinf.run import plan, plan_report
    from jaxinf.run.chips import chip

    config = _given_config(args)
    meshes = [plan_report.parse_mesh(m) for m in args.mesh] if args.mesh else [(config.mesh.data, config.mesh.model)]
    for data, model in meshes:  # the planner lays out every device: a 10^16-device mesh was a MemoryError
        if data * model > MAX_PLANNED_DEVICES:
            raise plan.PlanError(
                f"mesh {data}x{model}: {data * model:,} devices, more than the "
                f"{MAX_PLANNED_DEVICES:,} the planner lays out"
            )
    if args.json not in (None, "-"):  # a path that cannot take the file is refused before the plan is made
        from jaxinf.run.rundir import check_output_file

        check_output_file(args.json, "--json")
    try:
        device = chip(args.chip, args.peak_tflops, args.hbm_gbps)
    except ValueError as e:
        raise plan.PlanError(str(e)) from None
    if not args.no_compile:
        plan.prepare_devices(meshes)  # before jax starts: the simulated devices the meshes need
    if args.corpus:
        from jaxinf.run import plan_corpus

        return plan_corpus.command(config, meshes, compile=not args.no_compile, json_out=args.json, chip=device)
    return plan_report.command(config, meshes, compile=not args.no_compile, json_out=args.json, chip=device)


def validate_command(args) -> int:
    from jaxinf import config as cfg
    from jaxinf.validate.driver import load_config, validate

    config = load_config(*cfg.config_arguments(args.config, args.overrides))
    enable_compilation_cache()
    validate(config, args.out)
    return 0


def prepare_command(args) -> int:
    """``jaxinf prepare`` (:func:`jaxinf.data.cli.prepare_command`), refused first when OUT_DIR lies inside a jaxinf
    run directory (its ``state/``, say), as every other command's output is: the run's ``--overwrite`` would
    delete the dataset, and the data layer knows nothing of run directories."""
    from jaxinf.data.cli import prepare_command as prepare
    from jaxinf.run import rundir

    rundir.refuse_inside_run(Path(args.out_dir), "OUT_DIR", output=True)
    return prepare(args)


MAX_DEMO_SEEDS = 100
"""The most training seeds ``jaxinf demo --seeds`` takes: each is a model trained, completing its queries and scored
(a few minutes on 2 CPU cores, and a run directory, each), so a hundred is hours already and more is a typo."""


def demo_command(args) -> int:
    from jaxinf import config as cfg
    from jaxinf import demo

    if args.seeds < 1:  # before the output directory is claimed: nothing is written
        raise cfg.ConfigError(f"--seeds {args.seeds}: must be at least 1 (the demo trains one model a seed)")
    if args.seeds > MAX_DEMO_SEEDS:  # 10^11 seeds was accepted: a run directory written for seed after seed, for ever
        raise cfg.ConfigError(
            f"--seeds {args.seeds}: at most {MAX_DEMO_SEEDS} (each seed trains, completes and scores its own model: "
            "a few minutes and a run directory a seed); nothing was written"
        )
    enable_compilation_cache()
    demo.main(args.out, seeds=args.seeds)
    return 0


def _handler(handler):
    """A verb's handler: itself, or ``"module:name"`` imported only when its verb runs (not for every command)."""
    if callable(handler):
        return handler
    import importlib

    module, name = handler.split(":")
    return getattr(importlib.import_module(module), name)


def entry() -> int:
    """The ``jaxinf`` command (its console script and ``python -m jaxinf``): started again with huge pages where they
    help (:func:`jaxinf.hostenv.restart_with_huge_pages`), then :func:`main` on the command line's arguments. Only
    the command restarts its process: a script or notebook calling :func:`main` is never re-executed."""
    from jaxinf.hostenv import restart_with_huge_pages

    try:
        restart_with_huge_pages()
    except ValueError as e:
        print(f"jaxinf: error: {e}", file=sys.stderr)
        return 2
    from jaxinf.run.failures import LostProcess

    code = main(sys.argv[1:])
    if code == LostProcess.exit_code:  # leave without JAX's shutdown barrier: it waits for the lost process, then
        sys.stdout.flush()  # aborts this one with pages of fatal errors
        sys.stderr.flush()
        os._exit(code)
    return code


def _refuse_undecodable(argv: list[str]) -> None:
    """Refuses an argument holding bytes that are not UTF-8 (Python keeps them as lone surrogates): as a path it
    failed deep inside a library (tensorstore, array_record) or when the report wrote it, each a traceback after
    work was done; as a ``key=value`` a YAML ReaderError. Every path and value of jaxinf is UTF-8 text, as in a
    YAML config."""
    from jaxinf.config import ConfigError

    for arg in argv:
        at = next((i for i, c in enumerate(arg) if "\udc80" <= c <= "\udcff"), None)
        if at is not None:
            shown = arg.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            raise ConfigError(
                f"argument '{shown}': not UTF-8 text (byte 0x{ord(arg[at]) - 0xDC00:02x} at character {at + 1}); "
                "jaxinf takes its paths and values as UTF-8 text (rename the file or directory)"
            )


PATH_ARGUMENTS = ("out", "out_dir", "json")
"""The arguments that name a path a command writes (each named as its usage names it): an empty one (``--out ''``, a shell
variable never set) is refused, never taken for the working directory (``Path('')`` is ``.``): ``validate --out ''``
and ``kronfluence export RUN ''`` wrote into it, ``prepare DOCS ''`` failed with a traceback after converting every
document, and ``query --out ''`` fell back to its default."""

INPUT_ARGUMENTS = ("config", "run", "run_dir", "queries", "input", "kronfluence", "from_release")
"""The arguments that name a path a command reads (``analyze RUN_DIR`` writes its report there too): an empty one is
refused as well, never read as the working directory (``jaxinf analyze ''`` analyzed it, ``query '' Q``, ``compare
--run ''`` and ``kronfluence export '' OUT`` named ``.``; ``prepare '' OUT`` refused OUT as inside ``the input
directory``, named as nothing)."""


def _chosen_parser(parser: argparse.ArgumentParser, args) -> argparse.ArgumentParser:
    """The (sub)parser of the command ``args`` holds (``kronfluence export``: its ``export`` parser), whose arguments
    name themselves as its usage does."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = action.choices.get(getattr(args, action.dest, None) or "")
            if chosen is not None:
                return _chosen_parser(chosen, args)
    return parser


def _refuse_empty_paths(parser: argparse.ArgumentParser, args) -> None:
    """Every path argument of the command (:data:`PATH_ARGUMENTS`, :data:`INPUT_ARGUMENTS`) given as an empty or blank
    string: one line naming it as the command's usage does."""
    from jaxinf.config import ConfigError

    for action in _chosen_parser(parser, args)._actions:
        writes = action.dest in PATH_ARGUMENTS
        if not writes and action.dest not in INPUT_ARGUMENTS:
            continue
        value = getattr(args, action.dest, None)
        if isinstance(value, str) and not value.strip():
            label = action.option_strings[-1] if action.option_strings else action.metavar or action.dest.upper()
            leave = f" (or leave {label} out)" if action.option_strings and not action.required else ""
            raise ConfigError(
                f"{label} {value!r}: an empty path; give the path to {'write' if writes else 'read'}{leave}"
            )


class _UsageError(Exception):
    """An argument the command line's parser refused (:class:`_Parser`): ``prog`` names the command."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse's parser whose refusals follow the error policy of every other refusal (:data:`EXIT_CODES`): one line
    ``jaxinf COMMAND: error: ...`` and status 2, returned by :func:`main`, not the usage block above the line and a
    ``SystemExit`` from inside the parser (``jaxinf plan CONFIG --mesh -1x2``, ``--chip foo``, an unknown option or
    verb). ``--help`` still prints the usage. Subparsers are of the same class (argparse makes them so)."""

    def error(self, message: str):  # type: ignore[override]
        raise _UsageError(self.prog, f"{message} (see jaxinf{self.prog[len('jaxinf') :]} --help)")


def _joined_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` with each value that starts with ``-`` joined to the option before it that takes one (``--mesh
    -1x2`` as ``--mesh=-1x2``): argparse takes such a value for an option and refuses "--mesh: expected one
    argument", where the option's own check names what is wrong with the value. A known option is never joined."""
    options: set[str] = set()
    valued: set[str] = set()
    todo = [parser]
    while todo:
        for action in todo.pop()._actions:
            options.update(action.option_strings)
            if action.option_strings and action.nargs is None:
                valued.update(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                todo.extend(action.choices.values())
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in valued and arg.startswith("-") and arg not in ("-", "--") and arg not in options:
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def _config_arguments(parser: argparse.ArgumentParser, config_help: str) -> None:
    """A command's optional YAML config and its ``section.key=value`` overrides (every one optional: a command given
    neither says so itself, in one line)."""
    parser.add_argument("config", nargs="?", help=config_help)
    parser.add_argument("overrides", nargs="*", default=[], metavar="section.key=value", help="config overrides")


def main(argv: list[str] | None = None) -> int:
    """The command line on ``argv`` (default ``sys.argv[1:]``), in this process as it is (no restart)."""
    parser = _Parser(prog="jaxinf", description="EK-FAC influence functions for LLMs in JAX")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="all stages of a config, resumable: curvature, queries, scores, exports, report")
    _config_arguments(
        run, "YAML config (configs/reference.yaml lists every key); optional when every setting is given as an override"
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="start the run directory over (a jaxinf run only): the "
        "old run is kept aside until the new one has finished, and put back if it fails",
    )
    run.add_argument("--help-config", action="store_true", help="print every config key with its default")
    run.set_defaults(handler=run_command)

    qu = sub.add_parser(
        "query",
        help="new queries against a run's EK-FAC index (index.k): no pass over the "
        "documents; writes what jaxinf run writes, the top and bottom documents certified exact",
    )
    qu.add_argument("run", metavar="RUN_OR_INDEX", help="a run directory that built an index (or its state/index)")
    qu.add_argument("queries", metavar="QUERIES", help="queries JSONL (or a Ruis et al. release file)")
    qu.add_argument(
        "overrides",
        nargs="*",
        default=[],  # optional: argparse names a nargs="*" argument without a default among the required ones
        metavar="section.key=value",
        help="overrides of the run's config (scores.damping, scores.query_rank, factors.strategy=kfac, ...)",
    )
    qu.add_argument("--out", help="the output run directory (default: RUN-QUERIES beside the run)")
    qu.add_argument("--overwrite", action="store_true", help="start the output directory over")
    qu.set_defaults(handler=query_command)

    pl = sub.add_parser(
        "plan",
        help="memory and cost of each stage on a mesh, from the model's config.json alone "
        "(no weights): bytes per device, XLA's compiled peak per step, FLOPs per document, time",
    )
    _config_arguments(
        pl,
        "YAML config (model.checkpoint: a directory with config.json; see configs/paper/); optional when every "
        "setting is given as an override",
    )
    pl.add_argument(
        "--mesh",
        action="append",
        metavar="DATAxMODEL",
        help="plan this mesh instead of mesh.data x mesh.model (repeatable)",
    )
    pl.add_argument("--no-compile", action="store_true", help="only the bytes per device (no XLA compilation)")
    pl.add_argument("--json", metavar="FILE", help="also write the plan as JSON ('-': print it, the table on stderr)")
    pl.add_argument(
        "--corpus",
        action="store_true",
        help="count data.documents with the checkpoint's tokenizer (one tokenization pass): its documents, "
        "tokens, rows and the passes over it, and the hours for it",
    )
    pl.add_argument(
        "--chip",
        choices=("h100", "h200", "a100", "v5e", "v5p", "v6e"),
        help="time each per-document step as a roofline on this chip (jaxinf/run/chips.py)",
    )
    pl.add_argument("--peak-tflops", type=float, metavar="T", help="a custom peak matrix TFLOP/s (replaces the chip's)")
    pl.add_argument("--hbm-gbps", type=float, metavar="B", help="a custom HBM bandwidth in GB/s (replaces the chip's)")
    pl.set_defaults(handler=plan_command)

    va = sub.add_parser(
        "validate",
        help="LDS, recall and PBRF of each strategy (retraining on random subsets); "
        "without model.checkpoint, on the built-in world",
    )
    _config_arguments(
        va,
        "YAML config (model.checkpoint, data.documents, data.queries and the validate.* keys); omit it for the "
        "built-in world",
    )
    va.add_argument(
        "--out", default="runs/validate", help="output directory, resumed when it exists (default runs/validate)"
    )
    va.set_defaults(handler=validate_command)

    demo = sub.add_parser("demo", help="the built-in end-to-end example: corpus, model, influence, report")
    demo.add_argument("--out", default="runs/demo", help="where the demo writes everything (default runs/demo)")
    demo.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="train a model for each of the training seeds 0..N-1 on the same corpus (seed k > 0 in OUT/seed-k) and "
        "write the findings' verdicts across them to OUT/seeds.json, OUT/seeds.md and seed 0's report (default 1, "
        f"at most {MAX_DEMO_SEEDS}: a few minutes a seed)",
    )
    demo.set_defaults(handler=demo_command)

    an = sub.add_parser("analyze", help="the paper's statistics and the report of a run directory")
    an.add_argument("run_dir", help="run directory (scores.npy, queries.jsonl, documents.jsonl)")
    an.add_argument(
        "--from-release",
        metavar="RELEASE_JSON",
        help="first convert Ruis et al.'s release_{7B,35B}.json into RUN_DIR (absent or empty)",
    )
    an.set_defaults(handler="jaxinf.analysis.cli:analyze_command")

    prep = sub.add_parser(
        "prepare",
        help="convert documents (JSONL, .jsonl.gz/.zst, Parquet, Arrow shards) to a TFDS array_record dataset",
    )
    prep.add_argument(
        "input",
        metavar="INPUT",
        help="documents: a JSONL file, or a file, directory or glob of JSONL, "
        "gzip/zstd JSONL, Parquet or Arrow shards (a datasets save_to_disk directory too)",
    )
    for name in ("text", "id", "source"):
        prep.add_argument(
            f"--{name}-field",
            default=name,
            metavar="NAME",
            help=f"the field holding each document's {name} (data.{name}_field; default {name})",
        )
    prep.add_argument("out_dir", metavar="OUT_DIR", help="the dataset directory to write (must not exist or be empty)")
    prep.set_defaults(handler=prepare_command)

    from jaxinf.interop.cli import add_parsers

    add_parsers(sub)  # compare, kronfluence import|export

    try:
        args, extra = parser.parse_known_args(_joined_values(parser, sys.argv[1:] if argv is None else list(argv)))
        if any(e in ("-q", "--quiet") for e in extra):  # jaxinf run CONFIG -q ...: the option after the verb
            args.quiet, extra = True, [e for e in extra if e not in ("-q", "--quiet")]
        if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra  # jaxinf run CONFIG --overwrite section.key=value ...
        elif extra:
            _chosen_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    except _UsageError as e:
        print(f"{e.prog}: error: {e}", file=sys.stderr)
        return 2
    _setup_logging(args.quiet)
    from jaxinf.errors import EnvironmentFailure, UserError
    from jaxinf.run.failures import unraisable_hook

    try:
        with unraisable_hook().command():
            _refuse_undecodable(sys.argv[1:] if argv is None else argv)
            _refuse_empty_paths(parser, args)
            return _handler(args.handler)(args)
    except (EnvironmentFailure, UserError) as e:  # jaxinf.errors: one line, the kind's exit code
        print(f"jaxinf {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"jaxinf {args.command}: interrupted; run it again to resume", file=sys.stderr)
        return 130
    except MemoryError as e:  # a host allocation refused (data.batch_size=10**9): a machine limit, one line
        print(
            f"jaxinf {args.command}: error: out of host memory ({e or 'an allocation was refused'}); lower "
            "data.batch_size or data.max_length (jaxinf plan CONFIG estimates each stage's memory); everything "
            "finished is kept",
            file=sys.stderr,
        )
        return 3
    except Exception as e:  # a write the machine refused (read-only, no space, permissions) in any command: one line
        from jaxinf.run.failures import CONDITIONS, find_condition

        found = find_condition(e)
        if found is None and isinstance(e, (IsADirectoryError, NotADirectoryError)):  # bad input: a path's kind
            path = e.filename2 if isinstance(e, IsADirectoryError) and e.filename2 else e.filename
            kind = "a directory where a file is expected" if isinstance(e, IsADirectoryError) else "not a directory"
            print(f"jaxinf {args.command}: error: {path}: {kind}", file=sys.stderr)
            return 2
        if found is None:
            raise
        what, todo = CONDITIONS[found[0]]
        print(
            f"jaxinf {args.command}: error: {found[1] or 'a write'}: {what}; {todo.split(' or choose')[0]} and run "
            "the same command again",
            file=sys.stderr,
        )
        return 3
