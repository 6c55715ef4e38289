"""``jaxinf run`` against a hostile world, through the command line: inputs changed in place, a second process,
``--overwrite``, bad values, a full disk, a read-only directory, a damaged ``run.json``.

One finished run (12 documents in one batch, 2 queries, a tiny model: few compiled shapes) is made once; each
test works on a copy of it (model, data and run directory side by side, named by relative paths, so a copy
resumes like the original).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pipeline_support import REPO, env, jaxinf, make_world

SETTINGS = {
    "model.checkpoint": "model",
    "data.documents": "docs.jsonl",
    "data.queries": "queries.jsonl",
    "data.max_length": 48,
    "data.batch_size": 12,
    "factors.save_every": 2,
    "scores.save_every": 2,
    "scores.topk": 3,
    "factors.fisher": "empirical",
    "factors.max_documents": 8,
    "run.out": "run",
}
ALL_STAGES = "covariance, eigen, lambda, queries, scores, exports, analysis"


def args(*flags: str, **extra) -> list[str]:
    settings = {**SETTINGS, **{k.replace("__", "."): v for k, v in extra.items()}}
    return ["run", *flags, *(f"{k}={v}" for k, v in settings.items())]


def umask_022():
    os.umask(0o022)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished run in ``BASE/run`` of the world in ``BASE`` (model/, docs.jsonl, queries.jsonl)."""
    root = tmp_path_factory.mktemp("reliability")
    make_world(root, n_documents=12, n_queries=2)
    e = env(tmp_path_factory.mktemp("xla-cache"))
    r = jaxinf(args(), e, cwd=root, preexec_fn=umask_022)
    assert r.returncode == 0, r.stderr[-3000:]
    return {"root": root, "env": e}


def clone(base: dict, dest: Path, run: bool = True) -> Path:
    shutil.copytree(base["root"], dest, symlinks=True, ignore=None if run else shutil.ignore_patterns("run"))
    return dest


def error_line(r: subprocess.CompletedProcess) -> str:
    """The one error line of a failed command (and no traceback)."""
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("jaxinf run: error: ")]
    assert len(lines) == 1, r.stderr[-3000:]
    return lines[0][len("jaxinf run: error: ") :]


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines()


def snapshot(run: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(run)): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name != ".jaxinf.lock"
    }


def ran(stage: str, stderr: str) -> bool:
    """Whether the run computed batches of ``stage`` (not just resumed a finished one)."""
    return re.search(rf"^jaxinf: {stage}: [1-9]\d* batches in", stderr, re.M) is not None


def ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in lines_of(path)]


def assert_same_scores_by_id(new: Path, old: Path) -> None:
    """Scores of the same (query, document) pairs agree, whatever order the files now list them in."""
    qn, qo = ids(new / "queries.jsonl"), ids(old / "queries.jsonl")
    dn, do = ids(new / "documents.jsonl"), ids(old / "documents.jsonl")
    assert sorted(qn) == sorted(qo) and sorted(dn) == sorted(do)
    a, b = np.load(new / "scores.npy"), np.load(old / "scores.npy")
    reordered = b[[qo.index(q) for q in qn]][:, [do.index(d) for d in dn]]
    np.testing.assert_allclose(a, reordered, rtol=1e-5, atol=1e-6 * np.abs(b).max())
    top_new = {json.loads(t)["query"]: [d["id"] for d in json.loads(t)["top"]] for t in lines_of(new / "topk.jsonl")}
    top_old = {json.loads(t)["query"]: [d["id"] for d in json.loads(t)["top"]] for t in lines_of(old / "topk.jsonl")}
    assert top_new == top_old


def test_exports_have_the_usual_permissions(base):
    """Under umask 022 every exported file is 0644 and every directory 0755 (temporary files are 0600)."""
    run = base["root"] / "run"
    exported = [p for p in run.rglob("*") if "state" not in p.relative_to(run).parts[:1]] + [run / "state/run.json"]
    assert any(p.name == "scores.npy" for p in exported) and any(p.name == "index.html" for p in exported)
    modes = {str(p.relative_to(run)): oct(p.stat().st_mode & 0o777) for p in exported}
    assert modes == {k: ("0o755" if (run / k).is_dir() else "0o644") for k in modes}


def _wait_stopped(proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the first run ended ({proc.returncode}) before its stop point"
        state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "T":
            return
        time.sleep(0.2)
    raise AssertionError("the first run did not reach its stop point")


def test_edited_inputs_are_recomputed_and_a_second_process_is_locked_out(base, tmp_path):
    """Documents after the fitted ones and the queries edited in place (order reversed): the first resume
    recomputes query gradients and scores, keeping the curvature; while it holds the run directory a second
    `jaxinf run` (with another damping) exits 2 at once naming it; once the first is killed its lock is no
    obstacle, and the finished run labels every score with the right query and document."""
    d = clone(base, tmp_path / "w")
    docs = lines_of(d / "docs.jsonl")
    (d / "docs.jsonl").write_text("\n".join(docs[:8] + docs[8:][::-1]) + "\n")
    (d / "queries.jsonl").write_text("\n".join(lines_of(d / "queries.jsonl")[::-1]) + "\n")
    record = (d / "run" / "run.json").read_bytes()
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(
            [sys.executable, "-m", "jaxinf", *args()],
            cwd=d,
            stderr=log,
            stdout=log,
            env={**base["env"], "JAXINF_FAULT": "scores:1:stop"},
        )
    try:
        _wait_stopped(first)
        second = jaxinf(args(scores__damping=0.5), base["env"], cwd=d)
        assert second.returncode == 2
        assert error_line(second) == (
            f"run: in use by another jaxinf process (host {socket.gethostname()} pid "
            f"{first.pid}); wait for it to finish or stop it, or choose another run.out"
        )
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    log = (tmp_path / "first.log").read_text()
    assert (
        "docs.jsonl: the documents changed since this run started; recomputing queries, scores, exports, analysis"
        in log
        and "queries.jsonl: the queries changed since this run started" in log
    ), log[-3000:]
    assert json.loads((d / "run" / "run.json").read_text())["config"]["scores"]["damping"] is None
    assert record != (d / "run" / "run.json").read_bytes()  # the first run recorded the new fingerprints
    third = jaxinf(args(), base["env"], cwd=d)
    assert third.returncode == 0, third.stderr[-3000:]
    assert not ran("covariance", third.stderr) and not ran("lambda", third.stderr) and ran("scores", third.stderr)
    assert ids(d / "run" / "documents.jsonl")[8:] == [json.loads(line)["id"] for line in docs[8:][::-1]]
    assert_same_scores_by_id(d / "run", base["root"] / "run")


def test_edited_fitted_documents_recompute_every_stage_and_drop_old_exports(base, tmp_path):
    d = clone(base, tmp_path / "w")
    docs = lines_of(d / "docs.jsonl")
    first = json.loads(docs[0])
    docs[0] = json.dumps({**first, "text": first["text"] + " again"})
    (d / "docs.jsonl").write_text("\n".join(docs) + "\n")
    r = jaxinf(args(), {**base["env"], "JAXINF_FAULT": "covariance:1"}, cwd=d)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert (
        "docs.jsonl: the first 8 documents (those the curvature is fitted on) changed since this run started; "
        f"recomputing {ALL_STAGES}"
    ) in r.stderr
    run = d / "run"
    assert not (run / "scores.npy").exists() and not (run / "topk.jsonl").exists() and not (run / "report").exists()
    assert not (run / "state" / "eigen").exists() and not (run / "state" / "scores").exists()
    stages = json.loads((run / "run.json").read_text())["stages"]
    assert stages["covariance"]["status"] == "running" and stages["scores"]["status"] == "pending"


def test_a_changed_model_or_tokenizer_is_refused(base, tmp_path):
    from safetensors.numpy import load_file, save_file

    d = clone(base, tmp_path / "w")
    before = snapshot(d / "run")
    weights = load_file(d / "model" / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] * np.float32(1.5)
    save_file(weights, d / "model" / "model.safetensors", metadata={"format": "np"})
    r = jaxinf(args(), base["env"], cwd=d)
    assert r.returncode == 2
    assert re.fullmatch(
        r"model/model\.safetensors: changed since this run started \(stage covariance onwards was "
        r"computed with the model as it was; every stage depends on it\); restore it, or start over "
        r"with --overwrite or another run\.out",
        error_line(r),
    )
    shutil.copy(base["root"] / "model" / "model.safetensors", d / "model" / "model.safetensors")  # back as it was
    tokenizer = json.loads((d / "model" / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"] = dict(reversed(list(tokenizer["model"]["vocab"].items())))  # same words, other file
    (d / "model" / "tokenizer.json").write_text(json.dumps(tokenizer))
    r = jaxinf(args(), base["env"], cwd=d)
    assert r.returncode == 2
    assert error_line(r).startswith("model/tokenizer.json: changed since this run started")
    assert snapshot(d / "run") == before


def test_overwrite_keeps_the_old_run_until_the_new_one_has_finished(base, tmp_path):
    d = clone(base, tmp_path / "w")
    run = d / "run"
    before = snapshot(run)
    good = (d / "docs.jsonl").read_text()
    (d / "docs.jsonl").write_text(good.replace('"text"', '"text":', 1))  # line 1 is no longer JSON
    r = jaxinf(args("--overwrite"), base["env"], cwd=d)
    assert r.returncode == 2 and error_line(r).startswith("docs.jsonl:1: invalid JSON")
    assert snapshot(run) == before and not (run / ".jaxinf-previous").exists()
    (d / "docs.jsonl").write_text(good)
    # killed after the new run finished but before the old one was deleted: the next start puts the old one back
    r = jaxinf(args("--overwrite", scores__damping=0.5), {**base["env"], "JAXINF_FAULT": "overwrite:0"}, cwd=d)
    assert r.returncode == -signal.SIGKILL and (run / ".jaxinf-previous" / "scores.npy").exists()
    r = jaxinf(args(scores__damping=0.5), base["env"], cwd=d)
    assert (
        r.returncode == 2
        and "an --overwrite was interrupted before the new run finished; the previous run is restored" in r.stderr
    )
    assert error_line(r).endswith(
        "these keys would change results already saved: scores.damping "
        "(use --overwrite to start over, or another run.out; factors.from=run with another "
        "run.out keeps its fitted curvature)"
    )
    assert snapshot(run) == before
    # killed half-way through the new run (it had started cleanly): the old run waits aside until the next start
    r = jaxinf(args("--overwrite", scores__damping=0.5), {**base["env"], "JAXINF_FAULT": "covariance:1"}, cwd=d)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert (run / ".jaxinf-previous" / "scores.npy").read_bytes() == before["scores.npy"]
    record = json.loads((run / "run.json").read_text())
    assert record["config"]["scores"]["damping"] == 0.5 and record["stages"]["covariance"]["status"] == "running"
    # the same command again: the old run is put back first, then set aside again, and deleted once this one finished
    r = jaxinf(args("--overwrite", scores__damping=0.5), base["env"], cwd=d)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "an --overwrite was interrupted before the new run finished; the previous run is restored" in r.stderr
    assert not (run / ".jaxinf-previous").exists() and not (run / ".jaxinf-discarded").exists()
    assert json.loads((run / "run.json").read_text())["config"]["scores"]["damping"] == 0.5
    assert (run / "scores.npy").read_bytes() != before["scores.npy"]


@pytest.mark.parametrize(
    "fault, code",
    [
        ("scores:1:raise", 1),  # an exception the run did not foresee, in the scores stage
        ("exports:1:interrupt", 130),  # Ctrl-C during the exports (half of them written)
        ("overwrite:0:raise", 1),  # everything written, the old run not yet deleted
    ],
)
def test_a_failed_overwrite_puts_the_finished_run_back(base, tmp_path, fault, code):
    """Issue 25, case 1: whatever stops an --overwrite before the new run has finished, the finished run comes back
    byte for byte (scores.npy, the exports, the report, state/) and nothing of the new attempt is kept."""
    d = clone(base, tmp_path / "w")
    before = snapshot(d / "run")
    r = jaxinf(args("--overwrite", scores__damping=0.5), {**base["env"], "JAXINF_FAULT": fault}, cwd=d)
    assert r.returncode == code, r.stderr[-3000:]
    assert ran("covariance", r.stderr)  # the new run had got well past its start
    assert re.search(
        r"^jaxinf: \S+: --overwrite did not finish \((RuntimeError|KeyboardInterrupt)\); the previous run "
        r"is back as it was and the new attempt is removed",
        r.stderr,
        re.M,
    ), r.stderr[-3000:]
    assert snapshot(d / "run") == before
    assert sorted(p.name for p in (d / "run").iterdir()) == sorted({k.split("/")[0] for k in before} | {".jaxinf.lock"})


def test_an_overwrite_meeting_a_non_finite_value_in_a_later_stage_puts_the_run_back(base, tmp_path):
    """Issue 25, cases 1 and 5: an --overwrite with weights whose logits overflow (the identity strategy fits nothing,
    so the queries stage is the first to meet them) stops there in one line, and the finished run is back."""
    d = clone(base, tmp_path / "w")
    before = snapshot(d / "run")
    _scaled_lm_head(d, 1e37)
    r = jaxinf(args("--overwrite", factors__strategy="identity"), base["env"], cwd=d)
    assert r.returncode == 2
    assert re.fullmatch(
        r'queries\.jsonl:1: query "[^"]+": its preconditioned gradient of layer \S+ is not finite '
        r"\(the model model overflows float32 on it\)",
        error_line(r),
    ), error_line(r)
    assert "the previous run is back as it was" in r.stderr
    assert snapshot(d / "run") == before


@pytest.mark.parametrize("flags", [(), ("--overwrite",)])
def test_a_directory_that_is_not_a_run_is_never_written(base, tmp_path, flags):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    r = jaxinf(args(*flags, run__out=other), base["env"], cwd=base["root"])
    assert r.returncode == 2
    line = error_line(r)
    verb = "will not be overwritten: it" if flags else "exists and"
    assert (
        line == f"{other}: {verb} is not a jaxinf run directory (no run.json; it holds notes.txt); choose "
        "another run.out"
    )
    assert "--overwrite" not in line and sorted(p.name for p in other.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            {"scores__damping": "inf"},
            "command line: scores.damping: must be a finite number at least 0 (or null), got inf",
        ),
        (
            {"scores__damping": "nan"},
            "command line: scores.damping: must be a finite number at least 0 (or null), got nan",
        ),
        (
            {"data__max_length": 100},
            "data.max_length=100 is above the model's max_position_embeddings=64 (model/config.json)",
        ),
    ],
)
def test_bad_values_are_refused_before_anything_is_written(base, tmp_path, extra, message):
    r = jaxinf(args(run__out=tmp_path / "fresh", **extra), base["env"], cwd=base["root"])
    assert r.returncode == 2 and error_line(r) == message
    assert not (tmp_path / "fresh").exists()


def test_query_rank_above_a_layer_is_logged_as_full_rank(base, tmp_path):
    r = jaxinf(
        args(run__out=tmp_path / "fresh", scores__query_rank=40),
        {**base["env"], "JAXINF_FAULT": "covariance:1"},
        cwd=base["root"],
    )
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    logged = re.findall(
        r"scores\.query_rank=40 is not below the smaller dimension of (\S+) \((\d+) x (\d+)\): full "
        r"rank for that layer",
        r.stderr,
    )
    assert sorted(n for n, _, _ in logged) == [f"model.layers.*.mlp.{p}_proj" for p in ("down", "gate", "up")]
    assert all(min(int(a), int(b)) == 32 for _, a, b in logged)


@pytest.mark.parametrize("content", ["", '{"id": "a", "text": ""}\n{"id": "b", "text": "  "}\n'])
def test_an_empty_corpus_is_named_before_the_covariance_pass(base, tmp_path, content):
    d = clone(base, tmp_path / "w", run=False)
    (d / "docs.jsonl").write_text(content)
    r = jaxinf(args(), base["env"], cwd=d)
    assert r.returncode == 2
    assert error_line(r).startswith(
        "no documents with at least 2 tokens in docs.jsonl (0 documents kept; stage covariance)"
    )
    assert not (d / "run" / "state" / "covariance").exists()


def test_a_tokenizer_that_yields_no_token_pair_is_named():
    """Documents kept but each tokenized to fewer than 2 tokens: the tokenizer file is named beside the documents."""
    import numpy as np

    from jaxinf.run import preflight

    with pytest.raises(preflight.PreflightError) as e:
        preflight.check_corpus(np.array([1, 0, 1]), "docs.jsonl", None, "model/tokenizer.json")
    assert str(e.value) == (
        "no documents with at least 2 tokens in docs.jsonl with the tokenizer model/tokenizer.json "
        "(3 documents kept; stage covariance)"
    )
    preflight.check_corpus(np.array([1, 2]), "docs.jsonl", None, "model/tokenizer.json")  # one is enough


def test_a_non_finite_weight_is_named_when_the_model_is_loaded(base, tmp_path):
    from safetensors.numpy import load_file, save_file

    d = clone(base, tmp_path / "w", run=False)
    weights = load_file(d / "model" / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"][3, 5] = np.nan
    save_file(weights, d / "model" / "model.safetensors", metadata={"format": "np"})
    r = jaxinf(args(), base["env"], cwd=d)
    assert r.returncode == 2
    assert error_line(r) == (
        "model/model.safetensors: tensor model.layers.1.mlp.down_proj.weight has 1 non-finite "
        "value(s) (NaN or infinity); stage: loading the model"
    )


def _mount_namespace(tmp_path: Path) -> list[str]:
    """The command prefix for a private mount namespace in which tmpfs can be mounted, or skip saying why."""
    probe = tmp_path / "probe"
    probe.mkdir()
    why = "unshare is not installed"
    if shutil.which("unshare"):
        for prefix in (["unshare", "-m"], ["unshare", "-rm"]):
            r = subprocess.run(
                [*prefix, "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"], capture_output=True, text=True
            )
            if r.returncode == 0:
                return prefix
            why = f"{' '.join(prefix)} cannot mount a tmpfs here ({r.stderr.strip()[:200]})"
    pytest.skip(why)


def test_a_full_disk_is_one_line_and_the_next_run_resumes(base, tmp_path):
    """The run on a tmpfs with 64 KiB to spare after the later documents were edited (scores to recompute): it
    stops at the first save that does not fit, with exit 3 and one line naming the path and stage; with more
    space the same command finishes from what was kept (curvature and query gradients are not recomputed)."""
    prefix = _mount_namespace(tmp_path)
    d = clone(base, tmp_path / "w")
    docs = lines_of(d / "docs.jsonl")
    (d / "docs.jsonl").write_text("\n".join(docs[:8] + docs[8:][::-1]) + "\n")
    for name in ("state/scores", "report", "scores.npy", "topk_tokens.jsonl", "summary.json"):  # what the edit
        path = d / "run" / name  # invalidates, deleted first so the run cannot free that space
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    (d / "disk").mkdir()
    (d / "saved").mkdir()
    command = " ".join(f"'{a}'" for a in ["python", "-m", "jaxinf", *args(run__out="disk/run")])
    script = (
        "mount -t tmpfs -o size=4m tmpfs disk && cp -a run disk/run && used=$(du -sk disk | cut -f1) && "
        "mount -o remount,size=$((used + 64))k disk || exit 1; "
        f"{command} 2> first.log; echo $? > first.rc; ls -R disk/run > kept.txt; "
        f"mount -o remount,size=16m disk && {command} 2> second.log; echo $? > second.rc; cp -r disk/run/. saved/"
    )
    environment = {**base["env"], "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run([*prefix, "bash", "-c", script], cwd=d, env=environment, check=True, timeout=600)
    first = subprocess.CompletedProcess([], int((d / "first.rc").read_text()), "", (d / "first.log").read_text())
    assert first.returncode == 3, first.stderr[-3000:]
    m = re.fullmatch(
        r"(\S+): no space left on device \(stage (\w+)\); everything finished is kept in disk/run; "
        r"free some space and run the same command again to resume",
        error_line(first),
    )
    assert m and m.group(2) in ("scores", "exports", "analysis") and "disk/run" in m.group(1), error_line(first)
    assert "lambda" in (d / "kept.txt").read_text() and "queries" in (d / "kept.txt").read_text()
    second = (d / "second.log").read_text()
    assert (d / "second.rc").read_text().strip() == "0", second[-3000:]
    assert not ran("covariance", second) and not ran("lambda", second)
    assert "query gradients in" not in second
    assert_same_scores_by_id(d / "saved", base["root"] / "run")


def test_an_overwrite_on_a_full_disk_puts_the_run_back(base, tmp_path):
    """Issue 25, case 1: an --overwrite keeps the old run until the new one finishes, so on a disk with 64 KiB to
    spare the new run fails at its first save that does not fit; the one line says the previous run is back, and it
    is, byte for byte, with nothing of the new attempt left."""
    prefix = _mount_namespace(tmp_path)
    d = clone(base, tmp_path / "w")
    (d / "disk").mkdir()
    (d / "saved").mkdir()
    command = " ".join(
        f"'{a}'" for a in ["python", "-m", "jaxinf", *args("--overwrite", run__out="disk/run", scores__damping=0.5)]
    )
    script = (
        "mount -t tmpfs -o size=4m tmpfs disk && cp -a run disk/run && used=$(du -sk disk | cut -f1) && "
        "mount -o remount,size=$((used + 64))k disk || exit 1; "
        f"{command} 2> first.log; echo $? > first.rc; cp -a disk/run/. saved/"
    )
    environment = {**base["env"], "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run([*prefix, "bash", "-c", script], cwd=d, env=environment, check=True, timeout=600)
    first = subprocess.CompletedProcess([], int((d / "first.rc").read_text()), "", (d / "first.log").read_text())
    assert first.returncode == 3, first.stderr[-3000:]
    assert re.fullmatch(
        r"\S+: no space left on device \(stage \w+\); --overwrite did not finish: the previous run is "
        r"back in disk/run as it was and the new attempt is removed; free some space and run the same "
        r"command again to start it over",
        error_line(first),
    ), error_line(first)
    assert snapshot(d / "saved") == snapshot(d / "run")


def test_a_read_only_run_directory_is_one_line(base, tmp_path):
    prefix = _mount_namespace(tmp_path)
    d = clone(base, tmp_path / "w")
    command = " ".join(f"'{a}'" for a in ["python", "-m", "jaxinf", *args()])
    environment = {**base["env"], "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run(
        [*prefix, "bash", "-c", f"mount --bind run run && mount -o remount,bind,ro run && {command}"],
        cwd=d,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 3, r.stderr[-3000:]
    assert (
        error_line(r) == "run: output directory is not writable (read-only file system; stage: start); nothing "
        "was written"
    )


@pytest.mark.skipif(
    os.geteuid() == 0, reason="permissions do not bind for root (the read-only mount test covers the same path)"
)
def test_an_unwritable_run_directory_is_one_line(base, tmp_path):
    d = clone(base, tmp_path / "w")
    (d / "run").chmod(0o555)
    try:
        r = jaxinf(args(), base["env"], cwd=d)
    finally:
        (d / "run").chmod(0o755)
    assert r.returncode == 3
    assert (
        error_line(r) == "run: output directory is not writable (permission denied; stage: start); nothing was written"
    )


def test_a_damaged_run_json_is_restored_or_says_what_overwrite_deletes(base, tmp_path):
    d = clone(base, tmp_path / "w")
    run = d / "run"
    (run / "run.json").write_text('{"config": {"model": ')
    r = jaxinf(args(), base["env"], cwd=d)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "run/run.json: unreadable (" in r.stderr and "restored from its copy run/state/run.json" in r.stderr
    assert not any(ran(s, r.stderr) for s in ("covariance", "lambda", "scores"))
    assert json.loads((run / "run.json").read_text())["stages"]["analysis"]["status"] == "done"
    np.testing.assert_array_equal(np.load(run / "scores.npy"), np.load(base["root"] / "run" / "scores.npy"))
    for path in (run / "run.json", run / "state" / "run.json"):
        path.write_text("[1, 2")
    r = jaxinf(args(), base["env"], cwd=d)
    assert r.returncode == 2
    line = error_line(r)
    assert (
        line.startswith("run/run.json: unreadable (")
        and ", and its copy run/state/run.json is unreadable (not JSON: " in line
    )
    listed = line[line.index("--overwrite would delete everything in run: ") :]
    for entry in sorted(p.name for p in run.iterdir() if not p.name.startswith(".")):
        assert (f"{entry}/ (" if (run / entry).is_dir() else entry) in listed
    total = sum(1 for p in run.rglob("*") if p.is_file() and not p.name.startswith(".jaxinf"))
    assert listed.endswith(
        f"({total} files, {sum(p.stat().st_size for p in run.rglob('*') if p.is_file() and not p.name.startswith('.jaxinf')):,} bytes)"
    )


def test_documented_exit_codes_are_the_programs():
    from jaxinf import cli

    text = (REPO / "docs" / "data.md").read_text()
    section = text[text.index("## Exit codes") :]
    documented = {int(m.group(1)) for m in re.finditer(r"^\| (\d+) \|", section, re.M)}
    assert documented == set(cli.EXIT_CODES)
    assert "exits with status 1" not in text  # jaxinf prepare exits 2 on bad input


# --------------------------------------------------------------------------- issue 25: nothing lost, nothing left


def test_overwrite_refused_by_a_query_longer_than_max_length_keeps_the_finished_run(base, tmp_path):
    """Issue 25, case 1: every query is tokenized and checked against data.max_length at start-up, so a refused
    --overwrite restores the finished run byte for byte instead of failing at the queries stage after deleting it
    (and without computing anything)."""
    d = clone(base, tmp_path / "w")
    before = snapshot(d / "run")
    r = jaxinf(args("--overwrite", data__max_length=8), base["env"], cwd=d)
    assert r.returncode == 2
    assert re.fullmatch(
        r'queries\.jsonl:\d+: query "[^"]+" has \d+ tokens, more than data\.max_length \(8\)', error_line(r)
    ), error_line(r)
    assert not ran("covariance", r.stderr)
    assert snapshot(d / "run") == before and not (d / "run" / ".jaxinf-previous").exists()


@pytest.mark.parametrize("record", ["run.json", "state/run.json"])
def test_a_foreign_run_json_does_not_make_a_run_directory(base, tmp_path, record):
    """Issue 25, case 2: a directory is a jaxinf run by its run.json's marker, not by the file's name: another tool's
    run.json (or state/run.json) is refused with --overwrite, and nothing in it is deleted or added."""
    fake = tmp_path / "fakerun"
    (fake / record).parent.mkdir(parents=True, exist_ok=True)
    (fake / record).write_text('{"results": [1]}\n')
    (fake / "data.csv").write_text("precious\n")
    before = snapshot(fake)
    r = jaxinf(args("--overwrite", run__out=fake), base["env"], cwd=base["root"])
    assert r.returncode == 2
    entries = "data.csv, run.json" if record == "run.json" else "data.csv, state"
    assert error_line(r) == (
        f"{fake}: will not be overwritten: it is not a jaxinf run directory (its run.json is not "
        f"a jaxinf run record; it holds {entries}); choose another run.out"
    )
    assert snapshot(fake) == before and sorted(p.name for p in fake.iterdir()) == sorted(entries.split(", "))
    r = jaxinf(args(factors__from=fake, run__out=tmp_path / "new"), base["env"], cwd=base["root"])
    assert r.returncode == 2 and error_line(r) == (
        f"factors.from: {fake}: not a jaxinf run directory (its run.json is not a jaxinf run record)"
    )
    assert not (tmp_path / "new").exists()


def test_a_run_record_carries_the_marker(base):
    from jaxinf.run import rundir

    record = json.loads((base["root"] / "run" / "run.json").read_text())
    assert record["format"] == rundir.MARKER and rundir.is_record(record)
    legacy = {k: v for k, v in record.items() if k != "format"}  # a run started before the marker
    assert rundir.is_record(legacy) and not rundir.is_record({"results": [1]})
    assert not rundir.is_record({**legacy, "versions": {"numpy": "2"}})


def test_an_input_error_after_the_lock_leaves_nothing_behind(base, tmp_path):
    """Issue 25, case 12: an error found once the run directory was locked (here a corpus whose ids repeat, found
    when it is opened) removes what the start wrote: a new directory is gone, an empty one is empty again."""
    docs = tmp_path / "docs.jsonl"
    text = (base["root"] / "docs.jsonl").read_text()
    docs.write_text(text + text.splitlines()[0] + "\n")
    r = jaxinf(args(run__out=tmp_path / "new", data__documents=docs), base["env"], cwd=base["root"])
    assert r.returncode == 2 and "doc00000" in error_line(r)
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    r = jaxinf(args(run__out=tmp_path / "empty", data__documents=docs), base["env"], cwd=base["root"])
    assert r.returncode == 2 and list((tmp_path / "empty").iterdir()) == []


def test_options_are_accepted_after_overrides(monkeypatch):
    """Issue 25, case 9: `jaxinf run CONFIG --overwrite data.foo=1` parses (the override reaches the config)."""
    from jaxinf import cli, pipeline

    seen = {}
    monkeypatch.setattr(pipeline, "run", lambda config, overwrite: seen.update(config=config, overwrite=overwrite))
    monkeypatch.setattr(cli, "enable_compilation_cache", lambda: None)
    assert cli.main(["-q", "run", "data.max_length=7", "--overwrite", "data.batch_size=3"]) == 0
    assert seen["overwrite"] and seen["config"].data.max_length == 7 and seen["config"].data.batch_size == 3
    assert cli.main(["-q", "run", "--overwrite", "data.max_length=9", "run.out=x"]) == 0
    assert seen["config"].data.max_length == 9 and seen["config"].run.out == "x"


def _one_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"jaxinf {command}: error: ")]
    assert len(lines) == 1, err
    return lines[0][len(f"jaxinf {command}: error: ") :]


@pytest.mark.parametrize("command", ["validate", "demo"])
def test_validate_and_demo_out_follow_the_run_directory_rule(tmp_path, capsys, command):
    """Issue 25, cases 3 and 8: `validate --out` and `demo --out` refuse a jaxinf run directory, a foreign non-empty
    directory and a file, in one line, writing nothing; a directory in use is locked out as a run is."""
    from jaxinf import cli
    from jaxinf.run import rundir
    from jaxinf.run.lock import RunLock, claim_output

    run = tmp_path / "run"
    (run / "report").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"format": rundir.MARKER, "config": {}, "stages": {}}))
    (run / "report" / "index.html").write_text("the run's report")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("a file")
    cases = [
        (run, f"{run}: is a jaxinf run directory (jaxinf run writes it); choose another --out"),
        (
            foreign,
            f"{foreign}: exists and is not a jaxinf {command} directory (it holds notes.txt); choose another --out",
        ),
        (tmp_path / "file", f"{tmp_path / 'file'}: exists and is not a directory; choose another --out"),
    ]
    before = snapshot(tmp_path)
    for out, message in cases:
        assert cli.main(["-q", command, "--out", str(out)]) == 2
        assert _one_error(capsys, command) == message
    assert snapshot(tmp_path) == before and not (run / ".jaxinf.lock").exists()
    other = "demo" if command == "validate" else "validate"
    theirs = tmp_path / other
    claim_output(theirs, other).release()
    assert cli.main(["-q", command, "--out", str(theirs)]) == 2
    assert _one_error(capsys, command) == (
        f"{theirs}: is the output directory of jaxinf {other}, not of jaxinf {command}; choose another --out"
    )
    mine = tmp_path / command
    held = claim_output(mine, command)  # its own directory, in use by another process
    try:
        rundir.check_output(mine, command)
        with pytest.raises(rundir.StoreError, match="in use by another jaxinf process"):
            RunLock(mine).acquire()
    finally:
        held.release()


def test_validate_out_is_checked_before_the_world_is_read(tmp_path, capsys, monkeypatch):
    """A refused --out is found before any input is read (nothing is computed or written)."""
    from jaxinf import cli
    from jaxinf.validate import driver

    monkeypatch.setattr(driver, "load_world", lambda config: pytest.fail("the world was read"))
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "data.csv").write_text("1")
    assert cli.main(["-q", "validate", "--out", str(tmp_path / "x"), "validate.steps=3"]) == 2
    assert "is not a jaxinf validate directory" in _one_error(capsys, "validate")


def _scaled_lm_head(d: Path, factor: float) -> None:
    from safetensors.numpy import load_file, save_file

    weights = load_file(d / "model" / "model.safetensors")
    weights["lm_head.weight"] = weights["lm_head.weight"] * np.float32(factor)
    assert np.isfinite(weights["lm_head.weight"]).all()
    save_file(weights, d / "model" / "model.safetensors", metadata={"format": "np"})


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            {"factors__strategy": "identity"},
            r'queries\.jsonl:1: query "[^"]+": its preconditioned gradient of layer \S+ is not finite \(the model model '
            r"overflows float32 on it\)",
        ),
        (
            {},
            r"covariance S of layer \S+ is not finite: the model model overflows float32 on the documents of docs\.jsonl",
        ),
    ],
)
def test_overflowing_logits_stop_the_stage_that_meets_them(base, tmp_path, extra, message):
    """Issue 25, case 5: an lm_head scaled by 1e37 (finite weights, overflowing logits) stops the stage that meets the
    overflow with one line naming the model or the query, and no scores.npy is written (it was, with NaN entries)."""
    d = clone(base, tmp_path / "w", run=False)
    _scaled_lm_head(d, 1e37)
    r = jaxinf(args(**extra), base["env"], cwd=d)
    assert r.returncode == 2
    assert re.fullmatch(message, error_line(r)), error_line(r)
    assert not (d / "run" / "scores.npy").exists()


def test_a_saturated_model_gives_an_all_zero_fit_that_is_refused(base, tmp_path):
    """Issue 25, case 7: with the sampled Fisher, a model whose predictions are saturated samples its own labels with
    probability 1, so every gradient, S and Lambda are exactly 0: refused in one line before any query."""
    d = clone(base, tmp_path / "w", run=False)
    _scaled_lm_head(d, 1e37)
    r = jaxinf(args(factors__fisher="sampled"), base["env"], cwd=d)
    assert r.returncode == 2
    assert error_line(r) == (
        "Lambda is zero in every tracked layer (3 blocks): no token of the documents of docs.jsonl "
        "gave a non-zero gradient (documents of one token, or a model whose predictions are "
        "saturated), so every score would be 0"
    )
    assert not ran("queries", r.stderr) and not (d / "run" / "scores.npy").exists()


def test_a_one_token_max_length_is_refused():
    """Issue 25, case 7: data.max_length=1 leaves no next-token prediction (all-zero S and Lambda): a config error."""
    from jaxinf import config as cfg

    with pytest.raises(
        cfg.ConfigError,
        match=r"^command line: data\.max_length: must be at least 2 \(a document "
        r"needs two tokens for one next-token prediction\), got 1$",
    ):
        cfg.load(None, ["data.max_length=1"])
    with pytest.raises(cfg.ConfigError, match="plan.device_flops: must be a positive finite number, got nan"):
        cfg.load(None, ["plan.device_flops=nan"])


def test_factors_from_compares_content_and_refuses_a_swamping_damping(base, tmp_path):
    """Issue 25, cases 4 and 7: factors.from accepts the same weights under another path (it refused them by path)
    and refuses weights edited in place under the same path (it reused the stale curvature); a damping whose inverse
    underflows (every score 0) is refused in one line, and one that swamps Lambda is warned about."""
    d = clone(base, tmp_path / "w")
    shutil.copytree(d / "model", d / "copy")
    r = jaxinf(
        args(model__checkpoint="copy", factors__from="run", run__out="reuse", scores__damping=1e12), base["env"], cwd=d
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reusing the ekfac factors of run" in r.stderr and not ran("covariance", r.stderr)
    assert re.search(
        r"scores\.damping=1e\+12 is \S+ times the largest Lambda \(\S+, layer \S+\): the curvature is "
        r"ignored",
        r.stderr,
    ), r.stderr[-3000:]
    r = jaxinf(args(factors__from="run", run__out="tiny", scores__damping=1e300), base["env"], cwd=d)
    assert r.returncode == 2 and error_line(r) == (
        "command line: scores.damping: 1e+300 has an inverse that "
        "underflows run.precision=float32 (every score would be 0); choose "
        "one near Lambda's scale, or null for 0.1 x mean(Lambda)"
    )
    assert not (d / "tiny").exists()
    _scaled_lm_head(d, 1.5)
    r = jaxinf(args(factors__from="run", run__out="stale"), base["env"], cwd=d)
    assert r.returncode == 2
    assert error_line(r) == (
        "factors.from: run was fitted with other settings: model.checkpoint (the model in model is not what "
        f"run read from {base['root'] / 'model'})"  # as that run read it: from where it was started (base's)
    )
    assert not (d / "stale").exists()


def test_a_non_finite_score_names_the_document():
    from jaxinf.run.inputs import non_finite_loss

    class Docs:
        name = "docs.jsonl"

        def documents(self, idx):
            return [type("D", (), {"line": 7, "id": "d7"})() for _ in idx]

    message = non_finite_loss(Docs(), "document")
    assert message(0, 0, 3, float("-inf")) == 'docs.jsonl:7: document "d7": its score against a query is not finite'
    assert message(0, 0, 3, float("nan")) == 'docs.jsonl:7: document "d7": document loss is not finite (nan)'


def test_tracebacks_of_issue_25_are_one_line(tmp_path, capsys, monkeypatch):
    """Issue 25, case 8: `plan --mesh 3x0`, `compare --json DIRECTORY` and a refused write in `analyze` (a read-only
    run directory) are one line each (exit 2, 2 and 3), not tracebacks."""
    import errno

    from jaxinf import cli
    from jaxinf.analysis import cli as analysis_cli

    assert cli.main(["-q", "plan", "data.max_length=8", "--mesh", "3x0"]) == 2
    assert _one_error(capsys, "plan") == "--mesh '3x0': both sizes must be at least 1, e.g. 8x8"
    assert (
        cli.main(["-q", "compare", "--kronfluence", str(tmp_path), "--run", str(tmp_path), "--json", str(tmp_path)])
        == 2
    )
    assert _one_error(capsys, "compare") == f"--json {tmp_path}: is a directory; give the path of a file to write"

    def read_only(path):
        raise OSError(errno.EROFS, "Read-only file system", str(path / "summary.json"))

    monkeypatch.setattr(analysis_cli, "analyze", read_only)
    assert cli.main(["-q", "analyze", str(tmp_path)]) == 3
    assert _one_error(capsys, "analyze") == (
        f"{tmp_path / 'summary.json'}: read-only file system; make it writable and run the same command again"
    )


def test_a_finished_run_run_again_redoes_nothing(base, tmp_path):
    """Issue 25, case 11: a rerun of a finished run computes no batch, no breakdown and no analysis, and leaves every
    export byte for byte; a deleted report is written again (its stage's files are checked, not only its status)."""
    d = clone(base, tmp_path / "w")

    def results(run: Path) -> dict:  # run.json records the time; the token counts' cache key names the (copied) file
        return {k: v for k, v in snapshot(run).items() if "run.json" not in k and not k.startswith("state/plan")}

    before = results(d / "run")
    r = jaxinf(args(), base["env"], cwd=d)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not any(ran(s, r.stderr) for s in ("covariance", "lambda", "scores", "breakdowns"))
    assert "analyze:" not in r.stderr and "query gradients in" not in r.stderr
    assert results(d / "run") == before
    r = jaxinf(args(scores__topk=2), base["env"], cwd=d)  # only the exports depend on it: redone, not refused
    assert r.returncode == 0, r.stderr[-3000:]
    assert not any(ran(s, r.stderr) for s in ("covariance", "lambda", "scores")) and ran("breakdowns", r.stderr)
    assert all(len(json.loads(line)["top"]) == 2 for line in lines_of(d / "run" / "topk.jsonl"))
    shutil.rmtree(d / "run" / "report")
    r = jaxinf(args(scores__topk=2), base["env"], cwd=d)
    assert r.returncode == 0 and (d / "run" / "report" / "index.html").is_file() and "analyze:" in r.stderr
    assert not ran("breakdowns", r.stderr)


def test_messages_of_issue_25_case_12(tmp_path):
    """Issue 25, case 12: model.dtype=float64 names run.precision (not a Python API); a file given for a directory
    and the reverse say so; another tool's run.json is not read as a run record (no KeyError leaks)."""
    from jaxinf import config as cfg
    from jaxinf.interop.kronfluence import InteropError
    from jaxinf.interop.transfer import read_record
    from jaxinf.run.inputs import InputError, check_inputs

    with pytest.raises(
        cfg.ConfigError,
        match=r"^command line: model\.dtype: float64 needs run\.precision=float64 "
        r"\(64-bit arithmetic\), got run\.precision=float32$",
    ):
        cfg.load(None, ["model.dtype=float64"])
    cfg.load(None, ["model.dtype=float64", "run.precision=float64"])
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    for settings, message in (
        (
            {
                "model.checkpoint": tmp_path / "file",
                "data.documents": tmp_path / "file",
                "data.queries": tmp_path / "file",
            },
            f"model.checkpoint: {tmp_path / 'file'}: is a file, not a directory",
        ),
        (
            {
                "model.checkpoint": tmp_path / "dir",
                "data.documents": tmp_path / "file",
                "data.queries": tmp_path / "dir",
            },
            f"data.queries: {tmp_path / 'dir'}: is a directory, not a file",
        ),
    ):
        with pytest.raises(InputError) as e:
            check_inputs(cfg.load(None, [f"{k}={v}" for k, v in settings.items()]))
        assert str(e.value) == message
    (tmp_path / "dir" / "run.json").write_text('{"results": [1]}')
    with pytest.raises(InteropError, match="its run.json is not a jaxinf run record"):
        read_record(tmp_path / "dir")


def test_a_failed_start_never_removes_a_run_set_aside_by_a_killed_overwrite(tmp_path):
    """A directory holding only an old run that a killed --overwrite set aside is not a fresh directory: a start
    that then fails must not remove the run that recover_interrupted moves back."""
    from jaxinf.run import rundir

    root = tmp_path / "run"
    (root / rundir.PREVIOUS).mkdir(parents=True)
    (root / rundir.PREVIOUS / "scores.npy").write_text("old")
    assert not rundir.is_fresh(root)
    assert rundir.is_fresh(tmp_path / "new")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / rundir.LOCK_FILE).write_text("")
    assert rundir.is_fresh(empty)
    fresh = rundir.Fresh(empty, created=False)
    (empty / "run.json").write_text("{}")
    fresh.restore()
    assert empty.is_dir() and list(empty.iterdir()) == []


@pytest.mark.parametrize("state", ["setting aside", "moving the new attempt out", "moving the old run back"])
def test_an_overwrite_killed_while_moving_entries_loses_nothing(tmp_path, state):
    """Issue 25, case 1: a kill while the old run's entries are moved aside, or while a failed attempt is undone, is
    finished by the next start: the old run comes back whole, never taken for the new attempt's files."""
    from jaxinf.run import rundir

    root = tmp_path / "run"
    previous, discarded = root / rundir.PREVIOUS, root / rundir.DISCARDED
    previous.mkdir(parents=True)
    old = {"run.json": '{"format": "jaxinf run"}', "scores.npy": "old scores", "report": "old report"}
    where = {
        "setting aside": {"run.json": root, "scores.npy": previous, "report": previous},
        "moving the new attempt out": {"run.json": previous, "scores.npy": previous, "report": previous},
        "moving the old run back": {"run.json": root, "scores.npy": previous, "report": previous},
    }[state]
    for name, text in old.items():
        (where[name] / name).write_text(text)
    if state != "moving the new attempt out":
        (root / rundir.MOVING).touch()  # every entry of root is the old run's
    if state == "moving the new attempt out":
        (root / "run.json").write_text('{"format": "jaxinf run", "new": 1}')  # the new attempt, half moved out
        discarded.mkdir()
        (discarded / "state").mkdir()
    if state == "moving the old run back":
        discarded.mkdir()
        (discarded / "scores.npy").write_text("new scores")
    rundir.recover_interrupted(root)
    assert {p.name: p.read_text() for p in root.iterdir()} == old


def test_a_failed_overwrite_waits_for_the_writers_of_a_failed_save(tmp_path):
    """Orbax's writer threads go on writing a failed save's files, by path, after the failure is raised (seen on a
    full disk): the old run is put back only once they stop, so none of their files lands in it."""
    import threading

    from jaxinf.run import rundir

    root = tmp_path / "run"
    (root / "state").mkdir(parents=True)
    (root / "run.json").write_text('{"format": "jaxinf run"}')
    (root / "state" / "run.json").write_text('{"format": "jaxinf run"}')
    (root / "scores.npy").write_text("old scores")
    before = snapshot(root)
    aside = rundir.set_aside(root)
    tmp = root / "state" / "covariance" / "1.orbax-checkpoint-tmp" / "d"
    tmp.mkdir(parents=True)

    def writer():
        for i in range(6):
            time.sleep(0.2)
            tmp.mkdir(parents=True, exist_ok=True)
            (tmp / f"chunk{i}").write_bytes(b"x")

    thread = threading.Thread(target=writer)
    thread.start()
    assert aside.restore()
    thread.join()
    assert snapshot(root) == before and sorted(p.name for p in root.iterdir()) == ["run.json", "scores.npy", "state"]


def test_changed_supports_redo_only_the_exports(base, tmp_path):
    """Issue 25, case 11: a query's `supports` (or any label) changed in place redoes the exports and the analysis, not
    the query gradients or the scores, whose prompts and completions are unchanged."""
    d = clone(base, tmp_path / "w")
    rows = [json.loads(line) for line in lines_of(d / "queries.jsonl")]
    rows[0]["supports"] = [json.loads(lines_of(d / "docs.jsonl")[1])["id"]]
    rows[1]["model_answer"] = "42"  # the answer the model gave (finding 2's other variant) is carried through
    (d / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = jaxinf(args(), base["env"], cwd=d)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (
        "queries.jsonl: only the queries' ids or labels changed (not their prompts or completions) since this run "
        "started; recomputing exports, analysis"
    ) in r.stderr
    assert "query gradients in" not in r.stderr and not ran("scores", r.stderr)
    assert json.loads(lines_of(d / "run" / "queries.jsonl")[0])["supports"] == rows[0]["supports"]
    exported = [json.loads(line) for line in lines_of(d / "run" / "queries.jsonl")[:2]]
    assert exported[1]["model_answer"] == "42" and "model_answer" not in exported[0]
    np.testing.assert_array_equal(np.load(d / "run" / "scores.npy"), np.load(base["root"] / "run" / "scores.npy"))


def test_the_eta_leaves_out_the_compiling_first_step(monkeypatch):
    """Issue 25, case 13: a first step of 100 s (compilation) then steps of 1 s: the ETA after the second step is
    that of 1-s steps, not of the 50-s average (the first ETA of a five-minute stage read two hours)."""
    import io

    from jaxinf.engine import progress

    clock = iter([0.0, 100.0, 101.0, 101.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    p = progress.Progress("covariance", total=10, stream=io.StringIO())
    p.enabled = False
    p.update(50)  # t = 100: the compiled first step
    p.update(50)  # t = 101: one steady step
    assert p.line() == "covariance: 2/10 batches, 1.0 batches/s, 50 tokens/s, elapsed 0:01:41, ETA 0:00:08"


def test_a_query_of_unknown_tokens_is_warned_about(tmp_path, caplog):
    """Issue 25, case 12: a query whose completion is made only of words the tokenizer does not know is one warning."""
    import logging

    from jaxinf import config as cfg
    from jaxinf.data.queries import read_queries
    from jaxinf.data.tokenize import TextEncoder
    from jaxinf.run.inputs import check_queries

    world = make_world(tmp_path, n_documents=4, n_queries=1)
    (tmp_path / "q.jsonl").write_text(
        json.dumps({"id": "q", "prompt": "the river of", "completion": "zzqx wvvk"}) + "\n"
    )
    with caplog.at_level(logging.WARNING, logger="jaxinf"):
        check_queries(
            read_queries(str(tmp_path / "q.jsonl")),
            TextEncoder(world["model"] / "tokenizer.json"),
            cfg.load(None, ["data.max_length=16"]),
        )
    assert [r.getMessage() for r in caplog.records] == [
        f'{tmp_path / "q.jsonl"}:1: query "q": every token of its completion is the tokenizer\'s unknown token <unk> '
        "(2 tokens): the model sees none of its words"
    ]


def test_compare_says_why_token_counts_are_marked():
    """Issue 25, case 12: `compare` against a run on other data marked token counts "(!)" without saying why."""
    from jaxinf.interop.compare import format_table

    report = {
        "kronfluence": {"factors": "ekfac", "pairwise": None, "self_scores": None},
        "run": "run",
        "strategy": "ekfac",
        "notes": [],
        "stages": {"covariance": {"mlp": {"A": 0.0, "tokens": [10, 12]}}},
    }
    table = format_table(report)
    assert "10, 12 (!)" in table
    assert "note: (!) marks a layer whose token counts differ: the two fits saw different tokens" in table
    report["stages"]["covariance"]["mlp"]["tokens"] = [12, 12]
    assert "(!)" not in format_table(report)


def test_the_report_leads_with_each_querys_documents(base):
    """Issue 25, case 13: the queries' top and bottom documents come right after the findings, not at the bottom."""
    html = (base["root"] / "run" / "report" / "index.html").read_text()
    assert html.index('id="findings"') < html.index('id="queries"') < html.index('id="correlations"')


def test_the_exported_token_context_is_the_tokenizers_decoding(base):
    """Issue 25, case 13: topk_tokens.jsonl carries each token's decoded text in place, so the report's context column
    reads as the tokenizer decodes the document (words apart), not as token strings run together."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(base["root"] / "model" / "tokenizer.json"))
    records = [json.loads(line) for line in lines_of(base["root"] / "run" / "topk_tokens.jsonl")]
    assert records
    for rec in records:
        ids = [tok.token_to_id(t["text"]) for t in rec["tokens"]]
        assert "".join(t["piece"] for t in rec["tokens"]) == tok.decode(ids, skip_special_tokens=False)
    assert any(t["piece"].startswith(" ") for t in records[0]["tokens"])  # words apart, as decoded
