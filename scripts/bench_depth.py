"""Step memory against depth: what each added layer costs the covariance, Lambda and score steps.

The layer-streamed engine forms each layer's statistic inside the backward
pass, so at fixed width a step's temporaries should grow with depth only
through the residual stream that ``remat`` keeps per layer (``B x T x hidden``
values). This compiles every step of ``jaxinf plan`` (the same programs
``jaxinf run`` executes) for the same model at several depths, on one
simulated device of a 1 x 1 mesh, and prints XLA's temporaries per step and
the cost of each added layer in residual streams (``B T hidden x 4`` bytes),
beside the growth of the stage's own state (a new layer's A and S, or Lambda).

    python scripts/bench_depth.py configs/paper/command-r-35b_v5p-128.yaml [--layers 2 4 8] [key=value ...]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
os.environ.setdefault("JAX_PLATFORMS", "cpu")

GiB = 2**30


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--batch", type=int, help="documents per corpus slice (default: data.batch_size)")
    args = ap.parse_args(argv)

    from jaxinf import config as cfg
    from jaxinf.run import plan

    config = cfg.load(args.config, args.overrides)
    data, model = config.mesh.data, config.mesh.model
    plan.prepare_devices([(data, model)])

    import jax

    from jaxinf.sharding.meshes import make_mesh

    groups = plan.simulated_groups(data, model, config.plan.hosts)
    B = (args.batch or config.data.batch_size) * groups  # documents per step
    T = config.data.max_length
    mesh = make_mesh(data, model, jax.devices()[: data * model])
    rows = {}
    hidden = None
    for n in args.layers:
        lm, layers = plan.abstract_model(config, num_layers=n)
        hidden = lm.config.hidden_size
        for name, fn, fargs, _ in plan.step_programs(config, mesh, lm, layers, B):
            if name not in ("covariance", "lambda", "scores"):
                continue
            m = fn.lower(*fargs).compile().memory_analysis()
            rows.setdefault(name, []).append((n, m.temp_size_in_bytes, m.output_size_in_bytes))
            print(f"  {name}: {n} layers compiled (temporaries {m.temp_size_in_bytes / GiB:.3f} GiB)", file=sys.stderr)
    rows_per_device = max(B // data, 1)
    stream = rows_per_device * T * hidden * 4
    print(
        f"# step memory against depth: {config.model.checkpoint}, mesh {data}x{model}, {B} document(s) x {T} "
        f"tokens per step, remat={config.model.remat}, dtype={config.model.dtype}, track={config.factors.track}"
    )
    print(f"residual stream per device: {rows_per_device} x {T} x {hidden} x 4 bytes = {stream / 2**20:.1f} MiB\n")
    print("| step | layers | temporaries (GiB) | outputs (GiB) | temporaries per added layer (residual streams) |")
    print("|---|---|---|---|---|")
    for name, pts in rows.items():
        for i, (n, temp, out) in enumerate(pts):
            per = "-" if i == 0 else f"{(temp - pts[i - 1][1]) / (n - pts[i - 1][0]) / stream:.2f}"
            print(f"| {name} | {n} | {temp / GiB:.3f} | {out / GiB:.3f} | {per} |")


if __name__ == "__main__":
    main()
