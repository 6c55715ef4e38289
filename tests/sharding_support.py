"""Sharding tests run on simulated devices in a fresh process: helpers and the worker that does the work.

The device count of the CPU platform is fixed when jax initializes
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``), and the main pytest
process needs one device, so every multi-device check runs here, in a
subprocess started by :func:`run_worker`, and reports numbers as JSON:

    python tests/sharding_support.py stages OUT.json     # every stage on 4 meshes vs one device
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MESHES = ((8, 1), (4, 2), (2, 4), (1, 8))
FSDP_MESHES = ((4, 2),)  # also run with the parameters split over data (mesh.fsdp), reported as "4x2-fsdp"
TOLERANCE = 1e-5  # max |sharded - single| / max |single|, float32; fixed before the first run


def device_env(devices: int, cache: Path | None = None) -> dict:
    """Environment of a subprocess with ``devices`` simulated CPU devices (and a shared compilation cache)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env["OPENBLAS_NUM_THREADS"] = "1"  # every simulated device calls LAPACK at once (see hostenv.mesh_lapack_threads)
    if cache is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def run_worker(task: str, out: Path, devices: int = 8, cache: Path | None = None, timeout: int = 600) -> dict:
    """Runs ``task`` of this file in a subprocess with ``devices`` devices; returns its JSON report."""
    r = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), task, str(out)],
        env=device_env(devices, cache),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    if r.returncode != 0:
        raise AssertionError(f"worker {task} failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return {**json.loads(Path(out).read_text()), "stderr": r.stderr}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_processes(
    n: int,
    args: list[str],
    env: dict,
    per_process: list[list[str]] | None = None,
    timeout: int = 600,
    per_process_env: list[dict] | None = None,
) -> list[subprocess.CompletedProcess]:
    """``python -m jaxinf ARGS`` as ``n`` processes of one jax.distributed run on localhost (one CPU device each);
    ``per_process`` adds arguments and ``per_process_env`` environment variables to each."""
    port = free_port()
    procs = []
    for i in range(n):
        extra = [f"mesh.coordinator=127.0.0.1:{port}", f"mesh.num_processes={n}", f"mesh.process_id={i}"]
        extra += per_process[i] if per_process else []
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "jaxinf", *map(str, args), *extra],
                env={**env, **(per_process_env[i] if per_process_env else {})},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=REPO,
            )
        )
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return results


# --------------------------------------------------------------------------- the worker


def tiny_llama():
    """A 2-layer Llama (hidden 32, MLP 48, 4 heads, 2 KV heads, vocab 64) with random weights."""
    from jaxinf import models

    config = models.ModelConfig(
        family="llama",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=64,
    )
    return models.init(config, 0)


def document_batches(n_batches: int = 3, batch: int = 8, length: int = 24, seed: int = 0) -> list[dict]:
    """Host (numpy) causal-LM batches with ragged rows (padding included) and one all-padding row."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        lengths = rng.integers(2, length + 1, size=batch)
        lengths[-1] = 0 if len(out) == 1 else lengths[-1]
        tokens = rng.integers(3, 64, size=(batch, length)).astype(np.int32)
        mask = (np.arange(length)[None] < lengths[:, None]).astype(np.float32)
        weights = mask.copy()
        weights[:, 0] = 0.0
        out.append({"tokens": tokens * mask.astype(np.int32), "mask": mask, "weights": weights})
    return out


def query_batch(n: int = 5, length: int = 16, seed: int = 1) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 64, size=(n, length)).astype(np.int32)
    lengths = rng.integers(6, length + 1, size=n)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.float32)
    weights = mask * (np.arange(length)[None] >= 4)
    return {"tokens": tokens * mask.astype(np.int32), "mask": mask, "weights": weights.astype(np.float32)}


def _say(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def _collectives(compiled) -> list[str]:
    """The collectives of a compiled program, one entry per instruction (sorted)."""
    kinds = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all", "collective-permute")
    lines = compiled.as_text().splitlines()
    return sorted(k for line in lines for k in kinds if f" {k}(" in line or f" {k}-start(" in line)


def _rel(x, y) -> float:
    import numpy as np

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30))


def _tree_rel(a, b) -> float:
    import jax

    return max(_rel(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _layouts(tree) -> dict:
    """Per leaf: its partition spec and whether it is fully replicated."""
    import jax

    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = jax.tree_util.keystr(path)
        out[name] = {
            "spec": str(leaf.sharding.spec),
            "replicated": bool(leaf.sharding.is_fully_replicated),
            "shape": list(leaf.shape),
        }
    return out


def stages_task(out: Path) -> None:
    """Covariance, eigen, Lambda, query gradients and scores on every mesh of :data:`MESHES` vs one device.

    Each sharded stage gets the single-device result of the stage before it (placed
    on the mesh), so the comparison isolates that stage's own sharding. The
    covariance uses the sampled (true) Fisher: labels come from counter-based
    keys and are the same on every layout.
    """
    import jax
    import numpy as np

    from jaxinf import models
    from jaxinf.engine import capture, curvature, scoring, stages
    from jaxinf.engine.distributed import eigendecompose, eigh_program
    from jaxinf.hostenv import mesh_lapack_threads
    from jaxinf.run.executor import MeshExecutor
    from jaxinf.sharding.axes import field_axes
    from jaxinf.sharding.meshes import make_mesh

    lm = tiny_llama()
    task = lm.task()
    host_batches = document_batches()
    qhost = query_batch()
    dev = lambda b: {k: jax.numpy.asarray(v) for k, v in b.items()}  # noqa: E731
    layers = capture.select_layers(
        capture.find_layers(lambda p, b, pr: task.train_loss(p, b, pr, None), lm.params, dev(host_batches[0])), "mlp"
    )
    key = jax.random.key(3)
    cov_stage = stages.covariance_stage(task, layers, "sampled")
    lam_stage = stages.lambda_stage(task, layers, "sampled")

    # ------------------------------------------------ single device
    ref = {}
    state = cov_stage.init()
    up = jax.jit(cov_stage.update)
    for i, b in enumerate(host_batches):
        state, _ = up(state, lm.params, dev(b), jax.random.fold_in(key, i))
    ref["cov"] = cov_stage.finalize(state)
    ref["eigen"] = jax.jit(curvature.eigendecompose)(ref["cov"])
    state = lam_stage.init()
    up = jax.jit(lam_stage.update)
    for i, b in enumerate(host_batches):
        state, _ = up(state, lm.params, ref["eigen"], dev(b), jax.random.fold_in(key, 100 + i))
    ref["Lambda"] = lam_stage.finalize(state)
    curv = curvature.curvature("ekfac", ref["eigen"], ref["Lambda"])
    G, qloss = jax.jit(lambda p, b: stages.query_gradients(task, layers, p, b))(lm.params, dev(qhost))
    prep = jax.jit(lambda G, l, c: scoring.prepare_queries(G, l, c, None, 4))
    ref["queries"] = prep(G, qloss, curv)

    def score_step(p, q, b, fsdp=False):
        s, loss = stages.score_batch(task, layers, p, q, b, fsdp=fsdp)
        return {"scores": s.total, "loss": loss}

    ref["scores"] = [jax.jit(score_step)(lm.params, ref["queries"], dev(b)) for b in host_batches]

    report = {"meshes": {}}
    for data, model, fsdp in [(d, m, False) for d, m in MESHES] + [(d, m, True) for d, m in FSDP_MESHES]:
        name = f"{data}x{model}" + ("-fsdp" if fsdp else "")
        mesh = make_mesh(data, model)
        ex = MeshExecutor(mesh, batch_size=8, fsdp=fsdp)
        params = ex.place(lm.params, models.parameter_axes(lm.config))
        r: dict = {"collectives": {}, "errors": {}, "layouts": {}}

        # covariance
        _say(f"{name}: covariance")
        state = ex.init(cov_stage)
        up = ex.jit(cov_stage.update, donate_argnums=(0,), out_shardings=(ex.shardings(state), ex.rows()))
        r["collectives"]["covariance"] = _collectives(up.lower(state, params, ex.put(host_batches[0]), key).compile())
        for i, b in enumerate(host_batches):
            state, _ = up(state, params, ex.put(b), jax.random.fold_in(key, i))
        r["layouts"]["covariance_state"] = _layouts(state)
        cov = jax.jit(cov_stage.finalize, out_shardings=ex.shardings(jax.eval_shape(cov_stage.finalize, state)))(state)
        r["errors"]["A"] = _tree_rel(cov.A, ref["cov"].A)
        r["errors"]["S"] = _tree_rel(cov.S, ref["cov"].S)
        r["layouts"]["covariance"] = _layouts(cov)

        # eigendecomposition, from the single-device covariance
        _say(f"{name}: eigen")
        placed_cov = ex.place(ref["cov"])
        big = max(placed_cov.A.values(), key=lambda m: m.shape[-1])
        r["collectives"]["eigen"] = _collectives(eigh_program(mesh, big, "A").lower(big).compile())
        with mesh_lapack_threads(mesh):
            eigen = jax.block_until_ready(eigendecompose(placed_cov, mesh))
        r["errors"]["eigen"] = _tree_rel(eigen, ref["eigen"])
        r["layouts"]["eigen"] = _layouts(eigen)

        # Lambda, from the single-device eigenbasis
        _say(f"{name}: lambda")
        placed_eigen = ex.place(ref["eigen"])
        state = ex.init(lam_stage)
        up = ex.jit(lam_stage.update, donate_argnums=(0,), out_shardings=(ex.shardings(state), ex.rows()))
        r["collectives"]["lambda"] = _collectives(
            up.lower(state, params, placed_eigen, ex.put(host_batches[0]), key).compile()
        )
        for i, b in enumerate(host_batches):
            state, _ = up(state, params, placed_eigen, ex.put(b), jax.random.fold_in(key, 100 + i))
        lam_shardings = ex.shardings(
            jax.eval_shape(lam_stage.finalize, state), field_axes(curvature.LambdaState, "Lambda")
        )
        Lam = jax.jit(lam_stage.finalize, out_shardings=lam_shardings)(state)
        r["errors"]["Lambda"] = _tree_rel(Lam, ref["Lambda"])
        r["layouts"]["Lambda"] = _layouts({"Lambda": Lam})

        # query gradients, preconditioned by the single-device curvature
        _say(f"{name}: queries")
        pcurv = ex.place(curv)
        qput = ex.put_replicated(qhost)
        prep_fn = ex.jit(lambda p, b, c: stages.prepared_queries(task, layers, p, b, c, None, 4))  # layer by layer
        r["collectives"]["queries"] = _collectives(prep_fn.lower(params, qput, pcurv).compile())
        qg = prep_fn(params, qput, pcurv)
        qg = ex.place(qg)
        # the rank-4 factors are unique up to sign per singular vector: compare the products left @ right^T
        prod = lambda q: {
            k: np.einsum("...qor,...qir->...qoi", np.asarray(q.left[k]), np.asarray(q.right[k]))  # noqa: E731
            for k in q.left
        }
        r["errors"]["queries"] = max(
            _tree_rel(prod(qg), prod(ref["queries"])),
            _rel(qg.loss, ref["queries"].loss),
            _tree_rel(qg.full, ref["queries"].full) if qg.full else 0.0,
        )
        r["layouts"]["queries"] = _layouts(qg)
        # the other strategies (full rank): the streamed preparation on the mesh against prepare_queries on one device
        for strategy in ("identity", "diagonal", "kfac"):
            c1 = curvature.curvature(
                strategy, ref["eigen"], curvature.kfac_lambda(ref["eigen"]) if strategy == "kfac" else ref["Lambda"]
            )
            want = jax.jit(lambda G, l, c: scoring.prepare_queries(G, l, c, 0.01, None))(G, qloss, c1)
            got = ex.jit(lambda p, b, c: stages.prepared_queries(task, layers, p, b, c, 0.01, None))(
                params, qput, ex.place(c1)
            )
            r["errors"]["queries_" + strategy] = _tree_rel(got.full, want.full)

        # scores, against the single-device query gradients
        _say(f"{name}: scores")
        pq = ex.place(ref["queries"])  # stored over data too with fsdp, gathered one layer at a time
        fn = ex.jit(
            lambda p, q, b: score_step(p, q, b, fsdp=fsdp),
            out_shardings={"scores": ex.rows(2, last=True), "loss": ex.rows()},
        )
        r["collectives"]["scores"] = _collectives(fn.lower(params, pq, ex.put(host_batches[0])).compile())
        errs = []
        for b, want in zip(host_batches, ref["scores"]):
            got = fn(params, pq, ex.put(b))
            errs.append(_tree_rel(got, want))
            r["layouts"]["scores"] = _layouts(got)
        r["errors"]["scores"] = max(errs)
        r["layouts"]["params"] = _layouts(params)
        report["meshes"][name] = r
    Path(out).write_text(json.dumps(report, indent=1))


def biased_task(out: Path) -> None:
    """Lambda, query preparation and scores (with self-influence) of a Llama whose MLP layers have biases, on a
    2x4 mesh against one device. Its factors (``d_in + 1`` = 65 and 257 rows) are stored split along their 8
    layers, which the layer loops must slice without gathering the stack (:func:`jaxinf.sharding.partitioning.streamed`;
    at these sizes XLA warns when it gathers one)."""
    import dataclasses

    import jax

    from jaxinf import models
    from jaxinf.engine import capture, curvature, stages
    from jaxinf.run.executor import MeshExecutor
    from jaxinf.sharding.meshes import make_mesh

    lm = tiny_llama()
    lm = models.init(
        dataclasses.replace(lm.config, num_layers=8, hidden_size=64, intermediate_size=256, mlp_bias=True), 0
    )
    task = lm.task()
    dev = lambda b: {k: jax.numpy.asarray(v) for k, v in b.items()}  # noqa: E731
    batches, qhost = document_batches(2), query_batch()
    layers = capture.select_layers(
        capture.find_layers(lambda p, b, pr: task.train_loss(p, b, pr, None), lm.params, dev(batches[0])), "mlp"
    )
    key = jax.random.key(3)
    cov_stage, lam_stage = stages.covariance_stage(task, layers), stages.lambda_stage(task, layers)
    state = cov_stage.init()
    for i, b in enumerate(batches):
        state, _ = jax.jit(cov_stage.update)(state, lm.params, dev(b), jax.random.fold_in(key, i))
    eigen = jax.jit(curvature.eigendecompose)(cov_stage.finalize(state))

    def lam(ex, params, eig):
        st = ex.init(lam_stage) if ex else lam_stage.init()
        up = ex.jit(lam_stage.update) if ex else jax.jit(lam_stage.update)
        for i, b in enumerate(batches):
            st, _ = up(st, params, eig, ex.put(b) if ex else dev(b), jax.random.fold_in(key, 100 + i))
        return lam_stage.finalize(st)

    def rest(ex, params, curv, q):
        jit = ex.jit if ex else jax.jit
        qg = jit(lambda p, b, c: stages.prepared_queries(task, layers, p, b, c, None, None))(params, q, curv)
        if ex:
            qg = ex.place(qg)
        s, _ = jit(lambda p, g, c, b: stages.score_batch(task, layers, p, g, b, curv=c, damping_value=None))(
            params, qg, curv, ex.put(batches[0]) if ex else dev(batches[0])
        )
        return qg.full, s.total, s.self

    Lambda = lam(None, lm.params, eigen)
    curv = curvature.curvature("ekfac", eigen, Lambda)
    ref = rest(None, lm.params, curv, dev(qhost))

    mesh = make_mesh(2, 4)
    ex = MeshExecutor(mesh, batch_size=8)
    params = ex.place(lm.params, models.parameter_axes(lm.config))
    placed = ex.place(eigen)
    r = {"Q_A_spec": _layouts(placed)[".Q_A['model.layers.*.mlp.down_proj']"]["spec"], "errors": {}}
    r["errors"]["Lambda"] = _tree_rel(lam(ex, params, placed), Lambda)
    got = rest(ex, params, ex.place(curv), ex.put_replicated(qhost))
    for name, a, b in zip(("queries", "scores", "self"), got, ref):
        r["errors"][name] = _tree_rel(a, b)
    # rank-4 query gradients: their right factors [L, Q, d_in + 1, 4] are stored split along layers too
    q4 = jax.jit(lambda p, b, c: stages.prepared_queries(task, layers, p, b, c, None, 4))(lm.params, dev(qhost), curv)
    score4 = lambda p, g, b: stages.score_batch(task, layers, p, g, b)[0].total  # noqa: E731
    r["errors"]["scores_rank4"] = _tree_rel(
        ex.jit(score4)(params, ex.place(q4), ex.put(batches[0])), jax.jit(score4)(lm.params, q4, dev(batches[0]))
    )
    Path(out).write_text(json.dumps(r, indent=1))


def distributed_task(out: Path) -> None:
    """One process of a two-process ``jax.distributed`` run on localhost (one CPU device each, a 2 x 1 mesh with
    ``data`` across the processes), started by :func:`run_distributed` with ``JAXINF_TEST_COORDINATOR`` and
    ``JAXINF_TEST_PROCESS``: the processes initialize and compare their configs as ``jaxinf run`` does, each feeds
    its own rows of a batch, and the covariance (A and S reduced across the processes, sampled labels) and the
    scores (columns split across them) are compared with this process's own single-device result of the whole
    batch. A few seconds of work: the full pipeline on two processes is ``test_sharding_multiprocess.py``'s heavy
    test."""
    import os
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxinf import config as cfg
    from jaxinf.engine import capture, scoring, stages, testing
    from jaxinf.run.executor import MeshExecutor, covers_rows
    from jaxinf.sharding import meshes

    process = int(os.environ["JAXINF_TEST_PROCESS"])
    config = cfg.load(
        None,
        [
            f"mesh.coordinator={os.environ['JAXINF_TEST_COORDINATOR']}",
            "mesh.num_processes=2",
            f"mesh.process_id={process}",
            "mesh.data=2",
            "data.batch_size=2",
        ],
    )
    assert meshes.initialize(config.mesh)
    meshes.check_agreement(cfg.to_dict(config))
    _say(f"process {jax.process_index()} of {jax.process_count()}: initialized ({time.process_time():.1f} s CPU)")
    (whole,) = document_batches(1, batch=4, length=16)
    local = jax.local_devices()[0]
    on_local = lambda b: {k: jax.device_put(np.asarray(v), local) for k, v in b.items()}  # noqa: E731
    task = testing.tiny_lm_task()  # the engine's own tiny GPT: the least to compile
    shapes = jax.eval_shape(lambda: testing.tiny_lm_init(jax.random.key(0), vocab=64, n_layers=1, max_len=16))
    rng = np.random.default_rng(0)  # random weights made on the host: no eager op to compile
    host_params = jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
    params_local = jax.device_put(host_params, local)
    layers = capture.select_layers(
        capture.find_layers(lambda p, b, pr: task.train_loss(p, b, pr, None), params_local, on_local(whole)), "mlp"
    )
    key = jax.device_put(jax.random.key(3), local)
    mesh = meshes.make_mesh(2, 1)
    ex = MeshExecutor(mesh, batch_size=2)
    group = ex.groups[0]
    mine = {k: v[2 * group : 2 * group + 2] for k, v in whole.items()}  # this process's slice of the batch
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = meshes.put_tree(host_params, jax.tree.map(lambda _: replicated, host_params))
    r: dict = {"process": jax.process_index(), "processes": jax.process_count(), "group": group, "errors": {}}

    cov_stage = stages.covariance_stage(task, layers, "sampled")
    state = ex.init(cov_stage)
    up = ex.jit(cov_stage.update, donate_argnums=(0,), out_shardings=(ex.shardings(state), ex.rows()))
    state, _ = up(state, params, ex.put(mine), jax.random.key(3))  # uncommitted: the mesh's program takes it
    want, _ = jax.jit(cov_stage.update)(cov_stage.init(), params_local, on_local(whole), key)
    r["errors"]["A"] = _tree_rel({k: ex.fetch(v) for k, v in state.A.items()}, want.A)
    r["errors"]["S"] = _tree_rel({k: ex.fetch(v) for k, v in state.S.items()}, want.S)
    _say(f"process {process}: covariance ({time.process_time():.1f} s CPU)")

    # any query gradients will do (identity strategy): no program to make them
    qg = scoring.QueryGradients(
        full={k: rng.standard_normal(s.lead + (3, s.d_out, s.d_in_aug)).astype(np.float32) for k, s in layers.items()},
        left={},
        right={},
        loss=np.ones(3, np.float32),
    )
    step = stages.score_step(task, layers, self_influence=False, damping_value=None)
    got = ex.jit(step, out_shardings={"scores": ex.rows(2, last=True), "loss": ex.rows()})(
        params, ex.place(qg), None, ex.put(mine)
    )
    ref = jax.jit(step)(params_local, jax.device_put(qg, local), None, on_local(whole))
    r["errors"]["scores"] = _tree_rel({k: ex.fetch(v) for k, v in got.items()}, ref)
    _say(f"process {process}: scores ({time.process_time():.1f} s CPU)")

    # a per-row output's rows of this process's slice of the corpus (what it writes of the index): read from its own
    # devices when they hold them (rows over data), gathered and cut when they hold only some of their columns
    r["local"] = {}
    for name, spec in (("rows", ("data", None)), ("columns", (None, "data"))):
        made = jax.jit(
            lambda: jnp.arange(8.0).reshape(4, 2),
            out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)),
        )()
        r["local"][name] = [covers_rows(made.sharding, made.shape, mesh, 2), ex.local_rows(made).tolist()]
    r["writes_group"] = ex.writes_group

    # the index read by two processes: each one's slice of rows shared exactly, a damaged slice refused on both
    from jaxinf.run import index_run

    mine_rows = {
        "documents": np.arange(process + 1, dtype=np.int64),
        "scores": np.full((2, process + 1), 0.1 + process),
    }
    r["exchanged"] = [
        {k: v.tolist() for k, v in part.items()}
        for part in index_run._share({**mine_rows, "loss": np.zeros(process + 1)})
    ]
    try:
        index_run._share({"error": np.asarray("rows 4-8 damaged")} if process == 1 else mine_rows)
    except index_run.IndexError_ as e:
        r["refused"] = str(e)
    Path(out).write_text(json.dumps(r))


def lost_peer_task(out: Path) -> None:
    """Process 1 fails at once; process 0 waits for it in ``jax.distributed.initialize`` (the harness's own test)."""
    import os

    import jax

    if os.environ["JAXINF_TEST_PROCESS"] == "1":
        raise SystemExit("process 1: stopped on purpose")
    jax.distributed.initialize(coordinator_address=os.environ["JAXINF_TEST_COORDINATOR"], num_processes=2, process_id=0)


def run_distributed(task: str, outs: list[Path], timeout: float, devices: int = 1, grace: float = 10) -> list[dict]:
    """``task`` of this file as ``len(outs)`` processes of one ``jax.distributed`` run on localhost; their JSON reports.

    Fails naming each process that exited with an error (and its last lines), or, when ``timeout`` seconds pass,
    each process that had not finished (a process waiting in a collective for one that died names the dead one
    first: once a process fails, the others get ``grace`` seconds before they are stopped)."""
    import time

    env = device_env(devices)
    env["JAXINF_TEST_COORDINATOR"] = f"127.0.0.1:{free_port()}"
    procs = []
    for i, out in enumerate(outs):
        logs = open(Path(out).with_suffix(".log"), "w")
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, str(Path(__file__).resolve()), task, str(out)],
                    env={**env, "JAXINF_TEST_PROCESS": str(i)},
                    stdout=logs,
                    stderr=subprocess.STDOUT,
                    cwd=REPO,
                ),
                logs,
            )
        )
    start = time.monotonic()
    deadline = start + timeout
    try:
        while any(p.poll() is None for p, _ in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p, _ in procs):
                deadline = min(deadline, time.monotonic() + grace)
            time.sleep(0.1)
    finally:
        hung = [i for i, (p, _) in enumerate(procs) if p.poll() is None]
        for p, logs in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            logs.close()

    def tail(i: int) -> str:
        return "\n".join(Path(outs[i]).with_suffix(".log").read_text().splitlines()[-15:])

    failed = [i for i, (p, _) in enumerate(procs) if i not in hung and p.returncode != 0]
    problems = [f"process {i} of {len(outs)} exited with {procs[i][0].returncode}:\n{tail(i)}" for i in failed]
    problems += [
        f"process {i} of {len(outs)} hung: not finished {time.monotonic() - start:.0f} s after the start "
        f"(timeout {timeout:.0f} s); its last lines:\n{tail(i)}"
        for i in hung
    ]
    if problems:
        raise AssertionError("\n".join(problems))
    return [json.loads(Path(out).read_text()) for out in outs]


TASKS = {"stages": stages_task, "biased": biased_task, "distributed": distributed_task, "lost-peer": lost_peer_task}

if __name__ == "__main__":
    TASKS[sys.argv[1]](Path(sys.argv[2]))
