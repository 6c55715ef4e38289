"""Per-device memory on meshes of 8 simulated CPU devices: measured on a small model, planned for Pythia 1.4B.

    PYTHONPATH=. python scripts/bench_sharding.py [--plan-config configs/plan/pythia-1.4b_8xa100.yaml]

Part 1 runs every stage of a small Llama (hidden 256, MLP 768, 4 layers,
vocabulary 1024; the MLP layers tracked, EK-FAC, 16 queries at rank 8) on each
mesh of 8 devices and reports the bytes that one device holds of the
parameters, the eigenbases, Lambda and the query gradients, read from the
arrays' addressable shards after the stages ran, and the median time of a
scoring step (8 documents x 128 tokens; simulated devices share the host's
cores, so the time shows the cost of the collectives, not a speed-up).

Part 2 is ``jaxinf plan`` of a bigger model on the same meshes: XLA's compiled
peak per device of each step.

Prints markdown tables (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.stdout.reconfigure(line_buffering=True)

import jax  # noqa: E402
import numpy as np  # noqa: E402

MESHES = ((8, 1), (4, 2), (2, 4), (1, 8))
MiB = 2**20


def device_bytes(tree) -> int:
    """Bytes of ``tree`` resident on the device holding the most of it."""
    per = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            per[shard.device] = per.get(shard.device, 0) + shard.data.nbytes
    return max(per.values())


def measured(repeats: int = 5) -> list[dict]:
    from jaxinf import models
    from jaxinf.engine import capture, curvature, scoring, stages
    from jaxinf.engine.distributed import eigendecompose
    from jaxinf.hostenv import mesh_lapack_threads
    from jaxinf.run.executor import MeshExecutor
    from jaxinf.sharding.axes import field_axes
    from jaxinf.sharding.meshes import make_mesh

    config = models.ModelConfig(
        family="llama",
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=768,
        num_layers=4,
        num_heads=8,
        num_kv_heads=4,
        max_position_embeddings=256,
    )
    lm = models.init(config, 0)
    task = lm.task()
    rng = np.random.default_rng(0)

    def batch(n, T, completion=None):
        tokens = rng.integers(3, 1024, size=(n, T)).astype(np.int32)
        mask = np.ones((n, T), np.float32)
        weights = mask.copy()
        weights[:, : (1 if completion is None else T - completion)] = 0.0
        return {"tokens": tokens, "mask": mask, "weights": weights}

    docs = [batch(8, 128) for _ in range(4)]
    queries = batch(16, 64, completion=16)
    dev = {k: jax.numpy.asarray(v) for k, v in docs[0].items()}
    layers = capture.select_layers(
        capture.find_layers(lambda p, b, pr: task.train_loss(p, b, pr, None), lm.params, dev), "mlp"
    )
    rows = []
    for data, model in MESHES:
        ex = MeshExecutor(make_mesh(data, model), batch_size=8)
        params = ex.place(lm.params, models.parameter_axes(lm.config))
        cov_stage, lam_stage = (
            stages.covariance_stage(task, layers, "empirical"),
            stages.lambda_stage(task, layers, "empirical"),
        )
        state = ex.init(cov_stage)
        up = ex.jit(cov_stage.update, donate_argnums=(0,), out_shardings=(ex.shardings(state), ex.rows()))
        for b in docs:
            state, _ = up(state, params, ex.put(b), None)
        cov = jax.jit(cov_stage.finalize, out_shardings=ex.shardings(jax.eval_shape(cov_stage.finalize, state)))(state)
        with mesh_lapack_threads(ex.mesh):
            eigen = jax.block_until_ready(eigendecompose(cov, ex.mesh))
        lstate = ex.init(lam_stage)
        up = ex.jit(lam_stage.update, donate_argnums=(0,), out_shardings=(ex.shardings(lstate), ex.rows()))
        for b in docs:
            lstate, _ = up(lstate, params, eigen, ex.put(b), None)
        lam_shardings = ex.shardings(
            jax.eval_shape(lam_stage.finalize, lstate), field_axes(curvature.LambdaState, "Lambda")
        )
        Lambda = jax.jit(lam_stage.finalize, out_shardings=lam_shardings)(lstate)
        curv = curvature.curvature("ekfac", eigen, Lambda)
        G, loss = ex.jit(lambda p, b: stages.query_gradients(task, layers, p, b))(params, ex.put_replicated(queries))
        qg = ex.place(ex.jit(lambda G, l, c: scoring.prepare_queries(G, l, c, None, 8))(G, loss, curv))

        def score(p, q, b):
            s, losses = stages.score_batch(task, layers, p, q, b)
            return {"scores": s.total, "loss": losses}

        fn = ex.jit(score, out_shardings={"scores": ex.rows(2, last=True), "loss": ex.rows()})
        placed = [ex.put(b) for b in docs]
        jax.block_until_ready(fn(params, qg, placed[0]))
        times = []
        for i in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(params, qg, placed[i % len(placed)]))
            times.append(time.perf_counter() - t0)
        rows.append(
            {
                "mesh": f"{data}x{model}",
                "parameters": device_bytes(params),
                "eigen": device_bytes(eigen),
                "Lambda": device_bytes(Lambda),
                "queries": device_bytes(qg),
                "score_ms": 1e3 * statistics.median(times),
            }
        )
    return rows


def planned(config_file: str) -> tuple[dict, object]:
    from jaxinf import config as cfg
    from jaxinf.run import plan

    config = cfg.load(config_file, ["plan.hosts=1", "data.batch_size=8"])
    return plan.plan(config, MESHES), config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan-config", default="configs/plan/pythia-1.4b_8xa100.yaml")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    load = os.getloadavg()
    print(
        f"{jax.device_count()} simulated {jax.devices()[0].platform} devices on {os.cpu_count()} cores "
        f"(load average {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}), jax {jax.__version__}\n"
    )
    print(
        "Measured: a small Llama (hidden 256, MLP 768, 4 layers, vocabulary 1024), MLP layers, EK-FAC, 16 queries "
        "at rank 8; MiB held by one device after the stages ran; scoring step of 8 documents x 128 tokens.\n"
    )
    print(
        "| mesh (data x model) | parameters MiB | Q_A, Q_S, e MiB | Lambda MiB | query gradients MiB | score step ms |"
    )
    print("|---|---|---|---|---|---|")
    for r in measured(args.repeats):
        print(
            f"| {r['mesh']} | {r['parameters'] / MiB:.2f} | {r['eigen'] / MiB:.2f} | {r['Lambda'] / MiB:.2f} | "
            f"{r['queries'] / MiB:.2f} | {r['score_ms']:.1f} |"
        )
    result, config = planned(args.plan_config)
    print(
        f"\nPlanned: `jaxinf plan {args.plan_config} plan.hosts=1 data.batch_size=8` on the same meshes "
        f"({result['parameters']:,} parameters, {result['tracked_layers']} tracked layers, "
        f"{config.data.max_length} tokens, 8 documents per step); GiB per device.\n"
    )
    names = [s["name"] for s in result["meshes"][0]["steps"]]
    print(
        "| mesh | parameters | factors A+S | Lambda | query gradients | "
        + " | ".join(f"peak: {n}" for n in names)
        + " |"
    )
    print("|---" * (5 + len(names)) + "|")
    G = 2**30
    for m in result["meshes"]:
        st = m["static"]
        cells = [f"{st[k] / G:.2f}" for k in ("parameters", "factors", "Lambda", "queries")]
        cells += [f"{s['peak'] / G:.2f}" for s in m["steps"]]
        print(f"| {m['data']}x{m['model']} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
