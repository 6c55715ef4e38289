"""``jaxinf plan``: bytes per device against a hand count for Command R 35B on 64 and 256 devices, compiled
steps on simulated devices, and the refusals (a stage that does not fit, a 256k x 256k factor)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pipeline_support import make_world, overrides
from sharding_support import REPO, device_env

from jaxinf import config as cfg
from jaxinf.engine import programs
from jaxinf.run import plan

CONFIG_64 = REPO / "configs/paper/command-r-35b_v5p-128.yaml"
CONFIG_256 = REPO / "configs/paper/command-r-35b_v5p-512.yaml"
GiB = 2**30


def hand_count(data: int, model: int, queries: int = 80, rank: int = 32) -> dict[str, int]:
    """Command R 35B by hand: hidden H 8192, MLP I 22528, 40 layers, vocabulary 256000 (tied), bf16 parameters.

    Every matrix of the model is split over `model` (its MLP / attention width or vocabulary divides);
    the norm scales are replicated. Factors, eigenbases and Lambda are float32, split over both axes;
    the rank-32 query gradients over `model`.
    """
    H, I, L, V = 8192, 22528, 40, 256000
    matrices = V * H + L * (4 * H * H + 3 * H * I)  # embedding; q, k, v, o; gate, up, down
    norms = L * H + H  # input_layernorm per layer, final norm
    parameters = 2 * (matrices // model + norms)
    factors = 4 * L * 3 * (H * H + I * I) // (model * data)  # A and S of gate, up (H, I) and down (I, H)
    Lambda = 4 * L * 3 * H * I // (model * data)
    queries_bytes = 4 * L * queries * rank * 3 * (H + I) // model  # left [d_out, r] and right [d_in, r] per block
    queries_bytes += 4 * queries  # each query's completion NLL, replicated
    return {"parameters": parameters, "factors": factors, "Lambda": Lambda, "queries": queries_bytes}


@pytest.mark.parametrize("config_file, data, model", [(CONFIG_64, 8, 8), (CONFIG_256, 16, 16)])
def test_bytes_per_device_match_a_hand_count(config_file, data, model):
    config = cfg.load(config_file)
    assert (config.mesh.data, config.mesh.model) == (data, model)
    result = plan.plan(config, [(data, model)], compile=False)
    assert result["parameters"] == 34_980_831_232 and result["tracked_layers"] == 120
    static = result["meshes"][0]["static"]
    want = hand_count(data, model)
    assert {k: static[k] for k in want} == want
    assert static["eigenbases"] >= static["factors"]  # Q_A, Q_S as large as A, S, plus e
    if data * model == 64:  # 35.0B bf16 parameters over 8; 257 GiB of factors and 82.5 GiB of Lambda over 64
        assert round(static["parameters"] / GiB, 2) == 8.15 and round(static["factors"] / GiB, 2) == 4.01
        assert round(static["Lambda"] / GiB, 2) == 1.29 and round(static["queries"] / GiB, 2) == 4.39


@pytest.mark.parametrize("fsdp, split", [(True, 256), (False, 16)])
def test_llama_70b_parameters_split_over_every_chip_with_fsdp(fsdp, split):
    """Llama 3.1 70B by hand: hidden H 8192, MLP I 28672, key/value width K 1024, 80 layers, vocabulary 128256
    (embedding and head), bf16. With ``mesh.fsdp`` every matrix is split over all 256 chips (its width over
    ``model``, ``embed`` over ``data``), 0.52 GiB per chip; over ``model`` alone, 8.22 GiB. Norms replicated. The
    stored query gradients likewise: 0.33 GiB per chip against 5.27."""
    config = cfg.load(REPO / "configs/plan/llama-3.1-70b_v5e-256.yaml", [f"mesh.fsdp={str(fsdp).lower()}"])
    result = plan.plan(config, [(16, 16)], compile=False)
    assert result["parameters"] == 70_553_706_496  # as published
    H, I, K, V, L = 8192, 28672, 1024, 128256, 80
    matrices = 2 * V * H + L * (2 * H * H + 2 * H * K + 3 * H * I)  # embed, head; q, o; k, v; gate, up, down
    norms = L * 2 * H + H
    assert matrices + norms == result["parameters"]
    parameters = result["meshes"][0]["static"]["parameters"]
    assert parameters == 2 * (matrices // split + norms)
    assert round(parameters / GiB, 2) == (0.52 if fsdp else 8.22)
    # the MLPs' rank-32 query gradients of 80 queries in float32, left [d_out, r] and right [d_in, r] per block
    # (gate, up: I x H; down: H x I), split the same way (their rows or columns over both axes), the losses replicated
    queries = result["meshes"][0]["static"]["queries"]
    assert queries == 4 * L * 80 * 32 * 3 * (H + I) // split + 4 * 80
    assert round(queries / GiB, 2) == (0.33 if fsdp else 5.27)


@pytest.mark.parametrize(
    "name",
    ["llama-3.1-70b_v5e-256", "command-r-plus-104b_v5e-256", "llama-3.1-70b_4x8xh100", "command-r-plus-104b_8x8xh100"],
)
def test_shipped_70b_and_104b_plans_hold_their_parameters_over_every_device(name):
    """The shipped 70B and 104B configs split the parameters over both axes (``mesh.fsdp``), 1/(data x model) of the
    model per device give or take the replicated norms, with at least the 16 documents per step of the paper's 35B
    config; their compiled steps fit (docs/benchmarks.md, measured by ``jaxinf plan`` on each: minutes, so not here)."""
    config = cfg.load(REPO / f"configs/plan/{name}.yaml")
    result = plan.plan(config, [(config.mesh.data, config.mesh.model)], compile=False)
    m = result["meshes"][0]
    devices = config.mesh.data * config.mesh.model
    assert config.mesh.fsdp and m["global_batch"] >= 16
    assert 2 * result["parameters"] / devices <= m["static"]["parameters"] < 1.01 * 2 * result["parameters"] / devices
    static = sum(m["static"][k] for k in ("parameters", "factors", "eigenbases", "Lambda", "queries"))
    assert static < config.plan.device_memory_gib * GiB


def test_tracking_a_256k_vocabulary_head_is_refused():
    config = cfg.load(CONFIG_64, ["factors.track=all"])
    with pytest.raises(
        plan.PlanError,
        match=r"^factors\.track tracks lm_head, whose factor S would be 256000 x 256000 "
        r"\(262 GB in float32, decomposed whole on one device\)",
    ):
        plan.plan(config, [(8, 8)], compile=False)


def _plan(args, devices=8, timeout=900):
    env = device_env(devices)
    env.pop("XLA_FLAGS")  # jaxinf plan simulates the devices its meshes need
    return subprocess.run(
        [sys.executable, "-m", "jaxinf", "plan", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
    )


def test_plan_compiles_every_step_and_refuses_what_does_not_fit(tmp_path):
    """The tiny Llama on a 4x2 mesh: every step compiled, with FLOPs per document for the per-document steps;
    a memory limit below the steps' peaks fails the plan, naming each stage."""
    w = make_world(tmp_path / "world", n_documents=4, n_queries=2)
    out = tmp_path / "plan.json"
    settings = {"scores.query_rank": 4, "data.batch_size": 4, "plan.device_memory_gib": 0.0001}
    r = _plan(["--mesh", "4x2", "--json", out, "--chip", "h100", *overrides(w, tmp_path / "run", **settings)])
    assert r.returncode == 1, r.stderr[-3000:]
    (m,) = json.loads(out.read_text())["meshes"]
    # the roofline on an H100: each per-document step's time is the larger of compute and memory, which it names
    for s in m["steps"]:
        if s["name"] not in ("covariance", "lambda", "scores", "breakdowns"):
            assert "roofline" not in s
            continue
        rf = s["roofline"]
        assert s["bytes_accessed"] > 0 and 0 < s["model_flops"] <= s["flops"], s
        assert rf["seconds"] == max(rf["compute_s"], rf["memory_s"]) > 0
        assert rf["bound"] == ("HBM" if rf["memory_s"] > rf["compute_s"] else rf["bound"])
        assert rf["bound"] in ("HBM", "compute", "compute (statistics)")
    assert "chip h100: roofline of each per-document step" in r.stdout and " bound" in r.stdout
    assert [s["name"] for s in m["steps"]] == ["covariance", "eigen", "lambda", "queries", "scores", "breakdowns"]
    assert all(s["peak"] > 0 for s in m["steps"])
    per_doc = {s["name"]: s["flops_per_document"] for s in m["steps"] if "flops_per_document" in s}
    assert set(per_doc) == {"covariance", "lambda", "scores", "breakdowns"} and all(v > 0 for v in per_doc.values())
    timed = {s["name"]: s["documents_timed"] for s in m["steps"] if "documents_timed" in s}
    assert timed["breakdowns"] == min(80 * 3, timed["scores"])  # plan.queries (80) x scores.topk (3) at most
    failures = [line for line in r.stdout.splitlines() if line.startswith("jaxinf plan: does not fit:")]
    over = [s for s in m["steps"] if s["peak"] > 0.0001 * GiB]
    assert (
        len(over) >= 4
        and len(failures) == len(over)
        and failures[0].startswith(
            f"jaxinf plan: does not fit: mesh 4x2: stage covariance needs {m['steps'][0]['peak'] / GiB:.2f} GiB per device, "
            "more than plan.device_memory_gib=0.0001; its largest layer statistic is model.layers.*.mlp."
        )
    ), r.stdout
    params = m["static"]["parameters"]
    assert failures[0].endswith(
        "lower data.batch_size (documents per data row) or data.max_length; or set mesh.fsdp=true (the parameters "
        f"take {params / GiB:.2f} GiB per device split over model alone, about {params / 4 / GiB:.2f} over data as well)"
    )
    # bytes per device fall as the model axis grows (8 documents per step: one per data row on 8x1)
    config = cfg.load(None, overrides(w, tmp_path / "run", **{**settings, "data.batch_size": 8}))
    static = [m["static"] for m in plan.plan(config, [(8, 1), (4, 2), (2, 4), (1, 8)], compile=False)["meshes"]]
    for key in ("parameters", "queries"):
        assert [s[key] for s in static] == sorted((s[key] for s in static), reverse=True), key
        assert static[-1][key] < static[0][key]


@pytest.mark.heavy
def test_command_r_35b_on_64_and_256_devices(tmp_path):
    """The whole plan of the paper's 35B setting, compiled for 64 and 256 simulated devices (a few minutes)."""
    for config_file, data, model in ((CONFIG_64, 8, 8), (CONFIG_256, 16, 16)):
        out = tmp_path / f"{data}x{model}.json"
        r = _plan([config_file, "--json", out], devices=data * model, timeout=1800)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        m = json.loads(out.read_text())["meshes"][0]
        want = hand_count(data, model)
        assert {k: m["static"][k] for k in want} == want
        assert all(0 < s["peak"] <= 95 * GiB for s in m["steps"]), m["steps"]
        assert f"mesh data={data} x model={model} ({data * model} devices" in r.stdout


def test_a_layer_whose_statistic_cannot_fit_is_named_before_the_first_batch(tmp_path):
    """The per-layer working sets are the documented counts; `jaxinf run` with a memory too small for the largest
    layer's statistic stops before the run directory is made, naming the stage, the layer and the key."""
    from jaxinf import pipeline
    from jaxinf.engine.capture import LayerSpec

    spec = LayerSpec("layers.*.mlp.down_proj", d_in=11, d_out=7, bias=True, stack=2)
    kw = dict(rows=3, tokens=5, queries=4, query_batch=2, model=2)
    assert programs.layer_working_set("covariance", spec, rank=None, **kw) == 4 * (3 * 5 * (12 + 7) + (144 + 49) / 2)
    assert programs.layer_working_set("lambda", spec, rank=None, **kw) == 4 * (3 * 5 * 19 + 3 * 7 * 12 / 2)
    assert programs.layer_working_set("queries", spec, rank=None, **kw) == 4 * 3 * 2 * 7 * 12
    w = make_world(tmp_path / "world", n_documents=4, n_queries=2)
    config = cfg.load(None, overrides(w, tmp_path / "run", **{"plan.device_memory_gib": 1e-6}))
    with pytest.raises(
        plan.PlanError,
        match=r"^stage covariance: one layer of model\.layers\.\*\.mlp\.\w+ needs about "
        r"0\.00 GiB per device for its statistic, more than "
        r"plan\.device_memory_gib=1e-06 .* lower data\.batch_size",
    ):
        pipeline.run(config)
    assert not (tmp_path / "run").exists()


def test_models_with_per_layer_kinds_shrink_with_their_first_layers():
    """The plan counts FLOPs on 1- and 2-layer copies of the model; Gemma 2's per-layer attention kinds
    (``layer_types``, sliding and full alternating) shrink with it instead of failing the config check."""
    config = cfg.load(REPO / "configs/plan/gemma-2-9b_8xh100.yaml")
    full, _ = plan.abstract_model(config)
    assert len(full.config.layer_types) == full.config.num_layers == 42
    for n in (1, 2):
        small, layers = plan.abstract_model(config, num_layers=n, scan=False)
        assert small.config.num_layers == n and small.config.layer_types == full.config.layer_types[:n]
        assert layers


def test_chip_rooflines():
    """The roofline of jaxinf.run.chips: FLOPs at the chip's rate for each part, bytes at HBM bandwidth, the larger binds;
    a TPU's float32 statistics run at its bfloat16 peak over the passes of run.matmul_precision."""
    from jaxinf.run import chips

    assert set(chips.CHIPS) == {"h100", "h200", "a100", "v5e", "v5p", "v6e"}
    v5e = chips.chip("v5e")
    r = chips.roofline(
        v5e,
        flops=2 * 197e12,
        bytes_accessed=819e9,
        model_flops=197e12,
        model_dtype="bfloat16",
        stats_dtype="float32",
        precision="highest",
    )
    assert r["compute_s"] == pytest.approx(1 + 6) and r["memory_s"] == pytest.approx(1)
    assert r["seconds"] == pytest.approx(7) and r["bound"] == "compute (statistics)"
    r = chips.roofline(v5e, 197e12, 819e9 * 10, 197e12, "bfloat16", "float32", "high")
    assert r["bound"] == "HBM" and r["seconds"] == pytest.approx(10)
    h100 = chips.chip("h100")
    assert h100.peak("float32", "highest") == 67e12 and h100.peak("float32", "high") == 494e12
    r = chips.roofline(h100, 989e12 * 2, 0, 989e12 * 2, "bfloat16", "float32", "highest")
    assert r["bound"] == "compute" and r["seconds"] == pytest.approx(2)
    custom = chips.chip(None, peak_tflops=100, hbm_gbps=1000)
    assert custom.peak("bfloat16") == custom.peak("float32") == 1e14 and custom.hbm == 1e12
    with pytest.raises(ValueError, match="needs both --peak-tflops and --hbm-gbps"):
        chips.chip(None, peak_tflops=100)
    with pytest.raises(ValueError, match=r"unknown chip"):
        chips.chip("tpu9")
