"""The hostile passes of issue 25: cases that gave a traceback, lost data or said something misleading, each
through the command line as the user met it."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from pipeline_support import make_world, overrides

from jaxinf import cli
from jaxinf.demo import train


def _one_error(capsys, command: str, alone: bool = False) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"jaxinf {command}: error: ")]
    assert len(lines) == 1, err
    assert not alone or err.strip() == lines[0], err
    return lines[0][len(f"jaxinf {command}: error: ") :]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"), n_documents=8, n_queries=2)


@pytest.fixture(scope="module")
def finished(world, tmp_path_factory):
    """A finished run of ``world`` (one batch, the empirical Fisher: few compiled programs)."""
    from jaxinf import config as cfg
    from jaxinf import pipeline

    out = tmp_path_factory.mktemp("finished") / "run"
    pipeline.run(cfg.load(None, overrides(world, out, **{"data.batch_size": 8, "factors.fisher": "empirical"})))
    return out


@pytest.mark.parametrize("target", ["dangling", "loop"])
def test_an_output_that_is_a_broken_symlink_is_one_line(world, tmp_path, capsys, monkeypatch, target):
    """``run.out`` or ``--out`` naming a symbolic link to nothing (a scratch volume not mounted) or a link loop was a
    ``FileExistsError`` traceback from the lock's ``mkdir``; nothing is created anywhere."""
    monkeypatch.chdir(tmp_path)
    if target == "dangling":
        os.symlink(tmp_path / "unmounted" / "runs", "out")
    else:
        os.symlink("loop", "out")
        os.symlink("out", "loop")
    before = sorted(os.listdir(tmp_path))
    assert cli.main(["-q", "run", *overrides(world, Path("out"))]) == 2
    assert _one_error(capsys, "run").startswith("out: cannot create the run directory (out is a symbolic link to ")
    assert cli.main(["-q", "demo", "--out", "out"]) == 2
    assert _one_error(capsys, "demo").startswith("out: cannot create the run directory (out is a symbolic link to ")
    assert sorted(os.listdir(tmp_path)) == before and not (tmp_path / "unmounted").exists()


def test_a_directory_that_cannot_be_made_is_one_line(tmp_path):
    """A ``mkdir`` refused for a reason other than space or permissions (``/proc/x``: ENOENT) is one line too."""
    from jaxinf.run.lock import RunLock
    from jaxinf.run.rundir import StoreError

    with pytest.raises(StoreError, match=r"^/proc/jaxinf-run: cannot create the run directory \(No such file"):
        RunLock("/proc/jaxinf-run").acquire()


def test_a_queries_file_that_is_not_a_regular_file_says_so(tmp_path):
    """``data.queries=/dev/null`` or a FIFO was "no such file", though the path exists."""
    from jaxinf import config as cfg
    from jaxinf.run.inputs import InputError, check_inputs

    (tmp_path / "dir").mkdir()
    (tmp_path / "docs.jsonl").write_text("")
    os.mkfifo(tmp_path / "fifo")
    settings = {
        "model.checkpoint": tmp_path / "dir",
        "data.documents": tmp_path / "docs.jsonl",
        "data.queries": tmp_path / "fifo",
    }
    with pytest.raises(InputError) as e:
        check_inputs(cfg.load(None, [f"{k}={v}" for k, v in settings.items()]))
    assert str(e.value) == f"data.queries: {tmp_path / 'fifo'}: is not a regular file"


def test_plan_refuses_what_it_cannot_plan_or_write_in_one_line(tmp_path, capsys):
    """``jaxinf plan``: a mesh of 10^16 devices was a 71 PiB MemoryError traceback, ``--json`` into a missing
    directory or onto a directory a traceback after the whole plan, a negative or infinite ``--peak-tflops`` or
    ``--hbm-gbps`` a plan of negative or zero hours."""
    for extra, message in (
        (
            ["--mesh", "99999999x99999999"],
            "mesh 99999999x99999999: 9,999,999,800,000,001 devices, more than the 16,777,216 the planner lays out",
        ),
        (["mesh.data=99999999", "mesh.model=99999999"], "mesh 99999999x99999999: 9,999,999,800,000,001 devices"),
        (["--json", str(tmp_path / "no" / "p.json")], f"--json {tmp_path / 'no' / 'p.json'}: no such directory"),
        (["--json", str(tmp_path)], f"--json {tmp_path}: is a directory; give the path of a file to write"),
        (["--chip", "h100", "--peak-tflops", "-5"], "--peak-tflops -5: must be a positive finite number"),
        (["--chip", "h100", "--hbm-gbps", "inf"], "--hbm-gbps inf: must be a positive finite number"),
    ):
        assert cli.main(["-q", "plan", "data.max_length=8", "--no-compile", *extra]) == 2
        assert _one_error(capsys, "plan").startswith(message)
    assert os.listdir(tmp_path) == []
    # a length the model has no positions for: jaxinf run refuses it before reading a weight, and so does the plan
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(train.hf_config(64, max_positions=128)))
    assert cli.main(["-q", "plan", f"model.checkpoint={model}", "data.max_length=129", "--no-compile"]) == 2
    assert _one_error(capsys, "plan").startswith("data.max_length=129 is above the model's max_position_embeddings=128")


def test_prepare_into_a_broken_symlink_is_one_line_and_leaves_nothing(tmp_path, capsys):
    """``jaxinf prepare DOCS OUT`` with OUT a dangling symbolic link converted every document, then failed on the
    final rename with a NotADirectoryError traceback; ``/proc/x`` was a FileNotFoundError one."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"id": "a", "text": "one two"}\n')
    os.symlink(tmp_path / "unmounted" / "ds", tmp_path / "out")
    assert cli.main(["-q", "prepare", str(docs), str(tmp_path / "out")]) == 2
    assert _one_error(capsys, "prepare") == (
        f"{tmp_path / 'out'}: is a symbolic link to {tmp_path / 'unmounted' / 'ds'}, "
        "which does not resolve to a directory; nothing was written"
    )
    assert sorted(os.listdir(tmp_path)) == ["docs.jsonl", "out"]
    assert cli.main(["-q", "prepare", str(docs), "/proc/jaxinf-ds"]) == 2
    assert _one_error(capsys, "prepare").startswith("/proc/jaxinf-ds: cannot create the dataset directory (")


def test_kronfluence_export_overwrite_never_deletes_what_it_did_not_write(world, finished, tmp_path, capsys):
    """``jaxinf kronfluence export RUN DIR --overwrite`` deleted every ``*.safetensors`` in DIR: given a model's
    checkpoint directory, its weights. It also wrote factor files into a jaxinf run directory, and a dangling
    symbolic link was a traceback. Now only a kronfluence factors directory is overwritten, and only its factor files."""
    import shutil

    model = shutil.copytree(world["model"], tmp_path / "model")
    before = sorted(os.listdir(model))
    assert cli.main(["-q", "kronfluence", "export", str(finished), str(model), "--overwrite"]) == 2
    assert _one_error(capsys, "kronfluence") == (
        f"{model}: not a kronfluence factors directory (no factor_arguments.json; it holds {', '.join(before)}); "
        "--overwrite replaces only factor files: choose another directory"
    )
    assert sorted(os.listdir(model)) == before
    assert cli.main(["-q", "kronfluence", "export", str(finished), str(finished), "--overwrite"]) == 2
    assert _one_error(capsys, "kronfluence") == f"{finished}: is a jaxinf run directory; export into another directory"
    assert not (finished / "factor_arguments.json").exists()
    assert cli.main(["-q", "kronfluence", "export", str(finished), str(finished / "state" / "kf")]) == 2
    assert _one_error(capsys, "kronfluence") == (
        f"{finished / 'state' / 'kf'}: is inside the jaxinf run directory {finished}; export outside it"
    )
    os.symlink(tmp_path / "unmounted", tmp_path / "link")
    assert cli.main(["-q", "kronfluence", "export", str(finished), str(tmp_path / "link")]) == 2
    assert _one_error(capsys, "kronfluence").endswith("which does not resolve to a directory")
    factors = tmp_path / "factors"
    assert cli.main(["-q", "kronfluence", "export", str(finished), str(factors)]) == 0
    (factors / "notes.txt").write_text("mine")
    assert cli.main(["-q", "kronfluence", "export", str(finished), str(factors), "--overwrite"]) == 0
    assert (factors / "notes.txt").read_text() == "mine" and (factors / "lambda_matrix.safetensors").is_file()


def test_a_lock_that_cannot_be_written_leaves_nothing_and_names_its_file(tmp_path, monkeypatch, capsys):
    """On a full disk ``jaxinf run`` (and demo, validate) created the run directory and its lock file, failed to write
    the holder into it, and left both, saying only "a write: no space left on device"."""
    import errno

    from jaxinf.run import lock

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lock.os, "pwrite", full)
    assert cli.main(["-q", "demo", "--out", str(tmp_path / "a" / "demo")]) == 3
    assert _one_error(capsys, "demo").startswith(f"{tmp_path / 'a' / 'demo' / '.jaxinf.lock'}: no space left on device")
    assert os.listdir(tmp_path) == []


def test_a_kronfluence_export_that_fails_leaves_the_directory_as_it_was(finished, tmp_path, monkeypatch, capsys):
    """On a full disk ``jaxinf kronfluence export`` left the factor files it had written (and none of
    factor_arguments.json) in OUT_DIR; with --overwrite it had already deleted the previous export's."""
    import errno

    from jaxinf.interop import kronfluence as kf

    out = tmp_path / "factors"
    assert cli.main(["-q", "kronfluence", "export", str(finished), str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    written = []
    real = kf.write_tensors

    def fills_up(path, *a, **kw):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        written.append(path)
        real(path, *a, **kw)

    monkeypatch.setattr(kf, "write_tensors", fills_up)
    assert cli.main(["-q", "kronfluence", "export", str(finished), str(out), "--overwrite"]) == 3
    assert "no space left on device" in _one_error(capsys, "kronfluence")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    written.clear()
    assert cli.main(["-q", "kronfluence", "export", str(finished), str(tmp_path / "new")]) == 3
    capsys.readouterr()
    assert sorted(os.listdir(tmp_path)) == ["factors"]


def test_a_failure_of_a_run_with_factors_from_names_the_stage_it_was_in():
    """``jaxinf query`` (and any run with factors.from) on a full disk said "(stage covariance)", a stage it never
    runs: its covariance, eigen and Lambda stay pending, fitted by the other run."""
    from types import SimpleNamespace

    from jaxinf import config as cfg
    from jaxinf.pipeline import _running_stage

    status = {s: "pending" for s in cfg.STAGES}
    store = SimpleNamespace(record={"config": {"factors": {"from": "run"}}}, status=lambda s: status[s])
    assert _running_stage(store) == "queries"
    status["queries"] = "done"
    assert _running_stage(store) == "scores"
    store.record["config"]["factors"]["from"] = None
    assert _running_stage(store) == "covariance"


def test_an_output_inside_a_run_directory_is_refused(finished, tmp_path, capsys, monkeypatch):
    """``jaxinf run ... run.out=RUN/state --overwrite`` took RUN's state directory (which holds a copy of RUN's record)
    for a run, set its curvature, index and scores aside and deleted them once the new run had finished: exit 0,
    RUN's own results gone. Any output inside a run directory is now refused, by every command that writes one."""
    from jaxinf import config as cfg
    from jaxinf import pipeline
    from jaxinf.run.rundir import StoreError

    before = sorted(str(p.relative_to(finished)) for p in finished.rglob("*"))
    raw = cfg.to_dict(cfg.load(None, [f"run.out={finished / 'state'}"]))
    for out in (finished / "state", finished / "state" / "covariance", finished / "new"):
        raw["run"]["out"] = str(out)
        with pytest.raises(
            StoreError, match=f"^{out}: is inside the jaxinf run directory {finished}; choose a run.out outside it$"
        ):
            pipeline._claim(cfg.from_dict(raw), overwrite=True)
    os.symlink(finished / "state", tmp_path / "link")
    raw["run"]["out"] = str(tmp_path / "link")
    with pytest.raises(StoreError, match="is inside the jaxinf run directory"):
        pipeline._claim(cfg.from_dict(raw), overwrite=True)
    assert cli.main(["-q", "demo", "--out", str(finished / "demo")]) == 2
    assert (
        _one_error(capsys, "demo") == f"{finished / 'demo'}: is inside the jaxinf run directory {finished}; "
        "choose a --out outside it"
    )
    assert sorted(str(p.relative_to(finished)) for p in finished.rglob("*")) == before


def test_factors_from_naming_run_out_itself_is_refused_first(world, finished):
    """``jaxinf run CONFIG factors.from=RUN --overwrite`` with run.out RUN set the run aside, then failed with
    "factors.from: RUN has no finished curvature (stage lambda is pending)" (and put it back)."""
    from jaxinf import config as cfg
    from jaxinf.run.inputs import InputError, check_inputs

    for given in (str(finished), str(finished) + "/"):
        config = cfg.load(None, overrides(world, finished, **{"factors.from": given}))
        with pytest.raises(InputError, match=r"^factors.from: .* is run.out itself \(a run reuses its own curvature"):
            check_inputs(config)


def test_host_memory_exhausted_is_one_line(monkeypatch, capsys):
    """``data.batch_size=1000000000`` was a 179 GiB ``_ArrayMemoryError`` traceback from the batch's allocation."""
    from jaxinf import pipeline

    def too_big(config, overwrite=False):
        import numpy as np

        return np.zeros((1 << 40, 1 << 20), np.int32)  # 4 EiB: refused by the allocator

    monkeypatch.setattr(pipeline, "run", too_big)
    assert cli.main(["-q", "run", "data.max_length=8"]) == 3
    assert _one_error(capsys, "run").startswith("out of host memory (Unable to allocate ")


def test_a_label_the_font_lacks_draws_without_python_warnings(tmp_path, recwarn):
    """A query id with an emoji or a NUL printed matplotlib's "UserWarning: Glyph 128165 missing from font(s)" with
    a source line, twice per figure, among jaxinf's own lines."""
    import warnings

    from matplotlib.figure import Figure

    from jaxinf.analysis import figures

    warnings.simplefilter("always")
    fig = Figure()
    fig.add_subplot().set_title(figures.lab("query \U0001f4a5 \x00"))
    figures._save(fig, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0
    assert not [w for w in recwarn if "Glyph" in str(w.message)], [str(w.message) for w in recwarn]


def test_a_compressed_file_without_its_suffix_says_it_is_compressed(tmp_path):
    """A gzipped queries file (queries are read only as plain JSONL), or gzipped documents named .jsonl, was
    "invalid UTF-8 at byte 2", which sends the user looking for a bad character."""
    import gzip

    from jaxinf.data.errors import DataError
    from jaxinf.data.queries import read_queries

    path = tmp_path / "queries.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"prompt": "a", "completion": "b"}\n'))
    with pytest.raises(
        DataError,
        match=r"queries.jsonl.gz:1: invalid UTF-8 at byte 2 \(the file is gzip-compressed: "
        r"documents are read compressed only when the name ends in \.jsonl\.gz; "
        r"queries must be decompressed\)$",
    ):
        read_queries(str(path))


def test_a_damaged_export_of_a_finished_run_is_redone_on_a_rerun(world, finished, tmp_path):
    """A finished run whose scores.npy was cut short (a copy interrupted, a damaged disk) was "finished" on a rerun:
    exit 0, nothing redone, the damaged file kept. A rerun now writes the exports again, byte-identical."""
    import shutil

    from jaxinf import config as cfg
    from jaxinf import pipeline

    run = shutil.copytree(finished, tmp_path / "run")
    want = (run / "scores.npy").read_bytes()
    with open(run / "scores.npy", "r+b") as f:
        f.truncate(100)
    with open(run / "topk.jsonl", "r+b") as f:
        f.truncate(f.seek(0, 2) - 7)
    pipeline.run(cfg.load(None, overrides(world, run, **{"data.batch_size": 8, "factors.fisher": "empirical"})))
    assert (run / "scores.npy").read_bytes() == want
    assert (run / "topk.jsonl").read_bytes() == (finished / "topk.jsonl").read_bytes()


def test_an_edited_but_whole_export_of_a_finished_run_is_written_again(world, finished, tmp_path, caplog):
    """A finished run whose scores.npy was replaced by a whole file of another shape, or with NaN in it, and whose
    topk.jsonl was edited line for line, was "finished" on a rerun: exit 0, the edited files kept as the run's
    results. The exports stage records what it wrote; a rerun names each changed file and writes it again."""
    import shutil

    import numpy as np

    from jaxinf import config as cfg
    from jaxinf import pipeline

    run = shutil.copytree(finished, tmp_path / "run")
    want = {name: (run / name).read_bytes() for name in ("scores.npy", "topk.jsonl")}
    scores = np.load(run / "scores.npy")
    scores[0, 0] = np.nan
    np.save(run / "scores.npy", scores)
    (run / "topk.jsonl").write_text((run / "topk.jsonl").read_text().replace('"score": ', '"score": 1'))
    with caplog.at_level("WARNING", logger="jaxinf"):
        pipeline.run(cfg.load(None, overrides(world, run, **{"data.batch_size": 8, "factors.fisher": "empirical"})))
    assert {name: (run / name).read_bytes() for name in want} == want
    assert f"{run / 'scores.npy'}, {run / 'topk.jsonl'}: changed since this run wrote it; written again" in caplog.text
    np.save(run / "scores.npy", scores[:, :3])  # a whole file of another shape
    pipeline.run(cfg.load(None, overrides(world, run, **{"data.batch_size": 8, "factors.fisher": "empirical"})))
    assert (run / "scores.npy").read_bytes() == want["scores.npy"]


def test_analyze_does_not_show_texts_of_a_corpus_edited_after_the_run(world, finished, tmp_path, capsys):
    """``jaxinf analyze RUN`` read the document texts from the corpus named in run.json as it is now: after the
    corpus was edited, the report showed the new texts beside scores of the old ones, without a word. The corpus
    is checked against the run's record of it first; an edited one gives no texts and says why."""
    import shutil

    run, docs = tmp_path / "run", tmp_path / "docs.jsonl"
    shutil.copytree(finished, run)
    shutil.copy(world["docs"], docs)
    record = json.loads((run / "run.json").read_text())
    record["config"]["data"]["documents"] = str(docs)
    (run / "run.json").write_text(json.dumps(record))
    assert cli.main(["-q", "analyze", str(run)]) == 0
    assert json.loads((run / "summary.json").read_text())["text_source"] == f"{docs} (run.json config.data.documents)"
    capsys.readouterr()
    docs.write_text(docs.read_text().replace('"text": "', '"text": "EDITEDAFTER '))
    assert cli.main(["-q", "analyze", str(run)]) == 0
    assert "EDITEDAFTER" not in (run / "report" / "index.html").read_text()
    assert "EDITEDAFTER" not in (run / "summary.json").read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["text_source"] == "none"
    notes = summary["notes"]
    assert f"run.json: config.data.documents: {docs}: its documents changed since the run scored them" in " ".join(
        notes
    )


def test_a_rerun_of_a_finished_run_keeps_the_scores_stages_record(world, finished, tmp_path):
    """A rerun of a finished run computes nothing, but it rewrote the scores stage's record in run.json with the
    timing of the empty pass (0 seconds, 0 batches, no compile time): the first run's timing was lost."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = json.loads((run / "run.json").read_text())["stages"]
    assert before["scores"]["timing"]["batches"] == 1
    settings = {"data.batch_size": 8, "factors.fisher": "empirical"}
    assert cli.main(["-q", "run", *overrides(world, run, **settings)]) == 0
    assert json.loads((run / "run.json").read_text())["stages"]["scores"] == before["scores"]


@pytest.mark.parametrize(
    "damage", ["documents.jsonl:dir", "scores.npy:dir", "summary.json:dir", "queries.jsonl:latin1"]
)
def test_analyze_on_a_damaged_export_is_one_line(finished, tmp_path, capsys, damage):
    """``jaxinf analyze RUN`` with a directory where an export belongs (documents.jsonl, scores.npy, or summary.json,
    which it writes) or a byte that is not UTF-8 in a JSONL export was an IsADirectoryError or UnicodeDecodeError
    traceback (exit 1): one line naming the file (and line), exit 2."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    name, kind = damage.split(":")
    if kind == "dir":
        (run / name).unlink()
        (run / name).mkdir()
        expected = f"{run / name}: a directory where a file is expected"
        if name.endswith(".jsonl"):
            expected = f"{name}: cannot read {run / name} (Is a directory)"
    else:
        with open(run / name, "ab") as f:
            f.write(b"caf\xe9\n")
        expected = f"{name} line 3: invalid UTF-8 at byte 4"
    capsys.readouterr()
    assert cli.main(["-q", "analyze", str(run)]) == 2
    assert _one_error(capsys, "analyze") == expected


def test_analyze_of_a_directory_that_is_no_run_leaves_nothing(tmp_path, capsys):
    """``jaxinf analyze DIR`` on a directory holding no run (neither run.json nor scores.npy) refused it, but left
    its lock file ``.jaxinf.lock`` behind in that directory."""
    (tmp_path / "data.csv").write_text("precious\n")
    assert cli.main(["-q", "analyze", str(tmp_path)]) == 2
    assert _one_error(capsys, "analyze") == f"scores.npy: missing (expected at {tmp_path / 'scores.npy'})"
    assert sorted(os.listdir(tmp_path)) == ["data.csv"]


def test_an_overwrite_refused_by_an_input_error_does_not_say_the_same_command_starts_it_over(
    world, finished, tmp_path, capsys
):
    """The hostile pass's note on one ``--overwrite`` message: refused by an input error met after the old run was
    set aside, the warning gave a Python class name and said "the same command starts it over", which the same
    command cannot (it is refused again). It now points at the error and says the old run is back. (The pass met it
    with a corpus whose ids repeat, refused before anything is set aside since the eleventh pass; a weight that is not
    finite is found only when the weights are read, after.)"""
    import shutil

    from safetensors.numpy import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    model = shutil.copytree(world["model"], tmp_path / "model")
    weights = load_file(model / "model.safetensors")
    name = next(k for k in sorted(weights) if k.endswith("down_proj.weight"))
    weights[name][0, 0] = np.nan
    save_file(weights, model / "model.safetensors", metadata={"format": "np"})
    settings = {"data.batch_size": 8, "factors.fisher": "empirical", "model.checkpoint": model}
    assert cli.main(["-q", "run", *overrides(world, run, **settings), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert (
        f"jaxinf: {run}: --overwrite stopped on the error below; the previous run is back as it was and the new " in err
    )
    assert "Error" not in err.replace("jaxinf run: error", "") and "starts it over" not in err
    assert err.strip().splitlines()[-1].startswith("jaxinf run: error: ") and name in err
    assert sorted(os.listdir(run)) == sorted(os.listdir(finished))


@pytest.mark.parametrize("damage", ["repeated id", "bad JSON", "no text", "empty", "old Mac line ends", "dedupe"])
def test_an_overwrite_refused_for_its_corpus_never_sets_the_old_run_aside(world, finished, tmp_path, capsys, damage):
    """The eleventh pass: with ``--overwrite`` and queries naming no ``supports``, a corpus error (a repeated id, a
    line that is no JSON or has no text, an empty corpus) was found only after the old run was set aside (and put
    back); a ``supports`` id skipped by ``data.dedupe`` was called "unknown". The corpus is opened, scanned and checked with the other start-up checks, before the lock: one line, the
    old run's directory never touched (same entries, same inodes), no --overwrite warning."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = {p: p.stat().st_ino for p in sorted(run.rglob("*"))}
    lines = world["docs"].read_text().splitlines(keepends=True)
    docs, queries = tmp_path / "docs.jsonl", tmp_path / "queries.jsonl"
    queries.write_text(  # no supports: the corpus was opened up front only to check them
        "".join(
            json.dumps({k: v for k, v in json.loads(line).items() if k != "supports"}) + "\n"
            for line in world["queries"].read_text().splitlines()
        )
    )
    settings = {"data.batch_size": 8, "factors.fisher": "empirical", "data.documents": docs, "data.queries": queries}
    if damage == "repeated id":
        docs.write_text("".join(lines) + lines[0])
        message = f'{docs}:{len(lines) + 1}: duplicate id "doc00000" (first at line 1)'
    elif damage == "bad JSON":
        docs.write_text("".join(lines[:2]) + "{oops\n" + "".join(lines[2:]))
        message = f"{docs}:3: invalid JSON (Expecting property name enclosed in double quotes, column 2)"
    elif damage == "no text":
        docs.write_text("".join(lines[:4]) + '{"id": "x"}\n')
        message = f'{docs}:5: missing field "text"'
    elif damage == "empty":
        docs.write_text("\n")
        message = f"no documents with at least 2 tokens in {docs} (0 documents kept; stage covariance)"
    elif damage == "old Mac line ends":
        docs.write_text("".join(lines).replace("\n", "\r"))
        message = f"{docs}:1: {len(lines)} lines separated by a carriage return alone"
    else:  # a supports id the corpus has, skipped by data.dedupe as the duplicate of an earlier document
        docs.write_text(lines[0].replace("doc00000", "first") + "".join(lines))
        settings["data.dedupe"] = "exact"
        queries.write_text(
            '{"id": "a", "prompt": "the river of milin is the", "completion": "1 2 3 .", "supports": ["doc00000"]}\n'
        )
        message = (
            f'{queries}:1: query "a": supports names document "doc00000", which data.dedupe: exact skipped as a '
            'duplicate of "first" (the same text); name "first" instead'
        )
    assert cli.main(["-q", "run", *overrides(world, run, **settings), "--overwrite"]) == 2
    line = _one_error(capsys, "run", alone=True)  # the only line: no --overwrite warning, the run was never set aside
    assert line.startswith(message), line
    assert {p: p.stat().st_ino for p in sorted(run.rglob("*"))} == before
    assert not (run / ".jaxinf-previous").exists()


def test_an_overwrite_with_a_query_too_long_is_refused_before_the_old_run_is_set_aside(
    world, finished, tmp_path, capsys
):
    """A third-pass leftover: docs/data.md says every query is tokenized and checked before ``--overwrite`` sets the
    old run aside, but the check ran after (the old run was moved into .jaxinf-previous/ and back). It now runs with
    the other start-up checks: one line, the old run's directory never touched (same entries, same inodes)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = {p: p.stat().st_ino for p in sorted(run.rglob("*"))}
    settings = {"data.batch_size": 8, "factors.fisher": "empirical", "data.max_length": 8}
    assert cli.main(["-q", "run", *overrides(world, run, **settings), "--overwrite"]) == 2
    line = _one_error(capsys, "run", alone=True)  # the only line: no --overwrite warning, the run was never set aside
    assert line.endswith("more than data.max_length (8)") and "queries.jsonl:1: " in line, line
    assert {p: p.stat().st_ino for p in sorted(run.rglob("*"))} == before
    assert not (run / ".jaxinf-previous").exists()


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_validate_refuses_a_non_finite_damping(tmp_path, capsys, value):
    """``validate.dampings=[nan]`` was accepted and ``jaxinf validate`` ran to the end (exit 0) with a NaN damping
    in its comparison, although ``scores.damping=nan`` is refused: the same rule, refused first, nothing written."""
    out = tmp_path / "v"
    assert cli.main(["-q", "validate", "--out", str(out), f"validate.dampings=[null, {value}]"]) == 2
    assert _one_error(capsys, "validate") == (
        "command line: validate.dampings: expected a non-empty list of null or finite non-negative numbers, "
        f"got [None, {float(value)}]"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "settings, key",
    [
        (["validate.builtin_documents=1"], "validate.builtin_documents"),
        (["validate.fraction=0.01"], "validate.fraction"),
        (["validate.batch_size=100"], "validate.batch_size"),
    ],
)
def test_validate_names_the_key_that_made_a_subset_smaller_than_a_batch(tmp_path, capsys, settings, key):
    """A third-pass leftover: ``validate.builtin_documents=1`` was refused as ``validate.batch_size: 16 is more than
    the 0 documents of a subset``, naming a key the user never set. The line now leads with the key that differs
    from its default and names the others that decide a subset's size; nothing is written."""
    out = tmp_path / "v"
    assert cli.main(["-q", "validate", "--out", str(out), *settings]) == 2
    line = _one_error(capsys, "validate")
    assert line.startswith(f"{key}: a subset holds "), line
    assert "validate.fraction=" in line and "validate.batch_size=" in line and "validate.builtin_documents=" in line
    assert not out.exists()


def test_a_topk_above_the_number_of_documents_lists_every_document(world, finished, tmp_path, capsys):
    """``scores.topk=1000000000`` on a corpus of 8 documents sized the scoring pass's running top (``[Q, K, T]``
    per-token arrays) by ``scores.topk``: a 384 GB allocation traceback after the curvature was fitted (and an
    abort from XLA for a topk near 2**63). The running top keeps at most every document, as the exports do: the run
    finishes with every document in each query's top and bottom, and its scores are those of the finished run."""

    out = tmp_path / "run"
    settings = {"data.batch_size": 8, "factors.fisher": "empirical", "scores.topk": 10**9}
    assert cli.main(["-q", "run", *overrides(world, out, **settings)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    for line in (out / "topk.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert len(record["top"]) == len(record["bottom"]) == 8
    np.testing.assert_array_equal(np.load(out / "scores.npy"), np.load(finished / "scores.npy"))


def test_a_topk_beyond_int32_indices_is_refused_in_one_line(world, tmp_path, capsys):
    """``jaxinf plan`` with ``plan.documents=10**12 scores.topk=10**11`` was a ``lax.top_k`` traceback (int32
    indices); ``scores.topk`` is bounded like every other key, for every command."""
    from jaxinf.config import reading

    config = tmp_path / "c.yaml"
    config.write_text(f"model:\n  checkpoint: {world['model']}\n")
    assert cli.main(["-q", "plan", str(config), "scores.topk=100000000000", "plan.documents=1000000000000"]) == 2
    assert _one_error(capsys, "plan") == (
        f"command line: scores.topk: must be at most {reading.MAX_TOPK:,} (the documents listed per query), "
        "got 100000000000"
    )


@pytest.mark.parametrize(
    "command, setting, message",
    [
        (
            "run",
            "factors.seed=99999999999999999999999",
            "factors.seed: must be a 64-bit integer (from -2**63 to 2**63 - 1)",
        ),
        ("validate", "validate.seed=-1", "validate.seed: must be an integer from 0 to 2**32 - 1"),
    ],
)
def test_a_seed_out_of_range_is_refused_first(world, tmp_path, capsys, command, setting, message):
    """``factors.seed=99999999999999999999999`` created the run directory and died in ``jax.random.key`` with an
    ``OverflowError`` traceback; ``validate.seed=-1`` trained the full model and then died in numpy's generator
    (``expected non-negative integer``). Both are refused in one line before anything is written."""
    out = tmp_path / "out"
    argv = [*overrides(world, out), setting] if command == "run" else ["--out", str(out), setting]
    assert cli.main(["-q", command, *argv]) == 2
    assert _one_error(capsys, command).startswith(f"command line: {message}, got ")
    assert not out.exists()


def test_a_query_batch_larger_than_the_queries_holds_only_the_queries(world, tmp_path, capsys):
    """``data.query_batch_size=10**20`` was a ``ValueError: Maximum allowed dimension exceeded`` traceback (the query
    batch was padded to that many rows; 1000 would have computed 998 padding rows' gradients for 2 queries): a
    query batch never holds more rows than there are queries."""
    from jaxinf.data.queries import query_batches
    from jaxinf.data.tokenize import EncodedQuery

    encoded = [EncodedQuery(np.arange(5, dtype=np.int32), 2), EncodedQuery(np.arange(4, dtype=np.int32), 3)]
    (batch,) = query_batches(encoded, batch_size=10**20, max_length=48)
    assert batch["tokens"].shape[0] == 2 and list(batch["index"]) == [0, 1]
    out = tmp_path / "run"
    settings = {"data.batch_size": 8, "factors.fisher": "empirical", "data.query_batch_size": 10**20}
    assert cli.main(["-q", "run", *overrides(world, out, **settings)]) == 0
    assert "Traceback" not in capsys.readouterr().err and (out / "scores.npy").exists()


@pytest.mark.parametrize(
    "setting, message",
    [
        (
            "validate.steps=99999999999999999999",
            "validate.steps: must be at most 2,147,483,647 (one scan over int32 steps), got 99999999999999999999",
        ),
        (
            "validate.steps=1000000000",
            "validate.steps: 1 schedules of 1000000000 steps x 4 documents take 18.6 GiB, more than this host's "
            "memory (16.0 GiB); lower it",
        ),
        (
            "validate.subsets=99999999999",
            "validate.subsets: 99999999999 subsets of 16 documents take 11,920.9 GiB, more than this host's "
            "memory (16.0 GiB); lower it",
        ),
    ],
)
def test_validate_steps_and_subsets_beyond_memory_are_refused_before_training(
    tmp_path, capsys, monkeypatch, setting, message
):
    """``validate.steps`` or ``validate.subsets`` of 10**20 ran for ever without a line: the minibatch schedule
    (``[group, steps, batch]``) and the subsets (``[subsets, size]``) are drawn whole before any training, and
    their lists grew until memory ran out. Both are refused first, naming the key and the memory they need."""
    from jaxinf import hostenv

    monkeypatch.setattr(hostenv, "host_memory", lambda: 16 * 2**30)
    monkeypatch.setattr("jaxinf.validate.driver.host_memory", lambda: 16 * 2**30)
    out = tmp_path / "v"
    quick = ["validate.steps=2", "validate.subsets=2", "validate.seeds=1", "validate.builtin_documents=32"]
    quick += ["validate.batch_size=4", "validate.group=1", "validate.strategies=[identity]"]
    assert cli.main(["-q", "validate", "--out", str(out), *quick, setting]) == 2
    assert _one_error(capsys, "validate") == message
    assert not out.exists()


def test_validate_bootstrap_is_bounded_and_its_memory_flat(tmp_path, capsys, monkeypatch):
    """``validate.bootstrap=99999999999999999999`` retrained every model and then died in numpy (``Maximum allowed
    dimension exceeded``), and a large count formed ``resamples x queries x subsets`` arrays at once (1e6 resamples
    of 24 queries and 32 subsets: tens of GB). It is refused first above 10**6, and the resamples are ranked a chunk
    at a time, giving the same interval."""
    from jaxinf.validate import lds

    out = tmp_path / "v"
    quick = ["validate.steps=2", "validate.subsets=2", "validate.seeds=1", "validate.builtin_documents=32"]
    quick += ["validate.batch_size=4", "validate.strategies=[identity]"]
    assert cli.main(["-q", "validate", "--out", str(out), *quick, "validate.bootstrap=99999999999999999999"]) == 2
    assert _one_error(capsys, "validate") == (
        "command line: validate.bootstrap: must be at most 1,000,000 (resamples of a 95% interval), "
        "got 99999999999999999999"
    )
    assert not out.exists()
    rng = np.random.default_rng(0)
    predicted, actual = rng.normal(size=(16, 3)), rng.normal(size=(16, 3))
    whole = lds.bootstrap_ci95(predicted, actual, 200, 7)
    monkeypatch.setattr(lds, "BOOTSTRAP_CHUNK", 5 * predicted.size)  # 5 resamples at a time
    assert lds.bootstrap_ci95(predicted, actual, 200, 7) == whole


@pytest.mark.parametrize(
    "splits, train, message",
    [
        (5, False, "dataset_dict.json: not a datasets DatasetDict file (its splits are not a list of names: 5)"),
        (
            "train",
            False,
            'dataset_dict.json: not a datasets DatasetDict file (its splits are not a list of names: "train")',
        ),
        (
            ["train"],
            False,
            "train: the split train of {d}/dataset_dict.json is not a datasets save_to_disk directory "
            "(no such directory)",
        ),
        (
            ["train"],
            True,
            "train: the split train of {d}/dataset_dict.json is not a datasets save_to_disk directory "
            "(no state.json in it)",
        ),
    ],
)
def test_a_damaged_datasetdict_directory_is_one_line(tmp_path, capsys, splits, train, message):
    """A ``datasets`` DatasetDict directory whose ``dataset_dict.json`` lists its splits as a number was a
    ``TypeError`` traceback; one whose ``train`` split is missing (or no ``save_to_disk`` directory) fell back to
    reading the directory as JSONL shards and blamed ``dataset_dict.json:1: missing field "text"``, as if the user
    had given a document file. Both name the DatasetDict in one line."""
    d = tmp_path / "dd"
    d.mkdir()
    (d / "dataset_dict.json").write_text(json.dumps({"splits": splits}))
    if train:
        (d / "train").mkdir()
        (d / "train" / "notes.jsonl").write_text('{"text": "not a split"}\n')
    assert cli.main(["-q", "prepare", str(d), str(tmp_path / "out")]) == 2
    assert _one_error(capsys, "prepare") == f"{d}/" + message.format(d=d)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_hidden_layers", 100000, "model.safetensors: config.json gives the model 100,000 layers, more than the "),
        ("rms_norm_eps", -1.0, "config.json: norm_eps (rms_norm_eps or layer_norm_eps)=-1.0 must be at least 0"),
        ("rope_theta", -1.0, "config.json: rope_theta=-1.0 must be positive"),
    ],
)
def test_a_config_json_the_weights_cannot_honour_is_one_line(world, tmp_path, capsys, field, value, message):
    """A checkpoint's ``config.json`` claiming 10**9 layers hung ``jaxinf run`` (the loader named every layer's
    tensors, 10**9 per parameter, before finding layer 2 missing); a negative ``rms_norm_eps`` or ``rope_theta``
    was accepted and every stage computed NaN, blamed on a document (``covariance loss is not finite``). Each is
    refused in one line naming the checkpoint's file, and the run directory is left uncreated."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(world["model"], model)
    raw = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**raw, field: value}))
    out = tmp_path / "run"
    assert cli.main(["-q", "run", *overrides(world, out, **{"model.checkpoint": model})]) == 2
    assert _one_error(capsys, "run").startswith(f"{model}/{message}")
    assert not out.exists()


def test_query_against_a_run_still_building_its_index_says_so(world, finished, tmp_path, capsys):
    """``jaxinf query RUN Q`` while ``RUN`` (started with ``index.k``) was still fitting said "the run has no EK-FAC
    index (build one: jaxinf run CONFIG index.k=32 ...)", sending the user to start a run that is already under way.
    It now says the index is not built yet, with the stage's status, and to let the run finish."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    for record in (run / "run.json", run / "state" / "run.json"):
        r = json.loads(record.read_text())
        r["config"]["index"]["k"] = 2
        r["stages"]["index"] = {"status": "running"}
        record.write_text(json.dumps(r))
    assert cli.main(["-q", "query", str(run), str(world["queries"]), "--out", str(tmp_path / "q")]) == 2
    assert _one_error(capsys, "query") == (
        f"{run}: its EK-FAC index (index.k=2) is not built yet (stage index running); let the run finish, or "
        "resume it with the same jaxinf run command, then query it"
    )
    assert not (tmp_path / "q").exists()


def test_a_ctrl_c_raised_inside_a_garbage_collector_callback_still_stops_the_command(monkeypatch, capsys):
    """Ctrl-C during ``jaxinf run`` whose ``KeyboardInterrupt`` Python raised inside JAX's ``_xla_gc_callback`` was
    printed as "Exception ignored in ... Traceback ... KeyboardInterrupt" and lost: the run went on and exited 0.
    A ``KeyboardInterrupt`` that cannot propagate (here from a ``__del__``) is delivered again to the main thread:
    the command stops with the usual line and exit 130, without a traceback."""
    import signal
    import time

    from jaxinf import pipeline

    finished = []

    class Interrupted:
        def __del__(self):
            raise KeyboardInterrupt  # what a SIGINT arriving during a gc callback or __del__ amounts to

    def run(config, overwrite):
        Interrupted()  # collected at once: its KeyboardInterrupt is unraisable
        for _ in range(1000):
            time.sleep(0.001)
        finished.append(True)

    monkeypatch.setattr(pipeline, "run", run)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (not under nohup)
    try:
        assert cli.main(["-q", "run", "data.max_length=7"]) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    assert not finished and "Traceback" not in err and "Exception ignored" not in err
    assert err.strip() == "jaxinf run: interrupted; run it again to resume"


def test_commands_in_one_process_share_one_unraisable_hook(monkeypatch, capsys):
    """Every ``cli.main`` call put one more filtering ``sys.unraisablehook`` over the last and never removed it (a
    notebook or a test process running many commands chained hundreds), and a second hook class gave lost Ctrl-Cs
    back. One hook does both: installed once, reused by every later command, redelivering Ctrl-C only while a
    command runs; other unraisable exceptions reach the hook it replaced."""
    import sys
    from types import SimpleNamespace

    from jaxinf import pipeline
    from jaxinf.run import failures

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    monkeypatch.setattr(pipeline, "run", lambda config, overwrite: None)
    for _ in range(3):
        assert cli.main(["-q", "run", "data.max_length=7"]) == 0
    hook = sys.unraisablehook
    assert isinstance(hook, failures.UnraisableHook) and hook.previous == seen.append and hook.commands == 0
    try:
        raise ValueError("other")
    except ValueError as e:
        hook(SimpleNamespace(exc_type=ValueError, exc_value=e, exc_traceback=e.__traceback__))
    assert [type(u.exc_value) for u in seen] == [ValueError]
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt as e:  # outside a command: not redelivered, passed on
        hook(SimpleNamespace(exc_type=KeyboardInterrupt, exc_value=e, exc_traceback=e.__traceback__))
    assert [type(u.exc_value) for u in seen] == [ValueError, KeyboardInterrupt]


def test_a_full_disk_met_inside_a_library_names_the_file(tmp_path, monkeypatch, capsys):
    """``jaxinf prepare`` on a full disk failed inside array_record's writer, whose error is a ``RuntimeError`` that
    only mentions the file: the line said "a write: no space left on device", naming no path. Outside a run
    directory the longest absolute path in the library's message is named (here the record file being written)."""
    from jaxinf.data import prepare

    record = tmp_path / ".out.prepare-x" / "data" / "train.array_record-00000-of-00001"

    def full(*args, **kwargs):
        raise RuntimeError(
            f'Failed to finalize writing of split "train": write() failed: No space left on device; writing '
            f"{record}; at byte 0; Failed to close chunk_writer"
        )

    monkeypatch.setattr(prepare, "prepare", full)
    assert cli.main(["-q", "prepare", str(tmp_path / "docs.jsonl"), str(tmp_path / "out")]) == 3
    assert _one_error(capsys, "prepare") == (
        f"{record}: no space left on device; free some space and run the same command again"
    )


def test_compare_refuses_a_topk_below_one(finished, tmp_path, capsys):
    """``jaxinf compare --topk -3`` was accepted: the overlap of "the top -3" documents took all but the last three
    and divided by -3, a negative share printed as the top-k overlap. It is refused in one line, before reading."""
    from jaxinf.analysis.correlations import topk_overlap

    assert cli.main(["-q", "compare", "--kronfluence", str(tmp_path), "--run", str(finished), "--topk", "-3"]) == 2
    assert _one_error(capsys, "compare") == "--topk -3: must be at least 1"
    with pytest.raises(ValueError):
        topk_overlap(np.arange(5.0), np.arange(5.0), -3)


def test_quiet_is_accepted_after_the_verb(monkeypatch):
    """``jaxinf run CONFIG -q run.out=...`` was refused with argparse's usage and "unrecognized arguments: -q
    run.out=..." (``-q`` was accepted only before the verb), although ``--overwrite`` may come anywhere."""
    from jaxinf import pipeline

    seen = {}
    monkeypatch.setattr(pipeline, "run", lambda config, overwrite: seen.update(config=config))
    assert cli.main(["run", "-q", "data.max_length=7", "--quiet", "run.out=x"]) == 0
    assert seen["config"].data.max_length == 7 and seen["config"].run.out == "x"
    assert logging.getLogger().level == logging.WARNING


def test_demo_refuses_fewer_than_one_seed_in_one_line(tmp_path, capsys):
    """``jaxinf demo --seeds 0`` was a ValueError traceback; it is one line, exit 2, and nothing is written."""
    assert cli.main(["-q", "demo", "--seeds", "0", "--out", str(tmp_path / "demo")]) == 2
    assert _one_error(capsys, "demo") == "--seeds 0: must be at least 1 (the demo trains one model a seed)"
    assert not (tmp_path / "demo").exists()


def test_demo_refuses_an_absurd_number_of_seeds_in_one_line(tmp_path, capsys):
    """``jaxinf demo --seeds 99999999999`` was accepted: it wrote the corpus and trained seed after seed, a run
    directory each, for ever. More than :data:`jaxinf.cli.MAX_DEMO_SEEDS` is refused before anything is written,
    and ``--help`` states the bound."""
    assert cli.main(["-q", "demo", "--seeds", "99999999999", "--out", str(tmp_path / "demo")]) == 2
    assert _one_error(capsys, "demo", alone=True) == (
        f"--seeds 99999999999: at most {cli.MAX_DEMO_SEEDS} (each seed trains, completes and scores its own model: "
        "a few minutes and a run directory a seed); nothing was written"
    )
    assert not (tmp_path / "demo").exists()
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    assert f"at most {cli.MAX_DEMO_SEEDS}" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("content", ["{", '{"seeds": 3}', "[]"])
def test_analyze_with_a_damaged_seed_table_is_one_line(finished, tmp_path, capsys, content):
    """A run's ``seeds.json`` (``jaxinf demo --seeds N``) cut short or rewritten: one line naming it, exit 2."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "seeds.json").write_text(content)
    capsys.readouterr()
    assert cli.main(["-q", "analyze", str(run)]) == 2
    assert _one_error(capsys, "analyze").startswith(f"{run / 'seeds.json'}: not a table of the findings over seeds (")


def test_a_collective_that_lost_its_peer_is_one_line_only_in_a_run_of_several_processes(tmp_path):
    """The classification behind exit 4: the error of a collective whose peer process is gone (here Gloo's on a CPU
    host, wrapped as JAX raises it) is one line naming the stage and the way to resume, in a run of several
    processes; the same text in a one-process run, or another error, is left alone (a bug keeps its traceback)."""
    from jaxinf.run import failures

    cause = ValueError("UNKNOWN: Gloo AllGather failed: [pair.cc:547] Connection closed by peer [127.0.0.1]:17093")
    try:
        raise RuntimeError("step failed") from cause
    except RuntimeError as e:
        lost = failures.lost_process(e, tmp_path, "lambda", distributed=True)
        assert failures.lost_process(e, tmp_path, "lambda", distributed=False) is None
    assert isinstance(lost, failures.LostProcess) and lost.exit_code == 4
    assert str(lost) == (
        f"another process of this run stopped (Gloo AllGather failed; stage lambda); everything finished is kept in "
        f"{tmp_path}; start every process again with the same command to resume"
    )
    assert failures.lost_process(ValueError("shapes do not match"), tmp_path, "lambda", distributed=True) is None


@pytest.mark.parametrize("command", ["factors.from", "index.from", "query", "analyze", "kronfluence export"])
def test_a_runs_state_directory_given_as_a_run_is_refused_naming_the_run(world, finished, tmp_path, capsys, command):
    """``RUN/state`` holds a copy of RUN's record, so given where a run belongs it read as a run whose stages were done
    and whose results were missing: ``factors.from=RUN/state`` created run.out, warned "stage eigen will be
    recomputed" and failed with "the eigendecomposition is missing or corrupted"; ``jaxinf query RUN/state`` said
    "its EK-FAC index is not built yet (stage index done)", ``analyze`` "scores.npy: missing", ``kronfluence
    export`` "no finished eigendecomposition". Each now names RUN, and nothing is written."""
    state, out = finished / "state", tmp_path / "out"
    argv = {
        "factors.from": ["run", *overrides(world, out, **{"factors.from": state})],
        "index.from": ["run", *overrides(world, out, **{"index.from": state, "scores.mode": "index"})],
        "query": ["query", str(state), str(world["queries"]), "--out", str(out)],
        "analyze": ["analyze", str(state)],
        "kronfluence export": ["kronfluence", "export", str(state), str(out)],
    }[command]
    before = sorted(p.name for p in state.iterdir())
    assert cli.main(["-q", *argv]) == 2
    line = _one_error(capsys, argv[0])
    assert line.endswith(f"{state}: is inside the jaxinf run directory {finished}; give the run directory itself")
    assert not out.exists() and sorted(p.name for p in state.iterdir()) == before


def test_a_run_that_reused_anothers_curvature_or_index_names_that_run(world, finished, tmp_path, capsys):
    """``factors.from=B`` where B itself reused the curvature of A (its own ``factors.from``) was refused as "B has no
    finished curvature (stage lambda is pending)", a stage B never runs; ``index.from=B`` (or ``jaxinf query B``)
    where B scored with A's index said "no index here ... build one with index.k set" or "the run has no EK-FAC
    index"; B run again with other queries advised "factors.from=B ... keeps its fitted curvature". Each names A,
    the run that holds what was asked for."""
    from jaxinf import config as cfg
    from jaxinf import pipeline

    reused = tmp_path / "reused"
    pipeline.run(
        cfg.load(
            None,
            overrides(world, reused, **{"data.batch_size": 8, "factors.fisher": "empirical", "factors.from": finished}),
        )
    )
    capsys.readouterr()
    out = tmp_path / "out"
    argv = overrides(world, out, **{"factors.fisher": "empirical", "factors.from": reused})
    assert cli.main(["-q", "run", *argv]) == 2
    assert _one_error(capsys, "run") == (
        f"factors.from: {reused} fitted no curvature: it reuses that of {finished} (its factors.from); "
        f"give factors.from={finished}"
    )
    # B run again on other queries: the advice to keep B's curvature named B, which fitted none (A's is kept)
    queries = tmp_path / "queries.jsonl"
    queries.write_text(world["queries"].read_text().splitlines()[0] + "\n")
    again = overrides(world, reused, **{"data.batch_size": 8, "factors.fisher": "empirical", "factors.from": finished})
    assert cli.main(["-q", "run", *again, f"data.queries={queries}"]) == 2
    error = _one_error(capsys, "run")  # other queries under another path: compared by content, never --overwrite
    assert error.endswith(f"; factors.from={finished} with another run.out reuses this run's curvature to score them")
    assert "--overwrite" not in error
    record = json.loads((reused / "run.json").read_text())  # as if B had scored with A's index (scores.mode: index)
    record["config"]["scores"]["mode"], record["config"]["index"]["from"] = "index", str(finished)
    for name in ("run.json", "state/run.json"):
        (reused / name).write_text(json.dumps(record))
    assert cli.main(["-q", "run", *argv, f"index.from={reused}", "scores.mode=index"]) == 2
    assert _one_error(capsys, "run") == (
        f"index.from: {reused} built no EK-FAC index: it scored with that of {finished}; give index.from={finished}"
    )
    assert cli.main(["-q", "query", str(reused), str(world["queries"]), "--out", str(out)]) == 2
    assert _one_error(capsys, "query") == (
        f"{reused}: the run built no EK-FAC index: it scored with that of {finished}; query it"
    )
    assert not out.exists()


@pytest.mark.parametrize("damage", ["deleted", "a directory"])
def test_a_prepared_dataset_missing_a_shard_is_one_line(world, tmp_path, capsys, damage):
    """A dataset of ``jaxinf prepare`` whose array_record file was deleted (or replaced by a directory) was a
    ``FileNotFoundError`` traceback from the SHA-256 of its files, since TFDS opens them only when a record is read."""
    ds, out = tmp_path / "ds", tmp_path / "out"
    assert cli.main(["-q", "prepare", str(world["docs"]), str(ds)]) == 0
    shard = next(ds.glob("*.array_record*"))
    shard.unlink()
    if damage == "a directory":
        shard.mkdir()
    capsys.readouterr()
    assert cli.main(["-q", "run", *overrides(world, out, **{"data.documents": ds})]) == 2
    what = "missing" if damage == "deleted" else "cannot be read (Is a directory)"
    assert _one_error(capsys, "run") == (
        f"{shard}: {what}, though dataset_info.json lists it: the dataset is damaged; prepare it again"
    )
    assert not out.exists()


def test_analyze_of_a_run_on_a_corpus_directory_does_not_say_it_is_not_found(finished, tmp_path, capsys):
    """``jaxinf analyze RUN`` of a run whose ``data.documents`` is a directory (shards, a TFDS dataset of ``jaxinf
    prepare``), there and intact, noted "config.data.documents='DIR' not found; document texts unavailable"."""
    import shutil

    run, corpus = tmp_path / "run", tmp_path / "corpus"
    shutil.copytree(finished, run)
    corpus.mkdir()
    record = json.loads((run / "run.json").read_text())
    record["config"]["data"]["documents"] = str(corpus)
    (run / "run.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert cli.main(["analyze", str(run)]) == 0
    out = capsys.readouterr().out
    assert "not found" not in out
    assert f"config.data.documents={str(corpus)!r} is a directory; the report takes document texts" in out


@pytest.mark.parametrize("value", [float("nan"), 1e300])
def test_kronfluence_import_refuses_factors_that_are_not_finite(world, finished, tmp_path, capsys, value):
    """``jaxinf kronfluence import`` wrote a Lambda holding NaN (or a float64 1e300, infinite in the run's float32)
    into the run; the next ``jaxinf run`` then blamed the first query: "its preconditioned gradient ... is not
    finite (the model overflows float32 on it)". The import refuses it naming the file and tensor, and writes
    nothing."""
    from safetensors.numpy import load_file, save_file

    factors, out = tmp_path / "factors", tmp_path / "out"
    assert cli.main(["-q", "kronfluence", "export", str(finished), str(factors)]) == 0
    path = factors / "lambda_matrix.safetensors"
    tensors = {k: v.astype(np.float64) for k, v in load_file(str(path)).items()}
    name = sorted(tensors)[1]
    tensors[name].flat[3] = value
    save_file(tensors, str(path))
    capsys.readouterr()
    argv = ["-q", "kronfluence", "import", str(factors), *overrides(world, out, **{"factors.fisher": "empirical"})]
    assert cli.main(argv) == 2
    rounded = "" if np.isnan(value) else " once rounded to float32 (run.precision)"
    assert _one_error(capsys, "kronfluence") == f"{path}: tensor {name} is not finite{rounded}; nothing was imported"
    assert not out.exists()


@pytest.fixture(scope="module")
def indexed(world, tmp_path_factory):
    """A finished run of ``world`` that built an EK-FAC index (index.k=4, written by the empirical Fisher's Lambda
    pass), and its overrides."""
    from jaxinf import config as cfg
    from jaxinf import pipeline

    out = tmp_path_factory.mktemp("indexed") / "run"
    argv = overrides(world, out, **{"data.batch_size": 8, "factors.fisher": "empirical", "index.k": 4})
    pipeline.run(cfg.load(None, argv))
    return out, argv


@pytest.mark.parametrize("damage", ["removed", "cut short"])
def test_a_rerun_builds_again_an_index_gone_from_a_finished_run(indexed, tmp_path, caplog, capsys, damage):
    """A finished run whose ``state/index`` was removed (or whose cells.npy was cut short) was "finished" on a
    rerun: exit 0, no index, and ``jaxinf query`` then said "its EK-FAC index is not built yet (stage index done);
    resume it with the same jaxinf run command", which did nothing. The rerun builds it again, byte-identical."""
    import shutil

    from jaxinf import config as cfg
    from jaxinf import pipeline

    src, argv = indexed
    run = tmp_path / "run"
    shutil.copytree(src, run)
    index = run / "state" / "index"
    if damage == "removed":
        shutil.rmtree(index)
    else:
        with open(index / "cells.npy", "r+b") as f:
            f.truncate(200)
    with caplog.at_level(logging.WARNING, logger="jaxinf"):
        pipeline.run(cfg.load(None, [*argv, f"run.out={run}"]))
    assert "building it again" in caplog.text
    for name in ("cells.npy", "bands.npy", "documents.npy", "loss.npy", "manifest.json"):
        assert (index / name).read_bytes() == (src / "state" / "index" / name).read_bytes(), name


@pytest.mark.parametrize("checksums", [True, False])
@pytest.mark.parametrize(
    "array, value, message",
    [
        ("documents", 1000, "row 0 names document 1000, not one of the 8 documents"),
        ("loss", np.inf, "row 0 is not finite"),
        ("cells", np.nan, "row 0 is not finite"),
        ("cells", "doubled", None),  # finite and in range: only the checksum sees it
    ],
)
def test_a_query_against_a_damaged_index_is_one_line(
    world, indexed, tmp_path, capsys, array, value, message, checksums
):
    """``jaxinf query RUN Q`` against an index whose documents.npy names a document the run does not have was an
    ``IndexError`` traceback; a loss of inf in loss.npy was written into the query's documents.jsonl as
    ``"loss": Infinity``; a NaN cell stopped the exports blaming scores.npy; a cell changed to another finite value
    was used without a word. Each batch's rows carry a CRC-32 (checks.npy), checked as a query reads them: every
    such change is refused naming the batch. An index of jaxinf before the checksums (no ``checksums`` in its
    manifest) is still read, its values checked for range and finiteness, naming the file and row."""
    import shutil

    src, _ = indexed
    run = tmp_path / "run"
    shutil.copytree(src, run)
    index = run / "state" / "index"
    path = index / f"{array}.npy"
    a = np.load(path)
    a.flat[0] = a.flat[0] * 2 if value == "doubled" else value
    np.save(path, a)
    if not checksums:
        if message is None:
            pytest.skip("without checksums a finite change is not seen (the reason for them)")
        manifest = json.loads((index / "manifest.json").read_text())
        del manifest["checksums"]
        (index / "manifest.json").write_text(json.dumps(manifest))
        (index / "checks.npy").unlink()
    capsys.readouterr()
    assert cli.main(["-q", "query", str(run), str(world["queries"]), "--out", str(tmp_path / "q")]) == 2
    rows = json.loads((index / "manifest.json").read_text())["rows_per_batch"]
    assert _one_error(capsys, "query") == (
        f"{index}: the rows of batch 0 (rows 0 to {rows - 1}) do not match their checksum in checks.npy (a damaged "
        f"index: remove its manifest.json and run the run {run} again)"
        if checksums
        else f"{path}: {message} (a damaged index: remove its manifest.json and run the run {run} again)"
    )


@pytest.mark.parametrize("corpus", [False, True])
def test_plan_json_dash_prints_the_json_as_compare_does(world, tmp_path, capsys, monkeypatch, corpus):
    """``jaxinf plan --json -`` wrote the plan into a file named ``-`` in the working directory (``jaxinf compare
    --json -`` prints it): the JSON now goes to stdout alone, the table to stderr, and no file is written."""
    monkeypatch.chdir(tmp_path)
    argv = ["-q", "plan", *overrides(world, tmp_path / "run"), "--no-compile", "--json", "-"]
    assert cli.main(argv + (["--corpus"] if corpus else [])) == 0
    captured = capsys.readouterr()
    got = json.loads(captured.out)
    assert got["meshes"] and ("corpus" in got) == corpus and captured.err.strip()
    assert os.listdir(tmp_path) == []


def test_index_k_beside_index_from_is_refused(world, indexed, tmp_path, capsys):
    """``jaxinf query RUN Q index.k=2`` (or ``jaxinf run ... scores.mode=index index.from=RUN index.k=2``) built an
    index of its own at k=2, a pass over every document, then scored with RUN's index at k=4: the setting the user
    gave was silently not the one the scores came from. The two are refused together, before anything is written."""
    run, argv = indexed
    out = tmp_path / "out"
    message = (
        f"command line: index.k: 2 builds this run's index, but scores.mode: index reads that of index.from ({run}); "
        "set one of them (a pass over every document built an index never read)"
    )
    assert cli.main(["-q", "query", str(run), str(world["queries"]), "--out", str(out), "index.k=2"]) == 2
    assert _one_error(capsys, "query") == (  # a key jaxinf query sets itself (pass 10: it named index.from)
        "command line: index.k: set by jaxinf query itself (RUN_OR_INDEX: the run's index, as built; a query builds "
        "none); leave it out"
    )
    assert cli.main(["-q", "run", *argv, f"run.out={out}", f"index.from={run}", "index.k=2", "scores.mode=index"]) == 2
    assert _one_error(capsys, "run") == message
    assert not out.exists()


def test_an_empty_path_is_refused_not_taken_for_the_working_directory(world, indexed, tmp_path, capsys, monkeypatch):
    """``run.out=''`` wrote a whole run into the working directory (``Path('')`` is ``.``), and ``jaxinf query RUN Q
    --out ''`` fell back to the default; ``jaxinf query . Q`` from inside the run defaulted to ``-queries``, inside the
    run (refused as such), where the documented default is ``RUN-QUERIES`` beside it."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["-q", "run", *overrides(world, tmp_path / "x"), "run.out=''"]) == 2
    assert (
        _one_error(capsys, "run")
        == "command line: run.out: an empty string; give a path (or null where the key allows it)"
    )
    assert cli.main(["-q", "run", *overrides(world, tmp_path / "x"), "model.checkpoint=' '"]) == 2
    assert _one_error(capsys, "run").startswith("command line: model.checkpoint: an empty string")
    run, _ = indexed
    assert cli.main(["-q", "query", str(run), str(world["queries"]), "--out", ""]) == 2
    assert _one_error(capsys, "query") == "--out '': an empty path; give the path to write (or leave --out out)"
    assert os.listdir(tmp_path) == []
    monkeypatch.chdir(run)
    assert cli.main(["-q", "query", ".", str(world["queries"])]) == 0
    assert (run.parent / f"{run.name}-queries" / "scores.npy").is_file()


def test_a_query_against_an_index_whose_manifest_k_was_changed_is_one_line(world, indexed, tmp_path, capsys):
    """An index whose manifest.json says another ``k`` than its rows were written with (a hand-edited or damaged
    manifest) was a numpy ``ValueError: matmul ... mismatch in its core dimension`` traceback in ``jaxinf query``."""
    import shutil

    src, _ = indexed
    run = tmp_path / "run"
    shutil.copytree(src, run)
    path = run / "state" / "index" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["k"] = 400
    path.write_text(json.dumps(manifest))
    capsys.readouterr()
    assert cli.main(["-q", "query", str(run), str(world["queries"]), "--out", str(tmp_path / "q")]) == 2
    assert _one_error(capsys, "query") == (
        f"{path}: its k (400) does not give its blocks' cells (a damaged manifest: rebuild it)"
    )


@pytest.mark.parametrize(
    "key, value, what",
    [
        ("rows_per_batch", None, "is not a count"),
        ("rows_per_batch", "8", "is not a count"),
        ("cells", "384", "is not a count"),
        ("batches", True, "is not a count"),
        ("inputs", None, "do not say what the index was built from"),
        ("written", 2, "is more than its batches (1)"),
    ],
)
def test_a_query_against_an_index_whose_manifest_counts_were_changed_is_one_line(
    world, indexed, tmp_path, capsys, key, value, what
):
    """A manifest.json whose counts are not numbers (``rows_per_batch: null``, ``inputs: null``) was a ``TypeError``
    traceback in ``jaxinf query``; a count written as a string was "cells.npy: 8 rows, the manifest says 8"."""
    import shutil

    src, _ = indexed
    run = tmp_path / "run"
    shutil.copytree(src, run)
    path = run / "state" / "index" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest[key] = value
    path.write_text(json.dumps(manifest))
    capsys.readouterr()
    assert cli.main(["-q", "query", str(run), str(world["queries"]), "--out", str(tmp_path / "q")]) == 2
    assert _one_error(capsys, "query") == f"{path}: its {key} ({value!r}) {what} (a damaged manifest: rebuild it)"


@pytest.mark.parametrize("edit", ["bands", "block layers", "parts 0", "parts 3"])
def test_a_query_against_an_index_whose_manifest_widths_or_parts_were_changed_is_one_line(
    world, indexed, tmp_path, capsys, edit
):
    """The manifest's band energies per row and its blocks' layers were never compared with each other or with
    bands.npy (an edited count was used as it stood); ``parts`` (one per slice of the corpus the writing processes
    read) that is not a count, or does not split a batch's rows, is refused too."""
    import shutil

    src, _ = indexed
    run = tmp_path / "run"
    shutil.copytree(src, run)
    path = run / "state" / "index" / "manifest.json"
    manifest = json.loads(path.read_text())
    cells, bands = manifest["cells"], manifest["bands"]
    if edit == "bands":
        manifest["bands"] = bands = bands + 1
    elif edit == "block layers":
        next(iter(manifest["blocks"].values()))["layers"] += 1
    else:
        manifest["parts"] = int(edit.split()[1])
    path.write_text(json.dumps(manifest))
    capsys.readouterr()
    assert cli.main(["-q", "query", str(run), str(world["queries"]), "--out", str(tmp_path / "q")]) == 2
    why = {
        "parts 0": "its parts (0) is not a count",
        "parts 3": f"its {manifest['rows_per_batch']} rows per batch do not split into its 3 parts",
    }.get(edit, f"its blocks do not give its {cells} cells and {bands} band energies per row")
    assert _one_error(capsys, "query") == f"{path}: {why} (a damaged manifest: rebuild it)"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", None])
def test_a_query_against_an_index_whose_manifest_dtype_was_changed_is_one_line(world, indexed, tmp_path, capsys, dtype):
    """A manifest.json whose ``dtype`` is not a dtype jaxinf writes (bfloat16, null) was a ``KeyError`` traceback in
    ``jaxinf query``; one that names the other dtype than cells.npy holds gave certificates for the wrong resolution."""
    import shutil

    src, _ = indexed
    run = tmp_path / "run"
    shutil.copytree(src, run)
    path = run / "state" / "index" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["dtype"] = dtype
    path.write_text(json.dumps(manifest))
    capsys.readouterr()
    assert cli.main(["-q", "query", str(run), str(world["queries"]), "--out", str(tmp_path / "q")]) == 2
    assert _one_error(capsys, "query") == (
        f"{path}: its dtype ({dtype!r}) is not that of cells.npy (float32) (a damaged manifest: rebuild it)"
    )


@pytest.mark.parametrize("damage", ["out of range", "cut short", "float", "missing", "repeated", "other cells"])
def test_a_query_against_an_index_whose_selection_is_damaged_is_one_line(world, indexed, tmp_path, capsys, damage):
    """selection.npz (the order of each block's eigen-directions) carries no checksum: an index out of range gave
    scores of NaN blamed on scores.npy, a row cut short a numpy matmul traceback, a float or a missing block a
    ``TypeError``/``KeyError`` traceback, a repeated direction wrong scores without a word. It is the order of the
    run's eigenvalues, so it is checked against them."""
    import shutil

    src, _ = indexed
    run = tmp_path / "run"
    shutil.copytree(src, run)
    path = run / "state" / "index" / "selection.npz"
    arrays = dict(np.load(path))
    key = sorted(k for k in arrays if k.startswith("cells/" if damage == "other cells" else "rows/"))[0]
    if damage == "other cells":  # still in range and increasing, but not the cells of the largest e_S e_A
        arrays[key] = arrays[key] + 1
    elif damage == "out of range":
        arrays[key] = arrays[key] + 1000
    elif damage == "cut short":
        arrays[key] = arrays[key][..., :-1]
    elif damage == "float":
        arrays[key] = arrays[key].astype(np.float32)
    elif damage == "missing":
        del arrays[key]
    else:
        arrays[key][..., 0] = arrays[key][..., 1]
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    capsys.readouterr()
    assert cli.main(["-q", "query", str(run), str(world["queries"]), "--out", str(tmp_path / "q")]) == 2
    what = {
        "missing": "missing",
        "other cells": "not the cells the eigenvalues the index was built in select",
    }.get(damage, "not the order of the eigenvalues the index was built in")
    assert _one_error(capsys, "query") == (
        f"{path}: {key} is {what} (a damaged index: remove its manifest.json and run the run {run} again)"
    )


def test_a_factor_or_export_that_is_a_link_to_nothing_is_named_as_such(tmp_path):
    """``jaxinf compare`` with a factor file (or a run's scores.npy) that is a symbolic link loop said "file is
    missing", and the user looked for a file that was there: a link to nothing or a loop is named as such."""
    from jaxinf.interop import compare
    from jaxinf.interop import kronfluence as kf

    loop = tmp_path / "factors.safetensors"
    loop.symlink_to(loop)
    dangling = tmp_path / "scores.npy"
    dangling.symlink_to(tmp_path / "nowhere.npy")
    with pytest.raises(
        kf.InteropError, match=r"factors\.safetensors: a symbolic link to nothing \(or a loop of links\)$"
    ):
        kf.read_tensors(loop)
    with pytest.raises(kf.InteropError, match=r"scores\.npy: a symbolic link to nothing \(or a loop of links\)$"):
        compare._load_npy(dangling)
    with pytest.raises(kf.InteropError, match=r"gone\.npy: file is missing \(has the run finished its exports\?\)$"):
        compare._load_npy(tmp_path / "gone.npy")
    (tmp_path / "lambda_matrix.safetensors").mkdir()  # was "not a readable safetensors file (No such device ...)"
    with pytest.raises(kf.InteropError, match=r"lambda_matrix\.safetensors: a directory where a file is expected$"):
        kf.read_tensors(tmp_path / "lambda_matrix.safetensors")


def test_a_learning_rate_beyond_float32_is_refused_before_training(tmp_path, capsys):
    """``validate.learning_rate=1e308`` trained, printed numpy's "RuntimeWarning: overflow encountered in cast" (the
    rate became inf in float32), then said the full model diverged: it is refused first, naming the bound."""
    out = tmp_path / "v"
    assert cli.main(["-q", "validate", "--out", str(out), "validate.learning_rate=1e308"]) == 2
    assert _one_error(capsys, "validate", alone=True) == (
        "command line: validate.learning_rate: must be at most 3.403e+38 (a float32 number), got 1e+308"
    )
    assert not out.exists()


def test_the_hints_of_a_command_with_out_name_out_not_run_out(world, indexed, tmp_path, capsys):
    """``jaxinf query RUN Q --out DIR`` refused DIR (another program's directory, one inside a run, one in use, one
    holding results of another config) telling the user to "choose another run.out", an option query does not
    have; the hints of a command whose output is ``--out`` (query, validate, demo) name ``--out``."""
    import errno
    import shutil

    from jaxinf.run import failures, rundir
    from jaxinf.run.lock import RunLock

    run, _ = indexed
    queries = str(world["queries"])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine\n")
    started = tmp_path / "started"  # a run of another config: refused with the keys that differ
    shutil.copytree(run, started)
    expected = {
        foreign: "choose another --out",
        run / "state" / "x": "choose a --out outside it",
        tmp_path / "locked": "or choose another --out",
        started: "(use --overwrite to start over, or another --out",
    }
    with RunLock(tmp_path / "locked"):
        for out, hint in expected.items():
            assert cli.main(["-q", "query", str(run), queries, "--out", str(out)]) == 2
            message = _one_error(capsys, "query")
            assert hint in message and "run.out" not in message, message
    denied = OSError(errno.EACCES, "Permission denied", str(tmp_path / "x"))
    with rundir.output_named("--out"):
        assert "or choose another --out" in str(failures.environment_failure(denied, tmp_path, "scores"))
    assert "or choose another run.out" in str(failures.environment_failure(denied, tmp_path, "scores"))


def test_a_query_against_a_run_whose_run_json_is_damaged_reads_its_copy(world, indexed, tmp_path, capsys):
    """``jaxinf query RUN Q`` on a run whose run.json was cut short (its copy state/run.json intact) was a
    ``JSONDecodeError`` traceback once the scores began: the eigendecomposition of the run it reuses was found
    through run.json read as such, where everything else reads the record or its copy (``rundir.read_record``)."""
    import shutil

    src, _ = indexed
    run = tmp_path / "run"
    shutil.copytree(src, run)
    (run / "run.json").write_text("{\n")
    out = tmp_path / "q"
    capsys.readouterr()
    assert cli.main(["-q", "query", str(run), str(world["queries"]), "--out", str(out)]) == 0
    assert "restored from its copy" in capsys.readouterr().err
    assert np.load(out / "scores.npy").shape == (2, 8)


def test_a_query_resumed_after_its_run_refitted_the_curvature_recomputes_its_gradients(
    world, tmp_path, capsys, monkeypatch
):
    """``jaxinf query RUN Q --out OUT`` stopped once it had saved its query gradients (here: a failure in its
    certifying pass); RUN's documents were edited and RUN was run again (its curvature fitted again on them) and the
    same query resumed: OUT reused the gradients preconditioned with RUN's old curvature against RUN's new index,
    exit 0, every score wrong (a third of the largest off). A run records the curvature it reuses (factors.from,
    which a query is) and recomputes from its query gradients on when that curvature was fitted again. (A query
    against an index over other documents than its run's is refused at its start, leaving nothing.)"""
    import shutil

    from jaxinf import config as cfg
    from jaxinf import pipeline

    docs = tmp_path / "docs.jsonl"
    shutil.copy(world["docs"], docs)
    run, out = tmp_path / "run", tmp_path / "out"
    argv = overrides(world, run, **{"data.batch_size": 8, "factors.fisher": "empirical", "index.k": 4})
    argv.append(f"data.documents={docs}")
    pipeline.run(cfg.load(None, argv))
    query = ["-q", "query", str(run), str(world["queries"]), "--out", str(out)]
    monkeypatch.setenv("JAXINF_FAULT", "certify:1:raise")  # stopped after its query gradients were saved
    with pytest.raises(RuntimeError, match="fault injected"):
        cli.main(query)
    monkeypatch.delenv("JAXINF_FAULT")
    assert (out / "state" / "queries").exists()
    lines = docs.read_text().splitlines()
    docs.write_text("\n".join([lines[5].replace(json.loads(lines[5])["id"], json.loads(lines[0])["id"]), *lines[1:]]))
    capsys.readouterr()
    assert cli.main(query) == 2
    assert "built over other documents" in _one_error(capsys, "query")
    pipeline.run(cfg.load(None, argv))  # the curvature fitted again on the edited documents
    capsys.readouterr()
    assert cli.main(query) == 0  # its gradients, whether set aside with the documents' change or by the refit's,
    # are not reused: the scores are those of RUN's new curvature and index
    np.testing.assert_allclose(np.load(out / "scores.npy"), np.load(run / "scores.npy"), rtol=1e-5, atol=1e-5)


def test_prepare_into_an_output_filled_meanwhile_or_a_link_to_an_empty_directory(tmp_path, capsys, monkeypatch):
    """Two ``jaxinf prepare`` into one empty OUT at once: the one finishing second converted every document, then
    died on the final step with ``OSError: [Errno 39] Directory not empty`` (a traceback). OUT a symbolic link to
    an empty directory converted everything, then was refused as "not a directory"; it is written there."""
    from jaxinf.data import prepare as prepare_mod

    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"id": "a", "text": "one two"}\n')
    target = tmp_path / "target"
    target.mkdir()
    os.symlink(target, tmp_path / "link")
    assert cli.main(["-q", "prepare", str(docs), str(tmp_path / "link")]) == 0
    assert (target / "dataset_info.json").is_file() and (tmp_path / "link").is_symlink()
    out = tmp_path / "out"
    out.mkdir()
    write = prepare_mod._write_train_split

    def the_other_process_first(builder):
        write(builder)
        (out / "theirs.txt").write_text("another process's dataset\n")

    monkeypatch.setattr(prepare_mod, "_write_train_split", the_other_process_first)
    assert cli.main(["-q", "prepare", str(docs), str(out)]) == 2
    assert _one_error(capsys, "prepare") == (
        f"{out}: written by another process meanwhile (no longer empty); nothing was written"
    )
    assert os.listdir(out) == ["theirs.txt"]
    assert sorted(os.listdir(tmp_path)) == ["docs.jsonl", "link", "out", "target"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("scores.npy", b"zz\n", "scores.npy: not a numpy array file (no .npy header)"),
        ("scores.npy", "cut", "scores.npy: cut short (150 bytes, its header describes "),
        ("queries.jsonl", b"{\n", "queries.jsonl line 1: invalid JSON"),
        ("queries.jsonl", "loss", "queries.jsonl line 1: field loss must be a positive finite number of nats"),
    ],
)
def test_compare_against_a_run_with_a_damaged_export_is_one_line(finished, tmp_path, capsys, name, content, message):
    """``jaxinf compare --kronfluence DIR --run RUN`` with kronfluence's pairwise scores in DIR and RUN's scores.npy
    cut short or garbage, or a line of its queries.jsonl damaged, was a numpy ValueError or a JSONDecodeError
    traceback: the exports are read as jaxinf analyze reads them, a damage named in one line."""
    import shutil

    from safetensors.numpy import save_file

    from jaxinf.interop import kronfluence as kf

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    kron = tmp_path / "kron"
    kron.mkdir()
    save_file({"all_modules": np.load(finished / "scores.npy")}, str(kron / kf.PAIRWISE))
    path = run / name
    if content == "cut":
        with open(path, "r+b") as f:
            f.truncate(150)
    elif content == "loss":
        first, *rest = path.read_text().splitlines()
        path.write_text("\n".join([json.dumps({**json.loads(first), "loss": "x"}), *rest]) + "\n")
    else:
        path.write_bytes(content)
    assert cli.main(["-q", "compare", "--kronfluence", str(kron), "--run", str(run)]) == 2
    assert message in _one_error(capsys, "compare")


def test_a_run_inside_its_documents_directory_is_refused(world, indexed, tmp_path, capsys):
    """``jaxinf run data.documents=DIR run.out=DIR/run``: DIR's files are listed recursively as shards, so the run
    read its own run.json as one and stopped blaming it ("DIR/run/run.json:1: invalid JSON"), leaving DIR/run
    behind; once it had exports, a rerun would read them as documents. Refused before anything is written, for
    jaxinf query's --out too."""
    import shutil

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(world["docs"], corpus / "a.jsonl")
    out = corpus / "run"
    assert cli.main(["-q", "run", *overrides(world, out), f"data.documents={corpus}"]) == 2
    assert _one_error(capsys, "run") == (
        f"{out}: is inside data.documents ({corpus}), whose every file is read as a document (the run's own files "
        "would be read as shards); choose a run.out outside it"
    )
    run, _ = indexed
    argv = ["-q", "query", str(run), str(world["queries"]), f"data.documents={corpus}", "--out", str(corpus / "q")]
    assert cli.main(argv) == 2
    assert _one_error(capsys, "query").endswith("choose a --out outside it")
    assert os.listdir(corpus) == ["a.jsonl"]


def test_prepare_into_its_input_directory_is_refused(tmp_path, capsys):
    """``jaxinf prepare DIR DIR/out`` wrote the dataset inside the directory it read, whose files are listed
    recursively as shards: the next read of DIR (a run, a second prepare) stopped on
    ``DIR/out/dataset_info.json:1: invalid JSON``. Refused before anything is written."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text('{"id": "a", "text": "one two"}\n')
    assert cli.main(["-q", "prepare", str(corpus), str(corpus / "out")]) == 2
    assert _one_error(capsys, "prepare") == (
        f"{corpus / 'out'}: is inside the input directory {corpus}; choose an OUT_DIR outside it; nothing was written"
    )
    assert os.listdir(corpus) == ["a.jsonl"]


def test_a_run_read_as_an_input_with_its_record_damaged_does_not_offer_overwrite(world, indexed, tmp_path, capsys):
    """``jaxinf query RUN Q`` (or ``factors.from=RUN``) with RUN's run.json and its copy both damaged said
    "--overwrite would delete everything in RUN: ...": RUN is what the command reads, and its --overwrite concerns
    the output, never RUN. Said so only of the command's own output directory."""
    import shutil

    src, argv = indexed
    run = tmp_path / "run"
    shutil.copytree(src, run)
    for path in (run / "run.json", run / "state" / "run.json"):
        path.write_text("[1, 2")
    assert cli.main(["-q", "query", str(run), str(world["queries"]), "--out", str(tmp_path / "q")]) == 2
    message = _one_error(capsys, "query")
    assert message.endswith(  # the copy's reason, not its error type alone ("is too (JSONDecodeError)")
        f"and its copy {run / 'state' / 'run.json'} is unreadable (not JSON: Expecting ',' delimiter at line 1, "
        "column 6); the run cannot be read"
    ), message
    assert cli.main(["-q", "run", *argv, f"run.out={run}"]) == 2
    assert f"--overwrite would delete everything in {run}: " in _one_error(capsys, "run")


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json", "queries"])
def test_an_input_that_is_a_link_to_nothing_is_named_as_such(world, tmp_path, capsys, name):
    """A checkpoint's ``model.safetensors`` that is a symbolic link to nothing (a moved blob of a Hugging Face cache,
    a volume not mounted) was "cannot be read (No such file or directory)", and the user looked for a file that was
    there; so are ``config.json``, ``tokenizer.json`` and a queries file. Nothing is created."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(world["model"], model)
    queries = tmp_path / "queries.jsonl"
    target = queries if name == "queries" else model / name
    target.unlink(missing_ok=True)
    target.symlink_to(tmp_path / "unmounted" / name)
    mine = {**world, "model": model, "queries": queries if name == "queries" else world["queries"]}
    assert cli.main(["-q", "run", *overrides(mine, tmp_path / "out")]) == 2
    message = _one_error(capsys, "run")
    assert "a symbolic link to nothing (or a loop of links)" in message and str(target) in message, message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "command, name, content, message",
    [
        ("analyze", "scores.npy", "random", "scores.npy: not a numpy array file (no .npy header)"),
        ("analyze", "layer_scores.npy", "random", "layer_scores.npy: not a numpy array file (no .npy header)"),
        (
            "analyze",
            "layer_scores.npy",
            "objects",
            "layer_scores.npy: holds Python objects, not numbers (a pickle, which jaxinf never loads)",
        ),
        ("analyze", "scores.npy", "objects", "scores.npy: holds Python objects, not numbers (a pickle, which"),
    ],
)
def test_a_garbage_or_pickled_npy_file_is_named_without_numpys_words(
    finished, tmp_path, capsys, command, name, content, message
):
    """A ``.npy`` export replaced by random bytes or by a pickled object array was one line carrying numpy's own
    words ("This file contains pickled (object) data. If you trust the file you can load it unsafely using the
    `allow_pickle=` keyword argument"): an invitation to unpickle a file jaxinf never writes. It says which file
    and that it is not a numpy array file (or holds objects), through the one reader
    (:func:`jaxinf.atomic.load_npy`)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    if content == "random":
        (run / name).write_bytes(np.random.default_rng(0).bytes(500))
    else:
        np.save(run / name, np.array([[{"a": 1}]], dtype=object), allow_pickle=True)
    capsys.readouterr()
    assert cli.main(["-q", command, str(run)]) == 2
    got = _one_error(capsys, command)
    assert got.startswith(message), got
    assert "pickle=" not in got and "pickled" not in got and "magic" not in got


@pytest.mark.parametrize("content", ["random", "objects", "cut short", "empty"])
def test_the_one_reader_of_numpy_files_names_each_damage(tmp_path, content):
    """:func:`jaxinf.atomic.load_npy` and :func:`~jaxinf.atomic.load_npz` (every ``.npy``/``.npz`` a user could
    have changed: exports, the index, validate's work files, the token-count cache) refuse each damage in one line
    naming the file, never in numpy's words; a whole file reads as ``np.load`` reads it."""
    from jaxinf.atomic import ArrayFileError, load_npy, load_npz
    from jaxinf.interop import compare
    from jaxinf.interop.kronfluence import InteropError

    whole = np.arange(100.0)
    np.save(tmp_path / "a.npy", whole)
    np.savez(tmp_path / "a.npz", x=whole, y=np.ones(3, np.int64))
    assert np.array_equal(load_npy(tmp_path / "a.npy"), whole)
    assert np.array_equal(load_npy(tmp_path / "a.npy", mmap_mode="r"), whole)
    assert set(load_npz(tmp_path / "a.npz")) == {"x", "y"}
    for suffix in ("npy", "npz"):
        path = tmp_path / f"bad.{suffix}"
        if content == "random":
            path.write_bytes(np.random.default_rng(0).bytes(300))
        elif content == "objects":
            if suffix == "npy":
                np.save(path, np.array([None, 1], dtype=object), allow_pickle=True)
            else:
                np.savez(path, x=np.array([None], dtype=object))
        elif content == "cut short":
            path.write_bytes((tmp_path / f"a.{suffix}").read_bytes()[:300])
        else:
            path.write_bytes(b"")
        with pytest.raises(ArrayFileError) as e:
            (load_npy if suffix == "npy" else load_npz)(path)
        text = str(e.value)
        assert text.startswith(f"{path}") and "\n" not in text and "pickle=" not in text and "magic" not in text, text
        if content == "objects":
            assert "holds Python objects, not numbers" in text
        if suffix == "npy":  # jaxinf compare's reader of a run's scores.npy
            with pytest.raises(InteropError, match=f"^{path}: "):
                compare._load_npy(path)


def test_analyze_and_kronfluence_read_the_copy_of_a_damaged_run_json(world, finished, tmp_path, capsys):
    """``jaxinf analyze RUN`` on a run whose run.json was cut short (its copy state/run.json intact) was "run.json:
    invalid JSON", ``jaxinf kronfluence export RUN`` "unreadable run record", where ``jaxinf run`` and ``jaxinf
    query`` read the copy: both read the record through the one reader (``rundir.read_record``), the report as it
    was (its document texts, found through the record's config) and the factors whole."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "summary.json").unlink()
    (run / "run.json").write_text("{\n")
    capsys.readouterr()
    assert cli.main(["-q", "analyze", str(run)]) == 0
    assert "restored from its copy" in capsys.readouterr().err
    assert (
        json.loads((run / "summary.json").read_text())["notes"]
        == json.loads((finished / "summary.json").read_text())["notes"]
    )
    assert cli.main(["-q", "kronfluence", "export", str(run), str(tmp_path / "factors")]) == 0
    assert cli.main(["-q", "kronfluence", "export", str(finished), str(tmp_path / "intact")]) == 0
    made = sorted(p.name for p in (tmp_path / "factors").iterdir())
    assert "lambda_matrix.safetensors" in made and made == sorted(p.name for p in (tmp_path / "intact").iterdir())
    from safetensors.numpy import load_file

    for name in (n for n in made if n.endswith(".safetensors")):
        got, want = load_file(str(tmp_path / "factors" / name)), load_file(str(tmp_path / "intact" / name))
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in got), name


def test_kronfluence_import_holds_the_runs_lock_and_leaves_nothing_when_refused(
    world, finished, tmp_path, capsys, monkeypatch
):
    """``jaxinf kronfluence import`` wrote the curvature into ``run.out`` without its lock, while a ``jaxinf run`` of
    the same directory could be writing it: it claims the directory as ``jaxinf run`` does
    (:func:`jaxinf.run.lock.claim_run`): refused in one line naming the holder while another process holds it,
    and a failure leaves a new directory as it was (nothing)."""
    from jaxinf.run.lock import RunLock

    factors, out = tmp_path / "factors", tmp_path / "out"
    assert cli.main(["-q", "kronfluence", "export", str(finished), str(factors)]) == 0
    argv = ["-q", "kronfluence", "import", str(factors), *overrides(world, out, **{"factors.fisher": "empirical"})]
    out.mkdir()
    with RunLock(out):  # another jaxinf process writing it
        capsys.readouterr()
        assert cli.main(argv) == 2
        assert _one_error(capsys, "kronfluence").startswith(f"{out}: in use by another jaxinf process (host ")
        assert sorted(p.name for p in out.iterdir()) == [".jaxinf.lock"]
    (out / ".jaxinf.lock").unlink()
    import errno

    from jaxinf.interop import transfer

    def full(store, *args):
        store.mark("covariance", "done")  # run.json written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(transfer, "_write_imported", full)
        assert cli.main(argv) == 3
    assert list(out.iterdir()) == []  # the empty directory it found, as it was
    assert cli.main(argv) == 0
    assert json.loads((out / "run.json").read_text())["stages"]["lambda"]["status"] == "done"
    assert (out / ".jaxinf.lock").exists()  # it held the lock while it wrote


def test_a_killed_prepare_leaves_nothing_the_next_one_keeps_and_never_takes_a_live_ones(tmp_path):
    """A SIGKILLed ``jaxinf prepare DOCS OUT`` left ``.OUT.prepare-XXXXXXXX`` (the whole dataset, unfinished) beside
    OUT for ever, unmentioned. Each prepare of OUT holds a lock beside it (:func:`jaxinf.atomic.building_dir`): the
    next prepare removes what a killed one left, saying so; a prepare of OUT that is still writing (here stopped,
    SIGSTOP, holding its lock) is never touched: a second one is refused naming it."""
    import signal
    import subprocess
    import sys
    import time

    from pipeline_support import env, jaxinf

    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"id": "a", "text": "one two"}\n{"id": "b", "text": "three"}\n')
    out = tmp_path / "ds"
    environment = env(tmp_path / "cache")
    r = jaxinf(["prepare", docs, out], {**environment, "JAXINF_FAULT": "prepare:0"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".ds.prepare-")]
    assert len(left) == 2 and ".ds.prepare-lock" in left and not out.exists()  # what the kill leaves
    other = tmp_path / ".ds.prepare-x"  # an OUT named ds.prepare-x is not ds's
    other.mkdir()
    r = jaxinf(["prepare", docs, out], environment)
    assert r.returncode == 0, r.stderr
    (temp,) = (name for name in left if name != ".ds.prepare-lock")
    assert f"removed a temporary directory left by a process killed while it wrote ({temp})" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ds.prepare-x", "docs.jsonl", "ds"]
    # a prepare still writing (stopped with its lock held) is left alone; the second is refused in one line
    live = subprocess.Popen(
        [sys.executable, "-m", "jaxinf", "prepare", str(docs), str(tmp_path / "ds2")],
        env={**environment, "JAXINF_FAULT": "prepare:0:stop"},
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(600):
            status = open(f"/proc/{live.pid}/stat").read().rsplit(")", 1)[1].split()[0]
            if status == "T":
                break
            time.sleep(0.1)
        before = sorted(p.name for p in tmp_path.iterdir())
        r = jaxinf(["prepare", docs, tmp_path / "ds2"], environment)
        assert r.returncode == 2
        assert r.stderr.strip().startswith(
            f"jaxinf prepare: error: {tmp_path / 'ds2'}: being prepared by another jaxinf prepare (host "
        ), r.stderr
        assert f"pid {live.pid})" in r.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == before
    finally:
        live.kill()
        live.wait()
    r = jaxinf(["prepare", docs, tmp_path / "ds2"], environment)
    assert r.returncode == 0 and "removed a temporary directory" in r.stderr, r.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ds2.")]


def test_analyze_of_a_run_in_use_does_not_say_to_choose_another_run_out(finished, tmp_path, capsys):
    """``jaxinf analyze RUN`` while ``jaxinf run`` writes RUN said "... or choose another run.out": analyze has no
    run.out, and another directory is not the run the user wants analysed; it says to wait for the writer."""
    import shutil

    from jaxinf.run.lock import RunLock

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = (run / "summary.json").read_bytes()
    with RunLock(run):
        capsys.readouterr()
        assert cli.main(["-q", "analyze", str(run)]) == 2
        message = _one_error(capsys, "analyze")
    assert message.startswith(f"{run}: in use by another jaxinf process (host ") and message.endswith(
        "); wait for it to finish or stop it"
    ), message
    assert (run / "summary.json").read_bytes() == before


@pytest.mark.parametrize(
    "setting, message",
    [
        ("validate.strategies=[ekfac,kfac,ekfac]", "validate.strategies: ekfac is listed twice"),
        ("validate.dampings=[null,0.1,null]", "validate.dampings: null is listed twice"),
        ("validate.dampings=[1,1.0]", "validate.dampings: 1.0 is listed twice"),
        ("validate.recall_k=[5,5]", "validate.recall_k: 5 is listed twice"),
    ],
)
def test_validate_refuses_a_list_that_names_an_entry_twice(tmp_path, capsys, setting, message):
    """``validate.strategies=[identity,identity]`` (or a damping, a Recall@k listed twice) was accepted and silently
    collapsed (validation.json and the report keyed by it show it once): a typo for another entry went unnoticed
    after the whole validation. Refused before anything is written."""
    assert cli.main(["-q", "validate", "--out", str(tmp_path / "v"), setting]) == 2
    assert _one_error(capsys, "validate").startswith(f"command line: {message}, got ")
    assert not (tmp_path / "v").exists()


def test_prepare_into_a_run_directory_is_refused(finished, tmp_path, capsys):
    """``jaxinf prepare DOCS RUN/state/ds`` wrote the dataset inside a run directory, where every other command
    refuses its output (the run's ``--overwrite`` deletes what is there); refused in one line, nothing written."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"id": "a", "text": "one two"}\n')
    before = sorted(p.name for p in (run / "state").iterdir())
    assert cli.main(["-q", "prepare", str(docs), str(run / "state" / "ds")]) == 2
    assert _one_error(capsys, "prepare", alone=True) == (
        f"{run / 'state' / 'ds'}: is inside the jaxinf run directory {run}; choose an OUT_DIR outside it"
    )
    assert sorted(p.name for p in (run / "state").iterdir()) == before


def test_compare_with_a_file_for_its_kronfluence_directory_says_it_is_a_file(finished, tmp_path, capsys):
    """``jaxinf compare --kronfluence FILE`` said "no such kronfluence directory" of a file that exists."""
    (tmp_path / "scores.safetensors").write_bytes(b"x")
    argv = ["-q", "compare", "--kronfluence", str(tmp_path / "scores.safetensors"), "--run", str(finished)]
    assert cli.main(argv) == 2
    assert _one_error(capsys, "compare") == f"{tmp_path / 'scores.safetensors'}: a file, not a kronfluence directory"


def test_what_a_killed_analysis_left_in_the_run_directory_is_removed_by_the_next(finished, tmp_path, capsys):
    """An analysis killed while it wrote the report left ``RUN/.report-XXXXXXXX`` (the report half-built) or, killed
    between its two renames, ``RUN/.report-old-PID`` (the previous report) in the run directory for ever. The next
    analysis of the run removes both, saying so; the report is whole."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    for name in (".report-k1ll3d_x", ".report-old-99999"):
        (run / name).mkdir()
        (run / name / "index.html").write_text("<html>half")
    shutil.rmtree(run / "report")
    (run / "report").write_text("a file where the report belongs\n")  # replaced, and not left as .report-old-PID
    capsys.readouterr()
    assert cli.main(["-q", "analyze", str(run)]) == 0
    assert "removed a temporary directory left by a process killed while it wrote (.report-k1ll3d_x)" in (
        capsys.readouterr().err
    )
    assert not [p.name for p in run.iterdir() if p.name.startswith(".report")]
    assert (run / "report" / "index.html").read_text().endswith("</html>\n")


def test_a_killed_kronfluence_import_is_finished_by_the_same_import_and_refused_by_run(
    world, finished, tmp_path, capsys
):
    """``jaxinf kronfluence import`` SIGKILLed between two stages left a run whose covariance was kronfluence's and
    whose eigendecomposition and Lambda were pending: ``jaxinf run`` then fitted those itself (a curvature half
    kronfluence's, without a word) and the same import again was refused ("the run already has results"). The
    record says the import is unfinished until it is whole: run refuses it, the same import finishes it."""
    import signal

    from pipeline_support import env, jaxinf

    factors, out = tmp_path / "factors", tmp_path / "out"
    assert cli.main(["-q", "kronfluence", "export", str(finished), str(factors)]) == 0
    argv = ["kronfluence", "import", factors, *overrides(world, out, **{"factors.fisher": "empirical"})]
    environment = env(tmp_path / "cache")
    r = jaxinf(argv, {**environment, "JAXINF_FAULT": "eigen:before-manifest:0"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    record = json.loads((out / "run.json").read_text())
    assert record["stages"]["covariance"]["status"] == "done" and record["stages"]["lambda"]["status"] == "pending"
    capsys.readouterr()
    assert cli.main(["-q", "run", *overrides(world, out, **{"factors.fisher": "empirical"})]) == 2
    assert _one_error(capsys, "run") == (
        f"{out}: the import of kronfluence {factors.resolve()} into it was interrupted; run the same jaxinf "
        "kronfluence import again to finish it (or start over with --overwrite)"
    )
    assert json.loads((out / "run.json").read_text()) == record  # refused, nothing fitted
    r = jaxinf(argv, environment)
    assert r.returncode == 0, r.stderr
    record = json.loads((out / "run.json").read_text())
    assert record["imported"]["complete"] is True
    assert all(record["stages"][s]["source"].startswith("kronfluence ") for s in ("covariance", "eigen", "lambda"))


def test_a_stage_directory_made_a_file_is_recomputed(world, finished, tmp_path, caplog):
    """``RUN/state/eigen`` replaced by a file stopped a rerun with "state/eigen/0/jaxinf_manifest.json: not a
    directory" (a path that is nowhere): it is a damaged checkpoint, recomputed as a missing one is, to the same
    scores."""
    import shutil

    from jaxinf import config as cfg
    from jaxinf import pipeline

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    shutil.rmtree(run / "state" / "eigen")
    (run / "state" / "eigen").write_text("x\n")
    (run / "scores.npy").unlink()
    with caplog.at_level(logging.WARNING, logger="jaxinf"):
        pipeline.run(cfg.load(None, overrides(world, run, **{"data.batch_size": 8, "factors.fisher": "empirical"})))
    assert "incomplete checkpoint (no jaxinf_manifest.json): stage eigen will be recomputed" in caplog.text
    assert (run / "state" / "eigen").is_dir()
    assert np.array_equal(np.load(run / "scores.npy"), np.load(finished / "scores.npy"))


def test_a_query_against_an_index_array_that_is_a_link_to_nothing_says_so(world, indexed, tmp_path, capsys):
    """An index array (``state/index/cells.npy``) that is a symbolic link to nothing was "unreadable index array (No
    such file or directory)"; it is named as a link to nothing (:func:`jaxinf.errors.missing`)."""
    import shutil

    src, _ = indexed
    run = tmp_path / "run"
    shutil.copytree(src, run)
    cells = run / "state" / "index" / "cells.npy"
    cells.unlink()
    cells.symlink_to(tmp_path / "unmounted" / "cells.npy")
    capsys.readouterr()
    assert cli.main(["-q", "query", str(run), str(world["queries"]), "--out", str(tmp_path / "q")]) == 2
    assert _one_error(capsys, "query") == (
        f"{cells}: unreadable index array: a symbolic link to nothing (or a loop of links)"
    )


def test_a_path_key_starting_with_a_tilde_is_in_the_home_directory(world, tmp_path, monkeypatch, capsys):
    """``run.out=~/runs/x`` (the shell does not expand ``~`` after ``key=``) or ``out: ~/runs/x`` in a YAML config
    made a directory literally called ``~`` in the working directory, which ``rm -rf ~`` then takes for the home
    directory; ``data.queries=~/q.jsonl`` was "no such file". A path key's leading ``~`` is the home directory."""
    import shutil

    from jaxinf import config as cfg

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    shutil.copy(world["queries"], home / "q.jsonl")
    (tmp_path / "c.yaml").write_text("run:\n  out: ~/runs/y\ndata:\n  queries: ~/q.jsonl\n")
    config = cfg.load(tmp_path / "c.yaml", ["model.checkpoint=~/model", "data.documents=~/d/*.jsonl"])
    assert (config.run.out, config.data.queries) == (f"{home}/runs/y", f"{home}/q.jsonl")
    assert (config.model.checkpoint, config.data.documents) == (f"{home}/model", f"{home}/d/*.jsonl")
    argv = ["-q", "run", *overrides(world, Path("~/runs/x"), **{"data.queries": "~/q.jsonl"}), "data.batch_size=8"]
    assert cli.main(argv) == 0
    assert (home / "runs" / "x" / "scores.npy").is_file() and os.listdir(work) == []


def test_a_lock_file_that_is_a_symbolic_link_is_never_followed(finished, tmp_path, capsys):
    """A symbolic link planted where a lock file belongs (``RUN/.jaxinf.lock``, or ``.OUT.prepare-lock`` in a shared
    directory) was followed: the process wrote its host and pid over the link's target (any file it may write,
    truncated). The link is never followed: one line naming it, the target untouched."""
    import shutil

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / ".jaxinf.lock").unlink(missing_ok=True)
    (run / ".jaxinf.lock").symlink_to(victim)
    capsys.readouterr()
    assert cli.main(["-q", "analyze", str(run)]) == 2
    assert _one_error(capsys, "analyze") == (
        f"{run / '.jaxinf.lock'}: cannot lock the run directory (a symbolic link where the lock file belongs, never "
        "followed: remove it)"
    )
    docs, shared = tmp_path / "docs.jsonl", tmp_path / "shared"
    docs.write_text('{"id": "a", "text": "one two"}\n')
    shared.mkdir()
    (shared / ".ds.prepare-lock").symlink_to(victim)
    assert cli.main(["-q", "prepare", str(docs), str(shared / "ds")]) == 2
    assert _one_error(capsys, "prepare").startswith(f"{shared / '.ds.prepare-lock'}: cannot create the dataset ")
    assert victim.read_text() == "precious\n" and not (shared / "ds").exists()


@pytest.mark.parametrize("command", ["run", "plan"])
def test_a_null_field_of_config_json_is_named_null_not_missing(world, tmp_path, capsys, command):
    """A required ``config.json`` field written as ``null`` (``"hidden_size": null``, as a script that dumps ``None``
    writes it) was "field hidden_size is missing", sending the user to look for a field that is there."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(world["model"], model)
    raw = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**raw, "hidden_size": None}))
    out = tmp_path / "run"
    args = overrides(world, out, **{"model.checkpoint": model})
    assert cli.main(["-q", command, *args, *(["--no-compile"] if command == "plan" else [])]) == 2
    assert _one_error(capsys, command) == f"{model / 'config.json'}: field hidden_size is null, expected int"
    assert not out.exists()


def test_a_query_with_another_model_names_model_checkpoint_not_factors_from(world, indexed, tmp_path, capsys):
    """``jaxinf query RUN Q model.checkpoint=OTHER`` (other weights) said "factors.from: RUN was fitted with other
    settings: the model's content (...)", naming a key the user never wrote: the query sets ``factors.from``
    itself. It names model.checkpoint (and any other key the run fixes) and says the query's must be the run's;
    the same weights in a copy are still accepted."""
    import shutil

    from safetensors.numpy import load_file, save_file

    run, _ = indexed
    model = tmp_path / "model"
    shutil.copytree(world["model"], model)
    weights = load_file(model / "model.safetensors")
    name = sorted(weights)[0]
    save_file({**weights, name: weights[name] * 2}, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "q"
    assert (
        cli.main(["-q", "query", str(run), str(world["queries"]), "--out", str(out), f"model.checkpoint={model}"]) == 2
    )
    assert _one_error(capsys, "query") == (
        f"model.checkpoint (the model in {model} is not what {run} read from {world['model']}): a query is scored "
        f"with the model and curvature of its run {run}, fitted with other values of these; leave them out"
    )
    args = ["-q", "query", str(run), str(world["queries"]), "--out", str(out), "model.dtype=bfloat16", "factors.seed=3"]
    assert cli.main(args) == 2
    assert _one_error(capsys, "query").startswith("model.dtype, factors.seed: a query is scored with the model and ")
    assert not out.exists()


def test_validate_warns_of_a_query_made_only_of_unknown_words_as_run_does(world, tmp_path, caplog):
    """``jaxinf validate CONFIG`` read its queries past jaxinf run's checks: with the demo's word-level tokenizer a
    query made only of words it does not know became ``<unk>`` tokens without a word (jaxinf run warns). The world of
    a config checks its queries with run's one check (:func:`jaxinf.run.inputs.check_queries`): one line per query,
    prompt and completion together."""
    from jaxinf import config as cfg
    from jaxinf.validate.world import from_config

    queries = tmp_path / "q.jsonl"
    queries.write_text(
        json.dumps({"id": "unk", "prompt": "Xyzzy plugh", "completion": "Frobozz!"})
        + "\n"
        + json.dumps({"id": "ok", "prompt": "the river of", "completion": "1 2 3 ."})
        + "\n"
    )
    config = cfg.load(None, overrides(world, tmp_path / "v", **{"data.queries": queries}))
    with caplog.at_level(logging.WARNING, logger="jaxinf"):
        from_config(config)
    assert [r.getMessage() for r in caplog.records] == [
        f'{queries}:1: query "unk": every token of its prompt and completion is the tokenizer\'s unknown token <unk> '
        "(3 tokens): the model sees none of its words"
    ]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("stages.covariance", None, "field stages.covariance is null, expected an object"),
        ("inputs", "x", "field inputs is a string, expected an object"),
        ("inputs.model.files", [], "field inputs.model.files is a list, expected an object"),
        ("stages.exports.files", "x", "field stages.exports.files is a string, expected an object"),
        ("stages.scores.plan", None, "field stages.scores.plan is null, expected an object"),
        ("stages", "DELETE", "no field stages"),
    ],
)
def test_a_run_json_with_a_field_of_another_type_is_one_line_naming_it(
    world, finished, tmp_path, capsys, field, value, message
):
    """A run.json (and its copy) whose ``stages.covariance`` was null, whose ``inputs`` was a string or whose
    ``stages.exports.files`` a string was an ``AttributeError`` traceback wherever jaxinf first read the field (a
    missing ``stages`` said "unreadable ('stages')"). The one reader of run records checks every field it reads
    against the shape jaxinf writes (:data:`jaxinf.run.rundir.RECORD_SHAPE`): one line naming the field, nothing
    touched; a damaged run.json beside an intact copy is restored from the copy as before."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}

    def damage(path):
        record = json.loads(path.read_text())
        *parents, last = field.split(".")
        entry = record
        for key in parents:
            entry = entry[key]
        if value == "DELETE":
            del entry[last]
        else:
            entry[last] = value
        path.write_text(json.dumps(record))

    for path in (run / "run.json", run / "state" / "run.json"):
        damage(path)
    damaged = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    assert cli.main(["-q", "run", *overrides(world, run, **{"data.batch_size": 8, "factors.fisher": "empirical"})]) == 2
    assert _one_error(capsys, "run").startswith(
        f"{run / 'run.json'}: unreadable (not a run record: {message}), and its copy {run / 'state' / 'run.json'} is "
        f"unreadable (not a run record: {message}); --overwrite would delete everything in "
    )
    assert cli.main(["-q", "run", *overrides(world, tmp_path / "other", **{"factors.from": run})]) == 2
    assert _one_error(capsys, "run").endswith("the run cannot be read")
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == damaged
    (run / "state" / "run.json").write_bytes(before[run / "state" / "run.json"])  # the copy intact again
    assert cli.main(["-q", "run", *overrides(world, run, **{"data.batch_size": 8, "factors.fisher": "empirical"})]) == 0
    assert "restored from its copy" in capsys.readouterr().err


def test_a_run_being_read_is_not_rewritten_and_one_being_written_is_not_read(world, indexed, tmp_path, capsys):
    """``jaxinf query RUN Q`` started just before ``jaxinf run --overwrite`` of RUN said "RUN: the eigendecomposition
    is missing or corrupted (stage eigen)" (the overwrite had set RUN aside under the query), and a query started
    during the overwrite "the index is incomplete (21 of 50 batches written)": the commands that read a run
    (``query``, ``factors.from``, ``index.from``, ``kronfluence export``, ``compare``) took no lock. They hold a
    shared lock on it (:func:`jaxinf.run.lock.reading`): refused in one line while a run writes it, and a run that
    would write it while it is read is refused, its files untouched."""
    from jaxinf.run.lock import RunLock, reading

    run, argv = indexed
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".jaxinf.lock"}
    with RunLock(run):  # a jaxinf run writing it
        holder = (run / ".jaxinf.lock").read_text().strip()
        message = f"{run}: being written by another jaxinf process ({holder}); wait for it to finish, then read it"
        assert cli.main(["-q", "query", str(run), str(world["queries"]), "--out", str(tmp_path / "q")]) == 2
        assert _one_error(capsys, "query") == message
        assert cli.main(["-q", "run", *overrides(world, tmp_path / "f", **{"factors.from": run})]) == 2
        assert _one_error(capsys, "run") == message
        assert cli.main(["-q", "kronfluence", "export", str(run), str(tmp_path / "k")]) == 2
        assert _one_error(capsys, "kronfluence") == message
    assert not any((tmp_path / name).exists() for name in ("q", "f", "k"))
    with reading((run,)):  # a query reading it
        assert cli.main(["-q", "run", "--overwrite", *argv]) == 2
        assert _one_error(capsys, "run") == (
            f"{run}: in use by another jaxinf process (reading it); wait for it to finish or stop it, or choose "
            "another run.out"
        )
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".jaxinf.lock"} == before


def test_an_argument_that_is_not_utf8_is_one_line_and_writes_nothing(world, finished, tmp_path, capsys):
    """A path with a byte that is not UTF-8 (``run.out=$'runs/o\\xff'``: Python keeps it as a lone surrogate) was a
    traceback in each command: a YAML ``ReaderError`` without ``.problem`` for a ``key=value``, tensorstore's "Unable
    to cast Python instance" for ``query --out``, a ``UnicodeEncodeError`` while ``analyze`` wrote the report, and
    array_record's ``TypeError`` after ``prepare`` had converted every document. Each is refused first, in one line
    naming the argument; a control character in a value is one line too."""
    bad = str(tmp_path) + "/o\udcffx"
    for command, argv in (
        ("run", ["run", *overrides(world, Path(bad))]),
        ("query", ["query", str(finished), str(world["queries"]), "--out", bad]),
        ("analyze", ["analyze", bad]),
        ("prepare", ["prepare", str(world["docs"]), bad]),
    ):
        assert cli.main(["-q", *argv]) == 2
        assert _one_error(capsys, command).startswith(
            f"argument '{'run.out=' if command == 'run' else ''}{tmp_path}/o\\xffx': not UTF-8 text (byte 0xff at "
        )
    assert os.listdir(tmp_path) == []
    assert cli.main(["-q", "run", *overrides(world, tmp_path / "o\x01x")]) == 2
    assert _one_error(capsys, "run") == (
        f"command line: run.out: cannot parse value '{tmp_path}/o\\x01x' (special characters are not allowed)"
    )
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "override, what",
    [
        ("data.queries", "QUERIES, the command's second argument"),
        ("run.out", "--out"),
        ("factors.from", "RUN_OR_INDEX: the curvature of the run queried"),
        ("scores.mode", "index: jaxinf query scores with the run's index"),
        ("index.k", "RUN_OR_INDEX: the run's index, as built; a query builds none"),  # named index.from (pass 10)
        ("index.dtype", "RUN_OR_INDEX: the run's index, as built"),  # accepted, recorded, never applied (pass 10)
    ],
)
def test_a_query_refuses_overrides_of_the_keys_it_sets_itself(world, indexed, tmp_path, capsys, override, what):
    """``jaxinf query RUN Q data.queries=X`` scored X, not Q, without a word; ``run.out=RUN`` was refused as
    "factors.from: RUN is run.out itself", a key the user never wrote; ``factors.from=OTHER`` as "built in another
    eigenbasis (the factors were refitted)"; ``scores.mode=exact`` made the query a pass over every document. The keys
    the command sets from its own arguments are refused in one line naming what sets them; nothing is written."""
    run, _ = indexed
    value = {
        "data.queries": world["queries"],
        "run.out": run,
        "factors.from": run,
        "scores.mode": "exact",
        "index.k": 8,
        "index.dtype": "float16",
    }[override]
    out = tmp_path / "q"
    argv = ["-q", "query", str(run), str(world["queries"]), "--out", str(out), f"{override}={value}"]
    assert cli.main(argv) == 2
    assert _one_error(capsys, "query") == f"command line: {override}: set by jaxinf query itself ({what}); leave it out"
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- the tenth hostile pass


def _tree(root: Path) -> dict:
    """Every file under ``root`` with its bytes, but the lock file (it names the last process that held it)."""
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".jaxinf.lock"}


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-1e999"])
def test_a_query_answer_that_is_not_a_finite_number_is_refused_naming_its_line(world, tmp_path, capsys, value):
    """A query's ``"answer": NaN`` (or ``Infinity``, or ``1e999``: infinite once read) was exported as the text
    "NaN"; refused as any other invalid field is, naming the file, line and field, before anything is written."""
    queries = tmp_path / "q.jsonl"
    queries.write_text(
        '{"id": "a", "prompt": "the river of milin is the", "completion": "1 2 3 .", "answer": 7}\n'
        f'{{"id": "b", "prompt": "the river of milin is the", "completion": "1 2 3 .", "answer": {value}}}\n'
    )
    out = tmp_path / "run"
    assert cli.main(["-q", "run", *overrides(world, out, **{"data.queries": queries})]) == 2
    shown = {"NaN": "NaN", "Infinity": "Infinity", "-1e999": "-Infinity"}[value]
    assert _one_error(capsys, "run") == f'{queries}:2: field "answer" must be a string or a finite number, got {shown}'
    assert not out.exists()


def test_run_and_query_refuse_supports_naming_no_document_before_anything_is_set_aside(
    world, indexed, tmp_path, capsys
):
    """``supports`` naming a document missing from the corpus was refused by ``jaxinf validate`` but accepted by
    ``jaxinf run`` and ``jaxinf query`` (exported as given). All three share one check
    (:func:`jaxinf.data.queries.support_rows`), made before the run directory is touched: an ``--overwrite`` of a
    finished run keeps it as it was, and a new one is not made."""
    import shutil

    src, argv = indexed
    run = tmp_path / "run"
    shutil.copytree(src, run)
    before = _tree(run)
    queries = tmp_path / "q.jsonl"
    queries.write_text(
        '{"id": "a", "prompt": "the river of milin is the", "completion": "1 2 3 .", "supports": ["doc00001", 3]}\n'
    )
    message = f'{queries}:1: query "a": supports names unknown document id "3"'
    assert cli.main(["-q", "run", "--overwrite", *argv, f"run.out={run}", f"data.queries={queries}"]) == 2
    assert _one_error(capsys, "run") == message
    assert _tree(run) == before and sorted(os.listdir(run)) == sorted(os.listdir(src))
    assert cli.main(["-q", "query", str(run), str(queries), "--out", str(tmp_path / "q")]) == 2
    assert _one_error(capsys, "query") == message
    assert not (tmp_path / "q").exists() and _tree(run) == before


def test_plan_and_query_without_arguments_do_not_say_overrides_are_required(capsys):
    """``jaxinf plan`` with no argument printed argparse's "the following arguments are required: config,
    section.key=value", as if overrides were required (``jaxinf query`` too); plan now says what ``jaxinf run``
    says, and query's usage names only what it needs."""
    assert cli.main(["-q", "plan"]) == 2
    assert _one_error(capsys, "plan", alone=True) == (
        "give a config file or section.key=value overrides (configs/reference.yaml lists every key)"
    )
    assert cli.main(["-q", "query"]) == 2
    assert _one_error(capsys, "query", alone=True) == (
        "the following arguments are required: RUN_OR_INDEX, QUERIES (see jaxinf query --help)"
    )


def test_index_from_that_is_no_run_or_is_never_read_is_refused_naming_it(world, indexed, tmp_path, capsys):
    """``index.from=MISSING`` (or a file) said "MISSING/state/index: no index here", naming a path the user never
    wrote, as though a run were there; ``factors.from`` and ``jaxinf query`` said "no run.json" of a path that does
    not exist. And ``index.from`` with ``scores.mode: exact`` was ignored without a word: a pass over every document,
    the index never read. Each is refused in one line naming index.from, before anything is written."""
    run, argv = indexed
    (tmp_path / "file").write_text("x")
    out = tmp_path / "out"
    for key, value, why in (
        ("index.from", tmp_path / "missing", "no such directory"),
        ("index.from", tmp_path / "file", "a file, not a directory"),
        ("factors.from", tmp_path / "missing", "no such directory"),
    ):
        extra = ["index.k=null", "scores.mode=index"] if key == "index.from" else []
        assert cli.main(["-q", "run", *argv, f"run.out={out}", *extra, f"{key}={value}"]) == 2
        assert _one_error(capsys, "run") == f"{key}: {value}: not a jaxinf run directory ({why})"
    assert cli.main(["-q", "query", str(tmp_path / "missing"), str(world["queries"]), "--out", str(out)]) == 2
    assert _one_error(capsys, "query") == f"{tmp_path / 'missing'}: not a jaxinf run directory (no such directory)"
    assert cli.main(["-q", "run", *argv, f"run.out={out}", "index.k=null", f"index.from={run}"]) == 2
    assert _one_error(capsys, "run") == (
        f"index.from: {run}: read only with scores.mode: index, got scores.mode: exact (a pass over every document, "
        "the index never read); set scores.mode: index, or leave index.from out"
    )
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_a_query_resumed_with_other_queries_names_its_argument_and_offers_no_key_it_refuses(
    world, indexed, tmp_path, capsys
):
    """``jaxinf query RUN Q2 --out OUT`` where OUT answered Q1 was refused naming ``data.queries`` and offering
    "factors.from=RUN with another --out keeps the curvature it reuses": both keys jaxinf query sets itself and
    refuses as overrides. It names QUERIES and offers only what the command takes; OUT is kept as it was."""
    run, _ = indexed
    out = tmp_path / "q"
    assert cli.main(["-q", "query", str(run), str(world["queries"]), "--out", str(out)]) == 0
    capsys.readouterr()
    before = _tree(out)
    other = tmp_path / "other.jsonl"
    other.write_text('{"id": "a", "prompt": "the river of milin is the", "completion": "1 2 ."}\n')
    assert cli.main(["-q", "query", str(run), str(other), "--out", str(out)]) == 2
    assert _one_error(capsys, "query") == (
        f"QUERIES: {other} holds other queries than {world['queries']}, which {out} answers; give another --out "
        "for them"
    )
    assert _tree(out) == before


def test_a_file_size_limit_is_one_line_and_the_same_command_resumes(world, finished, tmp_path, capsys):
    """A write past the process's file-size limit (``ulimit -f``; Python ignores SIGXFSZ, so the write fails with
    EFBIG, "File too large") was a traceback with exit 1, from jaxinf's own writes and from Orbax's alike. It is the
    machine refusing a write, as a full disk is: one line naming the file and the stage, exit 3, everything finished
    kept, and the same command, run again without the limit, finishes with the same scores."""
    import subprocess
    import sys

    from pipeline_support import env

    out = tmp_path / "run"
    argv = ["-q", "run", *overrides(world, out, **{"data.batch_size": 8, "factors.fisher": "empirical"})]
    environment = env(tmp_path / "xla")
    environment.pop("JAX_COMPILATION_CACHE_DIR")
    environment["JAXINF_COMPILATION_CACHE"] = ""  # no cache entry meets the limit

    limited = ["bash", "-c", 'ulimit -f 12 && exec "$@"', "-", sys.executable, "-m", "jaxinf", *argv]  # 12 KiB
    r = subprocess.run(limited, capture_output=True, text=True, env=environment)
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("jaxinf run: error: ")]
    assert len(lines) == 1 and ": file too large (over the file-size limit: ulimit -f, " in lines[0], r.stderr
    assert lines[0].startswith(f"jaxinf run: error: {out}/state/covariance/1: "), lines[0]  # not Orbax's temporary
    assert f"everything finished is kept in {out}; raise the limit or choose another run.out" in lines[0]
    assert cli.main(argv) == 0
    np.testing.assert_array_equal(np.load(out / "scores.npy"), np.load(finished / "scores.npy"))


def test_a_figure_the_machine_refused_to_write_is_named(finished, tmp_path):
    """``jaxinf analyze`` past a file-size limit (or on a full disk) said "a write: file too large": matplotlib's
    image writer fails with an error naming no file. The figure it was writing is named where it was going (the
    eleventh pass: it was named in the report's temporary directory, gone by the time the message is read); nothing of
    the run is lost and the temporary directory is removed."""
    import shutil
    import subprocess
    import sys

    from pipeline_support import env

    run = shutil.copytree(finished, tmp_path / "run")
    before = _tree(run)
    limited = ["bash", "-c", 'ulimit -f 4 && exec "$@"', "-", sys.executable, "-m", "jaxinf", "-q", "analyze", str(run)]
    r = subprocess.run(limited, capture_output=True, text=True, env=env(tmp_path / "xla"))
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr[-3000:]
    line = next(line for line in r.stderr.splitlines() if line.startswith("jaxinf analyze: error: "))
    assert line.startswith(f"jaxinf analyze: error: {run}/report/") and ".png: file too large (" in line, line
    assert _tree(run) == before and not [p for p in os.listdir(run) if p.startswith(".report-")]


def test_a_json_output_that_is_a_device_or_inside_a_run_is_refused_first(finished, tmp_path, capsys):
    """``jaxinf compare ... --json RUN/scores.npy`` (or ``jaxinf plan ... --json`` there) replaced the run's scores
    with the report, exit 0; ``--json /dev/full`` (as root) or a FIFO was replaced by a regular file (the atomic
    write renames a new file over the path). Both commands check their ``--json`` with one rule
    (:func:`jaxinf.run.rundir.check_output_file`), before any work: one line, nothing touched."""
    import shutil

    run = shutil.copytree(finished, tmp_path / "run")
    before = _tree(run)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for target, message in (
        (
            fifo,
            f"--json {fifo}: is not a regular file (a device, FIFO or socket, which the write would replace); give "
            "the path of a file to write, or --json - to print it",
        ),
        (
            run / "scores.npy",
            f"{run / 'scores.npy'}: is inside the jaxinf run directory {run}; choose a --json outside it",
        ),
        (run / "new.json", f"{run / 'new.json'}: is inside the jaxinf run directory {run}; choose a --json outside it"),
    ):
        argv = ["-q", "compare", "--kronfluence", str(tmp_path / "k"), "--run", str(run), "--json", str(target)]
        assert cli.main(argv) == 2
        assert _one_error(capsys, "compare") == message
        assert cli.main(["-q", "plan", "data.max_length=8", "--no-compile", "--json", str(target)]) == 2
        assert _one_error(capsys, "plan") == message
    assert _tree(run) == before and sorted(os.listdir(tmp_path)) == ["fifo", "run"] and fifo.is_fifo()


def test_a_kronfluence_name_the_directory_given_cannot_honour_is_refused(finished, tmp_path, capsys):
    """``jaxinf compare --kronfluence FACTORS_DIR --factors other`` (or ``kronfluence import``) compared or imported
    FACTORS_DIR, the name ignored without a word: ``--factors``/``--scores`` pick among an analysis directory's
    ``factors_*`` and ``scores_*``. A name that is not the directory's own is refused in one line."""
    analysis = tmp_path / "analysis"
    analysis.mkdir()
    factors = analysis / "factors_ekfac"
    assert cli.main(["-q", "kronfluence", "export", str(finished), str(factors)]) == 0
    capsys.readouterr()
    argv = ["-q", "compare", "--kronfluence", str(factors), "--run", str(finished)]
    assert cli.main([*argv, "--factors", "other"]) == 2
    assert _one_error(capsys, "compare") == (
        f"--factors NAME: picks among the factors_* and scores_* of an analysis directory, but {factors} is one "
        f"factors directory itself; give the analysis directory ({analysis}), or leave --factors out"
    )
    assert cli.main([*argv, "--factors", "ekfac"]) == 0  # its own name
    assert (
        cli.main(["-q", "compare", "--kronfluence", str(analysis), "--run", str(finished), "--factors", "other"]) == 2
    )
    assert "factors_other: no such kronfluence directory (factors_* here: factors_ekfac" in _one_error(
        capsys, "compare"
    )


def test_every_path_a_command_writes_refuses_an_empty_one_and_prepare_the_working_directory(
    world, finished, tmp_path, capsys, monkeypatch
):
    """An empty path (``''``, a shell variable never set) is ``.``: ``validate --out ''`` and ``kronfluence export
    RUN ''`` wrote into the working directory, ``prepare DOCS ''`` (or ``.``) converted every document, then failed
    its final rename with an EBUSY traceback, and by the directory's own name replaced the working directory (the
    shell left in a removed one). Every path argument a command writes is refused when empty, by one rule
    (:data:`jaxinf.cli.PATH_ARGUMENTS`), and prepare refuses the working directory; nothing is written."""
    monkeypatch.chdir(tmp_path)
    for argv, command, message in (
        (["validate", "--out", ""], "validate", "--out '': an empty path; give the path to write (or leave --out out)"),
        (["demo", "--out", " "], "demo", "--out ' ': an empty path; give the path to write (or leave --out out)"),
        (["prepare", str(world["docs"]), ""], "prepare", "OUT_DIR '': an empty path; give the path to write"),
        (
            ["kronfluence", "export", str(finished), ""],
            "kronfluence",
            "OUT_DIR '': an empty path; give the path to write",
        ),
        (
            ["plan", "data.max_length=8", "--no-compile", "--json", ""],
            "plan",
            "--json '': an empty path; give the path to write (or leave --json out)",
        ),
        (
            ["prepare", str(world["docs"]), "."],
            "prepare",
            ".: is the working directory, which the finished dataset would replace (leaving the shell in a removed "
            "directory); give a new directory's path; nothing was written",
        ),
    ):
        assert cli.main(["-q", *argv]) == 2
        assert _one_error(capsys, command) == message
        assert os.listdir(tmp_path) == []


def test_a_query_refused_for_documents_changed_under_its_index_keeps_its_finished_results(
    world, indexed, tmp_path, capsys
):
    """``jaxinf query RUN Q --out OUT`` again after the corpus changed under RUN's index: the start deleted OUT's
    finished scores, exports and report ("changed since this run started; recomputing ...") and only then refused
    the index built over other documents, offering ``index.k``, which jaxinf query refuses. The index is checked
    before anything is invalidated: OUT is kept as it was, the message says how to go on, and with the documents
    restored the same command recomputes nothing."""
    import shutil

    run, _ = indexed
    docs = shutil.copy(world["docs"], tmp_path / "docs.jsonl")
    out = tmp_path / "q"
    argv = ["-q", "query", str(run), str(world["queries"]), "--out", str(out), f"data.documents={docs}"]
    assert cli.main(argv) == 0
    capsys.readouterr()

    def kept():  # all but the token counts' cache (state/plan), counted again for the documents as they are, and
        # the records' "updated" stamp (a rerun that recomputes nothing still records when it looked)
        def unstamped(p, b):
            return json.dumps({**json.loads(b), "updated": None}).encode() if p.name == "run.json" else b

        return {p: unstamped(p, b) for p, b in _tree(out).items() if p.parent.name != "plan"}

    before = kept()
    original = Path(docs).read_text()
    Path(docs).write_text(original.replace("came over day", "came over night"))
    assert cli.main(argv) == 2
    assert _one_error(capsys, "query") == (
        f"{run / 'state' / 'index' / 'manifest.json'}: built over other documents than {docs} ({run}: restore the "
        "documents it was built over, or run its jaxinf run again to rebuild it)"
    )
    assert kept() == before
    Path(docs).write_text(original)
    assert cli.main(argv) == 0
    assert kept() == before


def test_every_path_a_command_reads_refuses_an_empty_one(finished, tmp_path, capsys, monkeypatch):
    """The eleventh pass: ``jaxinf analyze ''`` analyzed the working directory (``Path('')`` is ``.``), ``query ''
    Q``, ``compare --run ''`` and ``kronfluence export '' OUT`` named ``.``, and ``prepare '' OUT`` refused OUT as
    inside "the input directory " (named as nothing). Every path a command reads is refused when empty, by the rule of
    the paths it writes (:data:`jaxinf.cli.INPUT_ARGUMENTS`), named as the command's usage names it."""
    import shutil

    monkeypatch.chdir(shutil.copytree(finished, tmp_path / "run"))  # a run here: '' must not be read as it
    before = _tree(Path("."))
    for argv, command, label in (
        (["analyze", ""], "analyze", "RUN_DIR ''"),
        (["analyze", str(tmp_path / "new"), "--from-release", " "], "analyze", "--from-release ' '"),
        (["query", "", "q.jsonl"], "query", "RUN_OR_INDEX ''"),
        (["query", ".", ""], "query", "QUERIES ''"),
        (["compare", "--kronfluence", "", "--run", "."], "compare", "--kronfluence ''"),
        (["compare", "--kronfluence", str(tmp_path), "--run", ""], "compare", "--run ''"),
        (["kronfluence", "export", "", str(tmp_path / "k")], "kronfluence", "RUN_DIR ''"),
        (["kronfluence", "import", "", "data.max_length=8"], "kronfluence", "DIR ''"),
        (["prepare", "", str(tmp_path / "ds")], "prepare", "INPUT ''"),
        (["run", ""], "run", "CONFIG ''"),
    ):
        assert cli.main(["-q", *argv]) == 2
        message = _one_error(capsys, command, alone=True)
        assert message.startswith(f"{label}: an empty path; give the path to read"), message
    assert _tree(Path(".")) == before and sorted(os.listdir(tmp_path)) == ["run"]


def test_a_file_whose_lines_end_in_a_carriage_return_alone_says_so(tmp_path, capsys):
    """The eleventh pass: documents or queries with old Mac line ends (``\\r`` alone) were one line of "invalid JSON
    (Extra data, column 142)". It is one line naming the file and line, how many lines ran together and why; a bare
    carriage return inside a line (JSON whitespace) is still read, and a real JSON error beside one is still named
    as such."""
    from jaxinf.data.errors import DataError
    from jaxinf.data.queries import read_queries

    docs = tmp_path / "docs.jsonl"
    docs.write_bytes(b'{"id": "a", "text": "one two"}\r{"id": "b", "text": "three"}\r{"id": "c", "text": "x"}\r')
    assert cli.main(["-q", "prepare", str(docs), str(tmp_path / "ds")]) == 2
    assert _one_error(capsys, "prepare", alone=True) == (
        f"{docs}:1: 3 lines separated by a carriage return alone (\\r, old Mac line ends); JSONL lines end in \\n "
        "(or \\r\\n): convert the file (tr '\\r' '\\n' < OLD > NEW)"
    )
    queries = tmp_path / "q.jsonl"
    queries.write_bytes(
        b'{"id": "q", "prompt": "a", "completion": "b"}\n{"id": "r", "prompt": "a", "completion": "b"}\r'
    )
    queries.write_bytes(queries.read_bytes() + b'{"id": "s", "prompt": "a", "completion": "b"}\r\n')
    with pytest.raises(DataError, match=r"q\.jsonl:2: 2 lines separated by a carriage return alone"):
        read_queries(queries)
    queries.write_bytes(b'{"id": "q",\r"prompt": "a", "completion": "b"}\r\n{"id": "r",\r"prompt": x}\n')
    with pytest.raises(DataError, match=r"q\.jsonl:2: invalid JSON \(Expecting value, column 23\)$"):
        read_queries(queries)
    queries.write_bytes(b'{"id": "q",\r"prompt": "a", "completion": "b"}\r\n')
    assert [q.id for q in read_queries(queries)] == ["q"]


def test_a_run_or_query_resumed_with_its_paths_spelled_otherwise_is_not_refused(
    world, finished, indexed, tmp_path, capsys, monkeypatch
):
    """The eleventh pass: a finished run resumed with its model named by a relative path (or with a trailing slash),
    or a query's output resumed with its run named ``idx`` where it was ``/abs/idx``, was refused ("these keys would
    change results already saved: model.checkpoint", "factors.from, index.from") and offered --overwrite, which
    discards every result. Paths compare by what they name, from the directory each was given in."""
    import shutil

    run = shutil.copytree(finished, tmp_path / "run")
    before = {p: p.stat().st_ino for p in sorted(run.rglob("*")) if p.suffix == ".npy"}
    monkeypatch.chdir(world["model"].parent)
    settings = {"data.batch_size": 8, "factors.fisher": "empirical", "model.checkpoint": "./model/"}
    assert cli.main(["-q", "run", *overrides(world, run, **settings)]) == 0
    assert {p: p.stat().st_ino for p in sorted(run.rglob("*")) if p.suffix == ".npy"} == before  # nothing redone
    idx, _ = indexed
    out = tmp_path / "q"
    assert cli.main(["-q", "query", str(idx), str(world["queries"]), "--out", str(out)]) == 0
    scores = (out / "scores.npy").stat().st_ino
    monkeypatch.chdir(idx.parent)
    assert cli.main(["-q", "query", f"./{idx.name}/", str(world["queries"]), "--out", str(out)]) == 0
    assert (out / "scores.npy").stat().st_ino == scores
    # the same content under another path, and other content: test_inputs_under_another_path_are_compared_by_content


def test_plan_corpus_refuses_a_corpus_the_run_refuses(world, tmp_path, capsys):
    """The eleventh pass: ``jaxinf plan --corpus`` on an empty corpus planned "0 documents, 0 rows" and timed "the
    corpus's 0 token slots ... as 1 rows of 48 tokens", where ``jaxinf run`` refuses the corpus in one line. The plan
    reads the corpus with the run's reader and makes the run's check."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"id": "a", "text": "   "}\n')
    argv = ["-q", "plan", f"model.checkpoint={world['model']}", f"data.documents={docs}", "data.max_length=48"]
    assert cli.main([*argv, "--no-compile", "--corpus"]) == 2
    assert _one_error(capsys, "plan", alone=True) == (
        f"no documents with at least 2 tokens in {docs} (0 documents kept; stage covariance)"
    )


def test_a_query_with_kfac_against_an_ekfac_index_is_scored_as_documented(world, indexed, tmp_path, capsys):
    """The eleventh pass: docs/method.md says one index answers K-FAC (``factors.strategy=kfac``) as well as EK-FAC,
    and ``jaxinf query --help`` offers ``factors.strategy=kfac``, but the query was refused ("factors.strategy: a query
    is scored with the model and curvature of its run, fitted with other values of these"): an EK-FAC fit holds K-FAC's
    eigenvalue products (:func:`jaxinf.run.factors_from.holds`). Its certified top documents are those, with the
    scores, of an exact K-FAC pass on the same curvature; EK-FAC from a K-FAC fit is still refused."""
    run, argv = indexed
    out = tmp_path / "q"
    assert cli.main(["-q", "query", str(run), str(world["queries"]), "--out", str(out), "factors.strategy=kfac"]) == 0
    exact = tmp_path / "exact"
    settings = [f"run.out={exact}", f"factors.from={run}", "factors.strategy=kfac", "index.k=null"]
    assert cli.main(["-q", "run", *argv, *settings]) == 0

    def top(root):
        return [
            (t["query"], [(d["id"], d["score"]) for d in t["top"]]) for t in map(json.loads, open(root / "topk.jsonl"))
        ]

    assert [[i for i, _ in docs] for _, docs in top(out)] == [[i for i, _ in docs] for _, docs in top(exact)]
    for (_, ours), (_, theirs) in zip(top(out), top(exact)):
        np.testing.assert_allclose([s for _, s in ours], [s for _, s in theirs], rtol=1e-5)
    capsys.readouterr()
    assert (
        cli.main(
            ["-q", "run", *argv, f"run.out={tmp_path / 'back'}", f"factors.from={exact}", "factors.strategy=ekfac"]
        )
        == 2
    )
    assert _one_error(capsys, "run") == f"factors.from: {exact} was fitted with other settings: factors.strategy"


def test_a_run_with_relative_paths_is_queried_and_exported_from_another_directory(world, tmp_path, capsys, monkeypatch):
    """The eleventh pass: ``jaxinf query RUN Q`` from another directory than the run's, on a run started with
    relative paths (``model.checkpoint=model``), failed with "model.checkpoint: model: no such directory": the run's
    paths were read from the query's working directory, though run.json records the one the run was started in
    (``cwd``). Every reader of another run's config reads its paths from there (:func:`jaxinf.run.rundir
    .recorded_config`): the query, ``factors.from`` and ``kronfluence export``."""
    monkeypatch.chdir(world["model"].parent)
    run = tmp_path / "run"
    settings = {"model.checkpoint": "model", "data.documents": "docs.jsonl", "data.queries": "queries.jsonl"}
    argv = overrides(world, run, **{"data.batch_size": 8, "factors.fisher": "empirical", "index.k": 4, **settings})
    assert cli.main(["-q", "run", *argv]) == 0
    monkeypatch.chdir(tmp_path)
    assert cli.main(["-q", "query", str(run), str(world["queries"]), "--out", "q"]) == 0
    # the same tails: the certified documents in the same order, their scores the scoring pass's up to float32 sums
    # over batches of other documents (certification rescores them in batches of its own)
    got, want = ([json.loads(line) for line in open(p)] for p in (tmp_path / "q" / "topk.jsonl", run / "topk.jsonl"))
    for tail in ("top", "bottom"):
        assert [[d["id"] for d in q[tail]] for q in got] == [[d["id"] for d in q[tail]] for q in want]
        for q_got, q_want in zip(got, want):
            np.testing.assert_allclose([d["score"] for d in q_got[tail]], [d["score"] for d in q_want[tail]], rtol=1e-5)
    assert cli.main(["-q", "kronfluence", "export", str(run), "kf"]) == 0
    assert (tmp_path / "kf" / "factor_arguments.json").is_file()
    # the run moved with its inputs, resumed with the same relative paths: the same paths, not a changed key
    import shutil

    moved = shutil.copytree(world["model"].parent, tmp_path / "moved")
    shutil.copytree(run, moved / "run")
    monkeypatch.chdir(moved)

    def results():  # but the token counts' cache (state/plan), keyed by the documents' path: counted again
        return {p: p.stat().st_ino for p in sorted((moved / "run").rglob("*.npy")) if p.parent.name != "plan"}

    before = results()
    assert cli.main(["-q", "run", *argv, "run.out=run"]) == 0
    assert results() == before
    capsys.readouterr()


def test_an_index_array_the_machine_refused_is_one_line_and_the_same_command_resumes(
    world, indexed, tmp_path, capsys, monkeypatch
):
    """The eleventh pass: an index array refused by the machine (a full disk, ``ulimit -f``: EFBIG) was "cannot open
    the index array ([Errno 27] File too large)", exit 2, as if the index were damaged. It is the run's one line for a
    machine limit: the file, what to do, exit 3; the same command then finishes with the scores and index of a run
    never stopped."""
    import errno

    src, argv = indexed
    opened = np.lib.format.open_memmap

    def refused(path, *args, **kwargs):
        if Path(path).name == "cells.npy":
            raise OSError(errno.EFBIG, "File too large")
        return opened(path, *args, **kwargs)

    monkeypatch.setattr(np.lib.format, "open_memmap", refused)
    out = tmp_path / "run"
    assert cli.main(["-q", "run", *argv, f"run.out={out}"]) == 3
    line = _one_error(capsys, "run")
    assert line.startswith(f"{out / 'state' / 'index' / 'cells.npy'}: file too large (over the file-size limit"), line
    assert line.endswith("raise the limit or choose another run.out and run the same command again to resume"), line
    monkeypatch.setattr(np.lib.format, "open_memmap", opened)
    assert cli.main(["-q", "run", *argv, f"run.out={out}"]) == 0
    np.testing.assert_array_equal(np.load(out / "scores.npy"), np.load(src / "scores.npy"))
    np.testing.assert_array_equal(np.load(out / "state/index/cells.npy"), np.load(src / "state/index/cells.npy"))


def test_inputs_under_another_path_are_compared_by_content(world, finished, indexed, tmp_path, capsys):
    """The twelfth pass (a leftover of the eleventh): the same queries (or documents, or model) under another path
    on a rerun of a finished run were refused as a changed key, and the hint offered --overwrite, which discards the
    curvature. The model, documents and queries are compared by content, as factors.from compares them: the same
    content goes on and recomputes nothing; other content under another path is refused with the run as it was,
    naming the curvature (or the index) it can reuse instead of --overwrite."""
    import shutil

    run = shutil.copytree(finished, tmp_path / "run")
    settings = {"data.batch_size": 8, "factors.fisher": "empirical"}
    inodes = {p: p.stat().st_ino for p in sorted(run.rglob("*")) if p.suffix == ".npy"}
    moved = {
        "data.queries": shutil.copy(world["queries"], tmp_path / "q.jsonl"),
        "data.documents": shutil.copy(world["docs"], tmp_path / "d.jsonl"),
        "model.checkpoint": shutil.copytree(world["model"], tmp_path / "m"),
    }
    assert cli.main(["-q", "run", *overrides(world, run, **settings, **moved)]) == 0
    assert {p: p.stat().st_ino for p in sorted(run.rglob("*")) if p.suffix == ".npy"} == inodes  # nothing redone
    capsys.readouterr()

    def kept():  # but the token counts' cache (state/plan), keyed by content: counted for the documents given
        return {p: b for p, b in _tree(run).items() if p.parent != run / "state" / "plan"}

    before = kept()
    lines = Path(world["queries"]).read_text().splitlines()
    (tmp_path / "q1.jsonl").write_text(lines[0] + "\n")
    assert cli.main(["-q", "run", *overrides(world, run, **settings, **{"data.queries": tmp_path / "q1.jsonl"})]) == 2
    error = _one_error(capsys, "run")
    assert error == (
        f"data.queries: {tmp_path / 'q1.jsonl'} holds other queries than {moved['data.queries']}, which this run's "
        f"saved results answer; factors.from={run} with another run.out reuses this run's curvature to score them"
    )
    assert kept() == before
    docs = Path(world["docs"]).read_text().splitlines()
    last = json.loads(docs[-1])
    (tmp_path / "d1.jsonl").write_text("\n".join([*docs[:-1], json.dumps({**last, "text": last["text"] + " x"})]))
    assert cli.main(["-q", "run", *overrides(world, run, **settings, **{"data.documents": tmp_path / "d1.jsonl"})]) == 2
    error = _one_error(capsys, "run")
    assert error.startswith(
        f"data.documents: {tmp_path / 'd1.jsonl'} holds other documents than {moved['data.documents']}"
    )
    assert f"factors.from={run} with another run.out" in error and "--overwrite" not in error
    assert kept() == before
    other = shutil.copytree(world["model"], tmp_path / "m1")
    with open(other / "config.json", "a") as f:
        f.write("\n")  # the same settings, other bytes
    assert cli.main(["-q", "run", *overrides(world, run, **settings, **{"model.checkpoint": other})]) == 2
    assert _one_error(capsys, "run") == (
        f"model.checkpoint: {other} is not the model this run was computed with (that of {moved['model.checkpoint']}: "
        "config.json differs; every stage depends on it); give that model (a copy is accepted), or another run.out "
        "for this one"
    )
    assert kept() == before
    idx, argv = indexed  # a run with an index offers jaxinf query
    copy = shutil.copytree(idx, tmp_path / "idx")
    argv = [a for a in argv if not a.startswith(("run.out=", "data.queries="))]
    assert cli.main(["-q", "run", *argv, f"run.out={copy}", f"data.queries={tmp_path / 'q1.jsonl'}"]) == 2
    assert f"jaxinf query {copy} {tmp_path / 'q1.jsonl'} --out DIR scores them from its index" in _one_error(
        capsys, "run"
    )


@pytest.mark.parametrize(
    "argv, command, message",
    [
        (["plan", "c.yaml", "--mesh", "-1x2"], "plan", "--mesh '-1x2': both sizes must be at least 1, e.g. 8x8"),
        (["plan", "c.yaml", "--mesh", "-1"], "plan", "--mesh '-1': expected DATAxMODEL, e.g. 8x8"),
        (["plan", "c.yaml", "--mesh"], "plan", "argument --mesh: expected one argument (see jaxinf plan --help)"),
        (
            ["plan", "c.yaml", "--chip", "tpu"],
            "plan",
            "argument --chip: invalid choice: 'tpu' (choose from 'h100', 'h200', 'a100', 'v5e', 'v5p', 'v6e') "
            "(see jaxinf plan --help)",
        ),
        (["demo", "--seeds", "x"], "demo", "argument --seeds: invalid int value: 'x' (see jaxinf demo --help)"),
        (["run", "c.yaml", "--bogus"], "run", "unrecognized arguments: --bogus (see jaxinf run --help)"),
        (
            ["kronfluence", "export", "r"],
            "kronfluence export",
            "the following arguments are required: OUT_DIR (see jaxinf kronfluence export --help)",
        ),
    ],
)
def test_an_argument_the_parser_refuses_is_one_line_with_status_2(
    tmp_path, capsys, monkeypatch, argv, command, message
):
    """The twelfth pass: ``jaxinf plan CONFIG --mesh -1x2`` printed argparse's usage block and "argument --mesh:
    expected one argument" (a value starting with '-' taken for an option), and every other refusal of the parser
    (an unknown option or choice, a value of another type) printed the usage and raised SystemExit from inside
    main. Each is now the one line of every other refusal, with status 2; a value starting with '-' reaches the
    option's own check."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("{}\n")
    assert cli.main(argv) == 2
    assert _one_error(capsys, command, alone=True) == message
    assert sorted(tmp_path.iterdir()) == [tmp_path / "c.yaml"]


@pytest.mark.parametrize(
    "path, named",
    [
        (
            "/r/state/covariance/1.orbax-checkpoint-tmp/default.orbax-checkpoint-tmp/ocdbt.process_0/d/ef13",
            "/r/state/covariance/1",
        ),
        ("/r/state/lambda/4.orbax-checkpoint-tmp-1733/default", "/r/state/lambda/4"),
        ("/r/state/scores/2/default.partial_save.orbax-checkpoint-tmp-5/x", "/r/state/scores/2/default"),
        ("/r/scores.npy.tmp", "/r/scores.npy.tmp"),
    ],
)
def test_a_refused_write_inside_an_orbax_checkpoint_names_the_checkpoint(tmp_path, path, named):
    """The twelfth pass (a leftover of the eleventh): a file-size limit or a full disk met while Orbax wrote a
    checkpoint named the file in Orbax's temporary directory (``1.orbax-checkpoint-tmp/default.orbax-checkpoint-tmp/
    ocdbt.process_0/d/ef13...``), removed by the time the message is read; it names the checkpoint it was going to be,
    from the error's file name and from a library's message alike."""
    import errno

    from jaxinf.run import failures

    assert failures.find_condition(OSError(errno.EFBIG, "File too large", path)) == (errno.EFBIG, named)
    wrapped = RuntimeError(f"ocdbt write failed: No space left on device [path='{path}']")
    assert failures.find_condition(wrapped, "/r") == (errno.ENOSPC, named)


def test_a_full_disk_met_by_prepares_record_writer_names_the_output(world, tmp_path, capsys, monkeypatch):
    """The twelfth pass, ``jaxinf prepare DOCS OUT`` on a full disk (a 100 KiB tmpfs): array_record's writer fails
    with an error that names the file only in its text, and the one line named it in the temporary directory the
    dataset is built in (``.OUT.prepare-4zre3m88/data/jaxinf_documents/1.0.0/.records-0``), gone by the time it is
    read. It names the file where it was going in OUT, as for an ``OSError``; nothing is left behind."""
    from array_record.python import array_record_module

    class Full:
        def __init__(self, path, options):
            self.path = path

        def write(self, record):
            raise ValueError(f"RESOURCE_EXHAUSTED: {self.path}: No space left on device")

        def close(self):
            pass

    monkeypatch.setattr(array_record_module, "ArrayRecordWriter", Full)
    out = tmp_path / "ds"
    assert cli.main(["-q", "prepare", str(world["docs"]), str(out)]) == 3
    error = _one_error(capsys, "prepare")
    assert error.startswith(f"{out}/") and error.endswith(
        "/.records-0: no space left on device; free some space and run the same command again"
    ), error
    assert ".prepare-" not in error
    assert sorted(tmp_path.iterdir()) == []


def test_plan_json_refused_by_the_machine_names_it_and_leaves_no_empty_file(world, tmp_path):
    """The twelfth pass: ``jaxinf plan CONFIG --json FILE`` on a full disk (a tmpfs filled up; here a file-size limit
    of zero, the same refusal) said "a write: no space left on device", naming no file, and left an empty FILE
    (Path.write_text opens, truncates, then fails to write). It is written as every other output is
    (atomic.write_atomic): the line names FILE, and no FILE is left."""
    import subprocess
    import sys

    from pipeline_support import env

    out = tmp_path / "plan.json"
    environment = env(tmp_path / "xla")
    environment.pop("JAX_COMPILATION_CACHE_DIR")
    environment["JAXINF_COMPILATION_CACHE"] = ""  # no cache entry meets the limit
    argv = ["plan", f"model.checkpoint={world['model']}", "data.max_length=64", "--no-compile", "--json", str(out)]
    limited = ["bash", "-c", 'ulimit -f 0 && exec "$@"', "-", sys.executable, "-m", "jaxinf", *argv]
    r = subprocess.run(limited, capture_output=True, text=True, env=environment, cwd=tmp_path)
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("jaxinf plan: error: ")]
    assert len(lines) == 1 and lines[0].startswith(f"jaxinf plan: error: {out}: file too large"), r.stderr
    assert [p.name for p in tmp_path.iterdir() if "plan" in p.name] == []  # nor its temporary file


def test_other_queries_under_another_path_go_on_when_nothing_saved_depends_on_them(world, tmp_path, monkeypatch):
    """A run stopped in its Lambda pass, resumed with other queries under another path, goes on: no saved result
    depends on the queries yet (compared by content, as test_inputs_under_another_path_are_compared_by_content
    shows; the refusal is only for results that the other queries would discard), and its exports are the new
    queries'."""
    out = tmp_path / "run"
    settings = {"data.batch_size": 4, "factors.fisher": "empirical"}
    monkeypatch.setenv("JAXINF_FAULT", "lambda:1:raise")
    with pytest.raises(RuntimeError, match="fault injected at lambda:1"):
        cli.main(["-q", "run", *overrides(world, out, **settings)])
    monkeypatch.delenv("JAXINF_FAULT")
    lines = Path(world["queries"]).read_text().splitlines()
    (tmp_path / "q1.jsonl").write_text(lines[1] + "\n")
    assert cli.main(["-q", "run", *overrides(world, out, **settings, **{"data.queries": tmp_path / "q1.jsonl"})]) == 0
    exported = [json.loads(line)["id"] for line in (out / "queries.jsonl").read_text().splitlines()]
    assert exported == [json.loads(lines[1])["id"]]


def test_a_query_against_a_run_whose_model_was_edited_in_place_says_so(world, tmp_path, capsys):
    """The twelfth pass: ``jaxinf query RUN Q`` after RUN's weights were edited in place said "model.checkpoint (the
    model in M is not what RUN read from M): a query is scored with the model and curvature of its run RUN, fitted
    with other values of these; leave them out", though the user gave no model.checkpoint to leave out (and
    ``factors.from=RUN`` called it "fitted with other settings"). The same directory edited since is said as such,
    with what to do: restore it, or fit RUN again."""
    import shutil

    from safetensors.numpy import load_file, save_file

    model = shutil.copytree(world["model"], tmp_path / "model")
    run = tmp_path / "run"
    settings = {"data.batch_size": 8, "factors.fisher": "empirical", "index.k": 2, "model.checkpoint": model}
    assert cli.main(["-q", "run", *overrides(world, run, **settings)]) == 0
    weights = load_file(model / "model.safetensors")
    name = sorted(weights)[0]
    save_file({**weights, name: weights[name] * 2}, model / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    message = (
        f"{model}: the model changed since {run} read it (its curvature was fitted with the model as it was); "
        f"restore it, or fit {run} again (jaxinf run --overwrite)"
    )
    assert cli.main(["-q", "query", str(run), str(world["queries"]), "--out", str(tmp_path / "q")]) == 2
    assert _one_error(capsys, "query") == message
    del settings["index.k"]
    assert cli.main(["-q", "run", *overrides(world, tmp_path / "r", **settings, **{"factors.from": run})]) == 2
    assert _one_error(capsys, "run") == message
    assert not (tmp_path / "q").exists() and not (tmp_path / "r").exists()
