"""Configs (YAML, overrides, validation) and the run store (Orbax steps, manifests, resume rules)."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf import atomic
from jaxinf import config as cfg
from jaxinf.config import keys as config_keys
from jaxinf.run import rundir, store


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("factors:\n  strategy: kfac\n  from: prev\nscores:\n  damping: 1e-3\n  query_rank: 32\n")
    c = cfg.load(path, ["factors.track=[a.*, b]", "run.out=x"])
    assert c.factors.strategy == "kfac" and c.factors.from_run == "prev" and c.factors.track == ["a.*", "b"]
    assert c.scores.damping == 1e-3 and c.scores.query_rank == 32 and c.run.out == "x"
    assert cfg.to_dict(c)["factors"]["from"] == "prev"
    assert cfg.from_dict(cfg.to_dict(c)) == c


@pytest.mark.parametrize(
    "text, message",
    [
        ("factors:\n  stratgy: kfac\n", r"c.yaml: unknown key 'factors.stratgy' \(did you mean 'factors.strategy'\?\)"),
        ("factors:\n  strategy: kfc\n", r"c.yaml: factors.strategy: expected one of identity, diagonal, kfac, ekfac"),
        ("data:\n  max_length: ten\n", r"c.yaml: data.max_length: expected an integer, got 'ten'"),
        ("data:\n  batch_size: 0\n", r"c.yaml: data.batch_size: must be at least 1"),
        ("scores:\n  damping: [1]\n", r"c.yaml: scores.damping: expected a number or null"),
        ("model: [1, 2]\n", r"c.yaml: model: expected a mapping of keys"),
        # a dotted key at the top of the file, as on the command line: "unknown key" without saying how to write it
        (
            "data.max_length: 8\n",
            r"c.yaml: unknown key 'data.max_length' \(a YAML config nests keys in sections: write it as 'data:' "
            r"with 'max_length:' indented under it\)",
        ),
        ("factors: {strategy: kfac\n", r"c.yaml:\d+: invalid YAML"),
        # a key given twice: PyYAML keeps the second silently, dropping scores.damping
        (
            "scores:\n  damping: 1\nrun:\n  out: x\nscores:\n  topk: 3\n",
            r"c.yaml:5: invalid YAML \(duplicate key 'scores'\)",
        ),
        ("scores:\n  damping: 1\n  damping: 2\n", r"c.yaml:3: invalid YAML \(duplicate key 'damping'\)"),
        (
            b"model:\n  checkpoint: \xff\xfe\n",
            r"c.yaml: not a YAML text file \(byte 21 is not UTF-8\)",
        ),  # was a traceback
    ],
)
def test_bad_configs_name_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.load(path)


def test_bad_overrides_and_missing_file(tmp_path):
    with pytest.raises(cfg.ConfigError, match=r"command line: unknown key 'mesh.dta'"):
        cfg.load(None, ["mesh.dta=2"])
    with pytest.raises(cfg.ConfigError, match=r"not of the form section.key=value"):
        cfg.load(None, ["mesh"])
    with pytest.raises(cfg.ConfigError, match=r"nope.yaml: no such config file"):
        cfg.load(tmp_path / "nope.yaml")


def test_every_key_has_help_and_a_known_stage():
    for section in cfg.SECTIONS:
        for f in config_keys._fields(section):
            meta = config_keys._fields(section)[f].metadata
            assert meta["help"] and (meta["affects"] is None or meta["affects"] in cfg.STAGES)
    assert len(cfg.describe().splitlines()) == len(cfg.all_keys()) + len(cfg.SECTIONS)


def test_shipped_configs_are_valid():
    configs = sorted(Path(__file__).parent.parent.joinpath("configs").glob("**/*.yaml"))
    assert configs
    for path in configs:
        cfg.load(path)
    reference = cfg.load(Path(__file__).parent.parent / "configs/reference.yaml")
    assert reference == cfg.Config()  # the reference documents every default
    text = (Path(__file__).parent.parent / "configs/reference.yaml").read_text()
    for name in cfg.all_keys():
        assert f"  {name.split('.')[1]}:" in text, name


def _config(tmp_path, **over):
    overrides = [f"run.out={tmp_path / 'run'}"] + [f"{k}={v}" for k, v in over.items()]
    return cfg.load(None, overrides)


def test_stage_steps_and_manifest(tmp_path):
    run = store.RunStore.open(_config(tmp_path))
    st = run.stage("covariance")
    tree = {"A": {"x": jnp.arange(6.0).reshape(2, 3)}, "count": jnp.array(3.0)}
    for step in (10, 20, 30):
        st.save(step, jax_tree_scale(tree, step))
    assert st.steps() == [20, 30]  # two kept
    step, restored = st.latest(tree)
    assert step == 30 and float(restored["count"]) == 90.0
    # corrupt the newest step: it is reported and the previous one is used
    victim = next(
        p
        for p in (tmp_path / "run/state/covariance/30").rglob("*")
        if p.is_file() and p.stat().st_size > 100 and p.name != store.MANIFEST
    )
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(store.CorruptCheckpoint, match=r"corrupted checkpoint file"):
        st.restore(30, tree)
    step, restored = st.latest(tree)
    assert step == 20 and float(restored["count"]) == 60.0
    # a truncated file is reported as such
    victim.write_bytes(bytes(data[:10]))
    with pytest.raises(store.CorruptCheckpoint, match=r"truncated"):
        st.restore(30, tree)
    # a step without a manifest (interrupted save) is invisible
    (tmp_path / "run/state/covariance/20" / store.MANIFEST).unlink()
    assert st.steps() == [30]


def test_a_relative_run_directory_checkpoints_and_resumes(tmp_path, monkeypatch):
    """run.out=runs/mine (relative, as the README's commands and the demo use it): Orbax needs absolute paths."""
    monkeypatch.chdir(tmp_path)
    tree = {"A": {"x": jnp.arange(6.0).reshape(2, 3)}, "count": jnp.array(3.0)}
    run = store.RunStore.open(cfg.load(None, ["run.out=runs/mine"]))
    run.stage("covariance").save(5, tree)
    step, restored = store.RunStore.open(cfg.load(None, ["run.out=runs/mine"])).stage("covariance").latest(tree)
    assert step == 5 and float(restored["count"]) == 3.0
    assert (tmp_path / "runs/mine/state/covariance/5" / store.MANIFEST).is_file()


def test_a_stage_saved_on_a_mesh_restores_in_a_process_of_one_device(tmp_path):
    """A stage saved split over a mesh (two devices here; a pod's run saves its curvature so) restores onto its shapes
    alone in a process of one device, as factors.from, jaxinf query and jaxinf export read another run's: Orbax took
    the sharding the checkpoint was saved with and refused it ("Topology mismatch detected")."""
    import subprocess
    import sys

    from sharding_support import device_env

    save = (
        "import jax, numpy as np\n"
        "from jax.sharding import Mesh, NamedSharding, PartitionSpec as P\n"
        "from jaxinf.run.store import StageStore\n"
        "mesh = Mesh(np.array(jax.devices()), ('data',))\n"
        "x = jax.device_put(np.arange(8.0, dtype=np.float32).reshape(4, 2), NamedSharding(mesh, P('data')))\n"
        f"StageStore({str(tmp_path / 'eigen')!r}, keep=1).save(0, {{'Q': x}})\n"
    )
    r = subprocess.run([sys.executable, "-c", save], env=device_env(2), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    from jaxinf.run.executor import DeviceExecutor

    shapes = {"Q": jax.ShapeDtypeStruct((4, 2), np.float32)}
    stage = store.StageStore(tmp_path / "eigen", keep=1)
    on_host, on_device = stage.restore(0, shapes), stage.restore(0, DeviceExecutor().like(shapes))
    assert isinstance(on_host["Q"], np.ndarray) and isinstance(on_device["Q"], jax.Array)  # a bare shape: the host
    for restored in (on_host, on_device):
        np.testing.assert_array_equal(np.asarray(restored["Q"]), np.arange(8.0).reshape(4, 2))


def jax_tree_scale(tree, s):
    return {"A": {"x": tree["A"]["x"] * s}, "count": tree["count"] * s}


def test_resume_refuses_changed_results_and_allows_the_rest(tmp_path):
    run = store.RunStore.open(_config(tmp_path))
    run.stage("covariance").save(5, {"x": jnp.ones(2)})
    run.mark("covariance", "running", step=5)
    # damping only affects the query stage, which has not started: allowed
    store.RunStore.open(_config(tmp_path, **{"scores.damping": 0.01}))
    # mesh and save intervals never change results: allowed
    store.RunStore.open(_config(tmp_path, **{"scores.damping": 0.01, "mesh.data": 2, "factors.save_every": 7}))
    with pytest.raises(rundir.StoreError, match=r"would change results already saved: factors.fisher, run.precision"):
        store.RunStore.open(
            _config(tmp_path, **{"scores.damping": 0.01, "factors.fisher": "empirical", "run.precision": "float64"})
        )
    fresh = store.RunStore.open(_config(tmp_path, **{"factors.fisher": "empirical"}), overwrite=True)
    assert fresh.status("covariance") == "pending" and not fresh.stage("covariance").steps()
    record = json.loads((tmp_path / "run/run.json").read_text())
    assert record["config"]["factors"]["fisher"] == "empirical" and "jax" in record["versions"]


def test_refusals_before_anything_is_written(tmp_path):
    other = tmp_path / "run"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(rundir.StoreError, match=r"not a jaxinf run directory"):
        store.RunStore.open(_config(tmp_path))
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        import os

        if os.access(locked, os.W_OK):  # running as root: permissions do not bind
            pytest.skip("permissions are not enforced for this user")
        with pytest.raises(rundir.StoreError, match=r"not writable"):
            store.RunStore.open(cfg.load(None, [f"run.out={locked / 'run'}"]))
    finally:
        locked.chmod(0o700)


def test_unwritable_output_is_refused_even_as_root(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(rundir.StoreError, match=r"is not a directory"):
        store.RunStore.open(cfg.load(None, [f"run.out={blocker / 'run'}"]))


def test_results_and_atomic_npy(tmp_path):
    run = store.RunStore.open(_config(tmp_path))
    run.save_result("eigen", {"Q": jnp.eye(3)})
    assert run.status("eigen") == "done"
    np.testing.assert_array_equal(np.asarray(run.load_result("eigen", {"Q": jnp.eye(3)})["Q"]), np.eye(3))
    atomic.save_npy(tmp_path / "s.npy", np.ones((2, 3), np.float32))
    assert np.load(tmp_path / "s.npy").shape == (2, 3)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_score_chunks_resume_with_their_carry_only_where_it_was_saved_with_them(tmp_path):
    """The scoring pass's tails are saved beside its newest chunk: a resumed pass starts from them where they were
    saved at the batch the chunks end at; cut short (the chunk saved, the kill before its carry), corrupted, or of
    other shapes, it starts from the fresh carry, and the chunks are kept either way."""
    import types

    from jaxinf.run.saved import SavedChunks

    run = store.RunStore.open(_config(tmp_path))
    plan = types.SimpleNamespace(process_count=1, batch_size=2, num_steps=6)
    fresh = {"t": jnp.zeros(2)}

    def rows(first):
        return [({"scores": np.full((1, 2), float(first))}, {"index": np.array([first, first + 1])})]

    saves = SavedChunks(run, "scores", plan, 2, ("scores",), carry=True)
    assert saves.resume(fresh)[0] == 0
    saves.begin(0, 6)
    saves.save(2, {"t": jnp.array([1.0, 2.0])}, rows(0))
    saves.save(4, {"t": jnp.array([3.0, 4.0])}, rows(2))
    assert run.carry("scores").steps() == [4]  # the newest only

    def resumed(like=fresh):
        again = SavedChunks(run, "scores", plan, 2, ("scores",), carry=True)
        start, carry = again.resume(like)
        assert start == 4 and len(again.chunks) == 2
        return np.asarray(carry["t"])

    np.testing.assert_array_equal(resumed(), [3.0, 4.0])
    np.testing.assert_array_equal(resumed({"t": jnp.zeros(3)}), [0.0, 0.0, 0.0])  # other shapes: afresh
    victim = next(
        p
        for p in (tmp_path / "run/state/scores.carry/4").rglob("*")
        if p.is_file() and p.stat().st_size > 100 and p.name != store.MANIFEST
    )
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    np.testing.assert_array_equal(resumed(), [0.0, 0.0])  # corrupted: afresh
    shutil.rmtree(tmp_path / "run/state/scores.carry/4")  # the kill between the chunk and its carry
    np.testing.assert_array_equal(resumed(), [0.0, 0.0])


def test_the_records_working_directory_is_read_by_one_helper():
    """The twelfth pass: the record's ``cwd`` was read with the same fallback in three places (the recorded config,
    the store's change check, the analysis's corpus lookup), which could drift apart; now one helper,
    ``rundir.recorded_cwd``, reads it and the others call it."""
    import ast

    root = Path(__file__).resolve().parents[1] / "jaxinf"
    reads = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            is_get = (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "get"
                and any(isinstance(a, ast.Constant) and a.value == "cwd" for a in node.args)
            )
            is_item = (
                isinstance(node, ast.Subscript)
                and isinstance(node.ctx, ast.Load)
                and isinstance(node.slice, ast.Constant)
                and node.slice.value == "cwd"
            )
            if is_get or is_item:
                reads.append(f"{path.relative_to(root.parent)}:{node.lineno}")
    assert len(reads) == 1 and reads[0].startswith("jaxinf/run/rundir.py:"), reads
    assert rundir.recorded_cwd({"cwd": "/somewhere"}) == "/somewhere"
    assert [rundir.recorded_cwd(r) for r in ({}, {"cwd": ""}, {"cwd": 5}, {"cwd": None})] == [None] * 4
