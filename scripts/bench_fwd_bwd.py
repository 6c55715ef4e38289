"""A plain forward and backward pass of one Llama in JAX and in torch, side by side in one process.

The baseline every stage of both jaxinf and kronfluence builds on: a jitted
``value_and_grad`` of jaxinf's Llama, with its linear layers as they are (one
``[batch * tokens, d_in]`` matrix product, ``capture.tokens_matmul``) and as a
plain batched ``jnp.matmul``, against transformers' ``LlamaForCausalLM`` (torch,
CPU) on the same shapes; and a 2048 x 2048 matrix product in XLA and in numpy
for the host's arithmetic rate. Medians of ``--repeats`` calls after a warm-up,
with the process's minor page faults per call. The script starts itself with
huge pages for glibc's large blocks as the ``jaxinf`` command does
(``jaxinf.hostenv.restart_with_huge_pages``); ``JAXINF_HOST_HEAP=default`` runs
it with glibc's own settings instead.

    python scripts/bench_fwd_bwd.py [--hidden 256] [--layers 4] [--vocab 4096] [--batch 8] [--seq 128]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def median_ms(fn, repeats: int) -> tuple[float, float]:
    """Median milliseconds of ``fn()`` after a warm-up call, and the minor page faults per call."""
    fn()
    times = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times), (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / repeats


def main(argv=None) -> None:
    from jaxinf.hostenv import HUGE_PAGES_TUNABLE, restart_with_huge_pages

    restart_with_huge_pages()  # as the jaxinf command does (JAXINF_HOST_HEAP=default: glibc's own heap)
    heap = HUGE_PAGES_TUNABLE + "=1" in os.environ.get("GLIBC_TUNABLES", "")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    from jaxinf import models
    from jaxinf.demo import train
    from jaxinf.engine import capture

    hf = train.hf_config(
        args.vocab,
        hidden=args.hidden,
        layers=args.layers,
        heads=4,
        kv_heads=4,
        intermediate=4 * args.hidden,
        max_positions=args.seq,
    )
    lm = models.init(dataclasses.replace(models.config_from_hf(hf), scan=True), 0)
    tokens_np = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq))
    tokens, mask = jnp.asarray(tokens_np), jnp.ones((args.batch, args.seq), jnp.float32)
    rows = []

    def jax_step():
        step = jax.jit(jax.value_and_grad(lambda p: jnp.mean(jax.nn.logsumexp(lm.apply(p, tokens, mask, None), -1))))
        return lambda: jax.block_until_ready(step(lm.params))

    rows.append(("JAX, linear layers as one [batch * tokens, d_in] product", median_ms(jax_step(), args.repeats)))
    merged = capture.tokens_matmul
    capture.tokens_matmul = lambda x, kernel: jnp.matmul(x, kernel)
    try:
        rows.append(("JAX, linear layers as a batched jnp.matmul", median_ms(jax_step(), args.repeats)))
    finally:
        capture.tokens_matmul = merged

    config = transformers.LlamaConfig(
        **{k: v for k, v in hf.items() if k not in ("architectures", "model_type", "torch_dtype")}
    )
    model = transformers.LlamaForCausalLM(config)
    tt = torch.tensor(tokens_np)

    def torch_step():
        model.zero_grad()
        torch.logsumexp(model(tt).logits, -1).mean().backward()

    rows.append((f"torch {torch.__version__} ({torch.get_num_threads()} threads)", median_ms(torch_step, args.repeats)))

    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    product = jax.jit(lambda x: x @ x)
    xla, _ = median_ms(lambda: jax.block_until_ready(product(a)), args.repeats)
    a_np = np.ones((n, n), np.float32)
    numpy_ms, _ = median_ms(lambda: a_np @ a_np, args.repeats)

    print(
        f"# forward+backward of a Llama (hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}), "
        f"batch {args.batch} x {args.seq}; jax {jax.__version__} on {jax.devices()[0].platform}; C heap: "
        f"{'huge pages (glibc.malloc.hugetlb=1)' if heap else 'glibc defaults'}\n"
    )
    print("| step | median ms | page faults per step |\n|---|---|---|")
    for name, (ms, faults) in rows:
        print(f"| {name} | {ms:.1f} | {faults:,.0f} |")
    flops = 2 * n**3
    print(
        f"\n{n} x {n} matrix product: XLA {flops / xla / 1e6:.0f} GFLOP/s, numpy {flops / numpy_ms / 1e6:.0f} GFLOP/s"
    )


if __name__ == "__main__":
    main()
