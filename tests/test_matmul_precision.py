"""Every statistic contraction states its matmul precision (``run.matmul_precision``), checked on the lowered
StableHLO of each stage's program, and the model's own forward and backward pass keep the model's precision.

On a CPU every precision gives the same numbers, so only the program can show it: the CPU lowers the same
StableHLO an accelerator receives. Each ``dot_general`` is traced back, through the source locations JAX writes
into the lowered module, to the function that called ``einsum``/``matmul``: a statistic's (``jaxinf/engine/curvature/``,
``jaxinf/engine/scoring.py``, ``capture.per_sequence_gradient``) must carry the chosen precision, a model's
(``jaxinf/models/``, ``jaxinf/engine/testing.py``, ``capture.tokens_matmul``) the default, and a dot from anywhere else fails the test until it
is classified here, so a new contraction cannot enter a stage without a stated precision.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import pytest

from jaxinf import config as cfg
from jaxinf.engine import stages
from jaxinf.engine.precision import MATMUL_PRECISIONS, matmul_precision
from jaxinf.run import plan
from jaxinf.sharding.meshes import make_mesh

ROOT = Path(__file__).resolve().parent.parent / "jaxinf"
STATISTIC = "statistic"
MODEL = "model"


def origin(path: str, function: str) -> str | None:
    """Whose contraction a dot is, from the innermost frame of its source location (None: unclassified)."""
    p = Path(path).resolve()
    try:
        rel = p.relative_to(ROOT).as_posix()
    except ValueError:
        return None
    if rel.startswith("engine/curvature/") or rel in ("engine/scoring.py", "engine/indexing.py"):
        return STATISTIC
    if rel == "engine/capture.py":
        return {"per_sequence_gradient": STATISTIC, "tokens_matmul": MODEL}.get(function)
    if rel.startswith("models/") or rel == "engine/testing.py":  # the models (testing.py: the tiny one of the tests)
        return MODEL
    return None


_LOC_DEF = re.compile(r"^#(loc\d*) = loc\((.*)\)$", re.M)
_DOT_LOC = re.compile(r"loc\(#(loc\d*)\)\s*$")
_PRECISION = re.compile(r"precision = \[(\w+), (\w+)\]")


def _frame(locs: dict[str, str], ref: str, op: str = "", function: str = "?") -> tuple[str, str, int, str] | None:
    """``(op name, file, line, function)`` of location ``#ref``: its innermost frame."""
    body = locs.get(ref, "")
    m = re.fullmatch(r"callsite\(#(loc\d*) at #(loc\d*)\)", body)
    if m:
        return _frame(locs, m.group(1), op, function)
    m = re.fullmatch(r'"([^"]*)"\(#(loc\d*)\)', body)
    if m:  # a name wrapping a location: the op's name (its name stack), then the function of a frame
        name = m.group(1)
        if not op:
            return _frame(locs, m.group(2), name, function)
        return _frame(locs, m.group(2), op, name)
    m = re.fullmatch(r'"([^"]*)":(\d+):\d+.*', body)
    if m:
        return op, m.group(1), int(m.group(2)), function
    return None


def classify(op: str, path: str, function: str) -> str | None:
    """A statistic's dot (formed in the backward pass under the tap's ``statistic`` scope, or called from the engine's
    statistic code), the model's, or None (unclassified)."""
    if re.search(r"(^|[/(])statistic[/)]", op):  # e.g. .../checkpoint/statistic/..., transpose(jvp(statistic))/...
        return STATISTIC
    return origin(path, function)


def dots(text: str) -> list[tuple[str, str | None, tuple]]:
    """``(precision, origin, frame)`` of every ``dot_general`` of a lowered module's text (with debug info)."""
    locs = dict(_LOC_DEF.findall(text))
    out = []
    for line in text.splitlines():
        if "stablehlo.dot_general" not in line:
            continue
        loc = _DOT_LOC.search(line)
        assert loc, line
        p = _PRECISION.search(line)
        precision = p.group(1) if p else "DEFAULT"
        assert p is None or p.group(2) == precision, line
        frame = _frame(locs, loc.group(1))
        assert frame is not None, f"no source location for {line.strip()[:200]}"
        out.append((precision, classify(frame[0], frame[1], frame[3]), frame))
    return out


def check_program(name: str, text: str, want: str) -> int:
    """Asserts the rule on one lowered program; returns its number of statistic dots."""
    found = dots(text)
    stray = [f for p, o, f in found if o is None]
    assert not stray, f"stage {name}: dots of unclassified origin (classify them in this test): {stray}"
    wrong = [(p, f) for p, o, f in found if o == STATISTIC and p != want]
    assert not wrong, f"stage {name}: statistic dots without precision {want}: {wrong}"
    model = [(p, f) for p, o, f in found if o == MODEL and p != "DEFAULT"]
    assert not model, f"stage {name}: the model's own dots changed precision: {model}"
    return sum(o == STATISTIC for _, o, _ in found)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama's config.json (the programs are only lowered: no weights)."""
    import json

    from jaxinf.demo import train

    root = tmp_path_factory.mktemp("model")
    hf = train.hf_config(64, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=48, max_positions=64)
    (root / "config.json").write_text(json.dumps(hf))
    return root


def lowered_stages(checkpoint, *settings: str) -> dict[str, str]:
    """Each stage's step of ``jaxinf run`` (as ``jaxinf plan`` builds them) on one device, lowered with debug info."""
    config = cfg.load(
        None,
        [
            f"model.checkpoint={checkpoint}",
            "data.max_length=16",
            "data.batch_size=2",
            "data.query_batch_size=2",
            "plan.queries=3",
            *settings,
        ],
    )
    lm, layers = plan.abstract_model(config)
    mesh = make_mesh(1, 1, jax.devices()[:1])
    return {
        name: fn.lower(*args).as_text(debug_info=True)
        for name, fn, args, _ in plan.step_programs(config, mesh, lm, layers, 2)
    }


@pytest.mark.parametrize(
    "precision, settings",
    [
        ("high", ("factors.strategy=ekfac", "scores.query_rank=4", "scores.self_influence=true", "model.remat=true")),
        ("high", ("factors.strategy=kfac", "scores.query_rank=null", "model.scan_layers=false", "factors.track=all")),
        (None, ("factors.strategy=diagonal", "scores.query_rank=4", "scores.self_influence=true")),
    ],
)
def test_every_stage_states_its_matmul_precision(checkpoint, precision, settings):
    """``high`` (a value no dot takes by default) and the default (``highest``) reach every statistic dot of every
    stage's program; the model's own dots stay at the default."""
    extra = () if precision is None else (f"run.matmul_precision={precision}",)
    want = matmul_precision(precision).name
    programs = lowered_stages(checkpoint, *settings, *extra)
    counts = {name: check_program(name, text, want) for name, text in programs.items()}
    strategy = settings[0].split("=")[1]
    stats = (
        {"queries", "scores", "breakdowns"}
        | ({"covariance"} if strategy in ("kfac", "ekfac") else set())
        | ({"lambda"} if strategy in ("diagonal", "ekfac") else set())
    )
    assert {k for k, n in counts.items() if n > 0} == stats, counts
    assert counts.get("eigen", 0) == 0


@pytest.mark.parametrize("order", ["tokens", "documents"])
def test_score_contraction_orders_and_breakdowns_state_it(order):
    """Both contraction orders of the scores, the per-token breakdown, query gradients and self-influence."""
    from jaxinf.engine import capture, curvature, scoring, tasks, testing

    task = testing.tiny_lm_task()
    params = testing.tiny_lm_init(jax.random.key(0))
    docs = tasks.lm_batch([[1, 2, 3, 4], [5, 6, 7, 8]])
    layers = capture.select_layers(
        capture.find_layers(lambda p, b, pr: task.train_loss(p, b, pr, None), params, docs), "all"
    )
    queries = tasks.lm_batch([[1, 2, 3, 4]], prompt_lengths=[2])
    cov, lam = stages.covariance_stage(task, layers), stages.lambda_stage(task, layers)  # shapes only: nothing runs
    eigen = jax.eval_shape(curvature.eigendecompose, jax.eval_shape(lambda: cov.finalize(cov.init())))
    curv = jax.eval_shape(lambda e: curvature.assemble("ekfac", lambda: e, lambda b: lam.finalize(lam.init())), eigen)
    G, loss = jax.eval_shape(lambda p, b: stages.query_gradients(task, layers, p, b), params, queries)
    qg = jax.eval_shape(lambda G, l, c: scoring.prepare_queries(G, l, c, None, 2), G, loss, curv)

    def score(p, q, c, b):
        s, _ = stages.score_batch(
            task,
            layers,
            p,
            q,
            b,
            per_token=order == "tokens",
            per_layer=True,
            order=None if order == "tokens" else order,
            curv=c,
            precision="high",
        )
        return s

    from jaxinf.engine import indexing

    selection = jax.eval_shape(lambda e: indexing.select_cells(e, 2), eigen)
    basis = jax.eval_shape(lambda c, s: indexing.ordered_basis(c.Q_A, c.Q_S, s), curv, selection)
    programs = {
        "index": jax.jit(stages.index_step(task, layers, 2, precision="high")),
        "scores and index": jax.jit(stages.score_and_index_step(task, layers, 2, precision="high")),
        "index queries": jax.jit(
            lambda q, c, s: indexing.index_queries(q, c.Q_A, c.Q_S, c.Lambda, s, layers, 2, precision="high")
        ),
        "query gradients": jax.jit(lambda p, b: stages.query_gradients(task, layers, p, b, precision="high")),
        "prepare_queries": jax.jit(lambda G, l, c: scoring.prepare_queries(G, l, c, None, 2, precision="high")),
        "precondition": jax.jit(lambda G, c: curvature.precondition(G, c, curvature.damping(c, None), "high")),
        "scores": jax.jit(score),
        "self-influence": jax.jit(
            lambda p, c, b: stages.self_influence_batch(task, layers, p, c, None, b, precision="high")
        ),
    }
    args = {
        "index": (params, basis, docs),
        "scores and index": (params, qg, basis, docs),
        "index queries": (qg, curv, selection),
        "query gradients": (params, queries),
        "prepare_queries": (G, loss, curv),
        "precondition": (G, curv),
        "scores": (params, qg, curv, docs),
        "self-influence": (params, curv, docs),
    }
    for name, fn in programs.items():
        text = fn.lower(*args[name]).as_text(debug_info=True)
        assert check_program(name, text, "HIGH") > 0, name


def test_unknown_matmul_precision_is_refused():
    assert MATMUL_PRECISIONS == ("default", "high", "highest")
    with pytest.raises(
        ValueError,
        match=r"^run\.matmul_precision: unknown precision 'tf32' \(choose from default, "
        r"high, highest\)$",
    ):
        matmul_precision("tf32")
    with pytest.raises(cfg.ConfigError, match="run.matmul_precision"):
        cfg.load(None, ["run.matmul_precision=tf32"])


def test_the_emulated_accelerator_products_of_the_precision_table():
    """scripts/precision_table.py's emulation (docs/method.md's table): TF32 keeps 10 mantissa bits (nearest, ties
    to even), bfloat16 7, and bf16x3's products are far closer to float32's than one bfloat16 pass."""
    import importlib.util

    import numpy as np

    spec = importlib.util.spec_from_file_location("precision_table", ROOT.parent / "scripts/precision_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    x = np.array([1.0, 1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-10 + 2**-12, -(1 + 2**-8 + 2**-9)])
    assert table.to_tf32(x).tolist() == [1.0, 1.0, 1 + 2**-9, 1 + 2**-10, -(1 + 2**-8 + 2**-9)]
    assert table.to_bf16(x).tolist() == [1.0, 1.0, 1.0, 1.0, -(1 + 2**-7)]
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((64, 256)), rng.standard_normal((256, 32))
    exact = a @ b
    err = {m: np.linalg.norm(table.product(m)(a, b) - exact) / np.linalg.norm(exact) for m in table.MODES}
    assert err["float64"] == 0 and err["float32"] < 1e-6
    assert err["float32"] < err["bf16x3"] < 1e-4 < err["tf32"] < err["bf16"] < 1e-2, err
