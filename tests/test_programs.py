"""One program per stage (:mod:`jaxinf.engine.programs`): the programs ``jaxinf run`` compiles are the programs ``jaxinf
plan`` compiles, found by their StableHLO, and settings reach the planner as they reach the run."""

from __future__ import annotations

import hashlib

import jax
import pytest
from pipeline_support import make_world, overrides

from jaxinf import config as cfg
from jaxinf import pipeline
from jaxinf.run import plan
from jaxinf.run.executor import MeshExecutor
from jaxinf.sharding.meshes import make_mesh


def fingerprint(lowered) -> str:
    return hashlib.sha256(lowered.as_text().encode()).hexdigest()


class Recording(MeshExecutor):
    """The run's executor on a 1 x 1 mesh, recording the StableHLO fingerprint of every program it runs."""

    def __init__(self, mesh, seen: set[str]):
        super().__init__(mesh)
        self.seen = seen

    def jit(self, fn, *, donate_argnums=(), out_shardings=None):
        jitted = super().jit(fn, donate_argnums=donate_argnums, out_shardings=out_shardings)

        def call(*args):
            if not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args)):
                self.seen.add(fingerprint(jitted.lower(*args)))
            return jitted(*args)

        return call


@pytest.mark.parametrize(
    "settings",
    [
        {"scores.query_svd": "full", "scores.query_rank": 2},
        {"scores.self_influence": "true", "factors.strategy": "kfac"},
        {"index.k": 2},
    ],
)
def test_the_planner_compiles_the_programs_the_run_runs(tmp_path, settings):
    """Every per-batch program the planner compiles for a 1 x 1 mesh is one the run compiled and ran (same
    StableHLO: same function, settings, argument shapes, dtypes and layouts). Documents are longer than
    ``data.max_length`` and the queries fill it, so the run's batches have the planner's shapes; they are split into
    rows of ``data.max_length`` tokens, which the exports' breakdowns pass scores again (a split document's score is
    in no one row the scoring pass keeps)."""
    w = make_world(tmp_path / "world", n_documents=6, n_queries=2)
    config = cfg.load(
        None,
        overrides(
            w,
            tmp_path / "run",
            **{
                "data.max_length": 16,
                "data.query_batch_size": 2,
                "plan.queries": 2,
                "plan.documents": 6,
                "data.long_documents": "split",
                **settings,
            },
        ),
    )
    mesh = make_mesh(1, 1, jax.devices()[:1])
    seen: set[str] = set()
    pipeline.run(config, executor=Recording(mesh, seen))
    lm, layers = plan.abstract_model(config)
    planned = {
        name: fingerprint(fn.lower(*args))
        for name, fn, args, _ in plan.step_programs(
            config, mesh, lm, layers, config.data.batch_size, one_device=False
        )  # as the run on a mesh executor
        if name != "eigen"
    }  # the eigendecomposition: one shared function (jaxinf.engine.distributed.eigh_program)
    want = (
        {"covariance", "queries", "scores", "breakdowns"}
        | ({"lambda"} if config.factors.strategy == "ekfac" else set())
        | ({"index"} if "index.k" in settings else set())
    )
    assert set(planned) == want
    missing = [name for name, f in planned.items() if f not in seen]
    assert not missing, f"planned programs the run never compiled: {missing}"


def test_settings_reach_the_planned_queries_program(tmp_path):
    """``scores.query_svd=full`` plans the full-SVD program, not the randomized one (they differ)."""
    w = make_world(tmp_path / "world", n_documents=2, n_queries=2)
    mesh = make_mesh(1, 1, jax.devices()[:1])

    def queries_program(svd: str) -> str:
        config = cfg.load(
            None,
            overrides(w, tmp_path / "run", **{"data.max_length": 16, "scores.query_rank": 2, "scores.query_svd": svd}),
        )
        lm, layers = plan.abstract_model(config)
        (text,) = [
            fn.lower(*args).as_text()
            for name, fn, args, _ in plan.step_programs(config, mesh, lm, layers, config.data.batch_size)
            if name == "queries"
        ]
        return text

    full, randomized = queries_program("full"), queries_program("randomized")
    assert full != randomized
    assert "rng_bit_generator" in randomized or "threefry" in randomized
    assert "rng_bit_generator" not in full and "threefry" not in full


def test_each_program_traces_the_model_once(tmp_path, monkeypatch):
    """Tracing the model is most of a step's compile time on a deep model, so each trace of a step program traces
    it once (the backward pass that forms the statistics; the mask's shape is checked from that pass's losses, not
    by a trace of its own), and the run traces it once more, before its first program, to find the layers."""
    from jaxinf.models import decoder

    w = make_world(tmp_path / "world", n_documents=6, n_queries=2)
    config = cfg.load(None, overrides(w, tmp_path / "run", **{"data.max_length": 16, "index.k": 2}))
    traces = [0]
    forward = decoder.DecoderLM.__call__

    def counted(self, *args, **kw):
        traces[0] += 1
        return forward(self, *args, **kw)

    monkeypatch.setattr(decoder.DecoderLM, "__call__", counted)
    per_program: list[int] = []  # model traces inside each trace of a step program
    first: list[int] = []  # model traces before the first program's first trace

    class Counting(MeshExecutor):
        def jit(self, fn, *, donate_argnums=(), out_shardings=None):
            def traced(*args):
                if not first:
                    first.append(traces[0])
                before = traces[0]
                out = fn(*args)
                per_program.append(traces[0] - before)
                return out

            return super().jit(traced, donate_argnums=donate_argnums, out_shardings=out_shardings)

    pipeline.run(config, executor=Counting(make_mesh(1, 1, jax.devices()[:1])))
    assert first == [1]
    assert per_program and max(per_program) == 1, per_program
    assert traces[0] == 1 + sum(per_program)
