"""Matmul precision of the statistics, emulated on the CPU: each accelerator mode against float64.

On a CPU every ``lax.Precision`` computes the same float32 product, so this
script emulates what an accelerator does with the operands of a float32 ``dot``
and measures the error it leaves in every statistic, against float64:

| mode | what a product sees | where |
|---|---|---|
| ``float32`` | operands in float32, float32 accumulation | ``highest`` on a GPU; ``highest`` (bf16x6) on a TPU, within float32 |
| ``bf16x3`` | ``x = hi + lo`` (both bfloat16), ``hi hi' + hi lo' + lo hi'``, float32 accumulation | ``high`` on a TPU |
| ``tf32`` | operands rounded to TF32 (10-bit mantissa), float32 accumulation | ``high`` (and XLA's default where allowed) on an A100/H100 |
| ``bf16`` | operands rounded to bfloat16 (one pass), float32 accumulation | ``default`` on a TPU |

A small Llama (random weights, tokens drawn from a Zipf law so the activations
are anisotropic, as a trained model's are) runs in float64; its tracked MLP
layers' inputs ``a`` and output gradients ``g`` are captured in the backward
pass (labels sampled for the curvature, the data's for the documents' scores,
the completion's for the queries). Every stage is then computed from them in
numpy with each mode's product for every contraction the engine makes (the
covariance sums, the rotations of Lambda's tokens, its sum over sequences, the
preconditioning, the per-document gradients and the scores), and everything
else (eigendecomposition, division, squares) in float32, as jaxinf does with
``run.precision: float32``. Printed: the relative (Frobenius) error of A, S,
Lambda, the preconditioned query gradients ``P(G_q)`` and the scores, each the
largest over the tracked layers (scores: the whole [queries, documents] matrix),
and the smallest per-query Spearman correlation of the scores with float64's.

    python scripts/precision_table.py [--hidden 256 --layers 2 --docs 32 --seq 64 --queries 8 --seed 0]
"""

from __future__ import annotations

import argparse
import json

import jax

jax.config.update("jax_enable_x64", True)

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

MODES = ("float64", "float32", "bf16x3", "tf32", "bf16")


def to_bf16(x: np.ndarray) -> np.ndarray:
    """``x`` rounded to bfloat16 (nearest, ties to even), returned in float64."""
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def to_tf32(x: np.ndarray) -> np.ndarray:
    """``x`` rounded to TF32 (float32's exponent, a 10-bit mantissa; nearest, ties to even), in float64."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    lsb = (u >> 13) & 1
    u = ((u + 0xFFF + lsb) & ~np.uint64(0x1FFF)) & 0xFFFFFFFF
    return u.astype(np.uint32).view(np.float32).astype(np.float64)


def product(mode: str):
    """``matmul(x, y)`` as ``mode`` computes it (see the module docstring); float32 results except float64's."""

    def f32(z):
        return np.asarray(z, np.float32).astype(np.float64)

    def mm(x, y):
        if mode == "float64":
            return np.matmul(x, y)
        if mode == "float32":
            return f32(np.matmul(np.asarray(x, np.float32), np.asarray(y, np.float32)))
        if mode == "bf16":
            return f32(np.matmul(to_bf16(x), to_bf16(y)))
        if mode == "tf32":
            return f32(np.matmul(to_tf32(x), to_tf32(y)))
        if mode == "bf16x3":
            xh, yh = to_bf16(x), to_bf16(y)
            xl, yl = to_bf16(f32(x) - xh), to_bf16(f32(y) - yh)
            return f32(np.matmul(xh, yh) + np.matmul(xh, yl) + np.matmul(xl, yh))
        raise ValueError(mode)

    return mm


def elementwise(mode: str):
    """The dtype of everything that is not a product: float64 for the reference, float32 otherwise."""
    return (
        (lambda z: np.asarray(z, np.float64))
        if mode == "float64"
        else (lambda z: np.asarray(z, np.float32).astype(np.float64))
    )


def captured(hidden: int, layers: int, docs: int, seq: int, queries: int, seed: int) -> dict:
    """``a`` and ``g`` of every tracked MLP layer, for fitting (sampled labels), documents and queries, in float64."""
    from jaxinf import models
    from jaxinf.demo import train
    from jaxinf.engine import capture, tasks

    vocab = 512
    hf = train.hf_config(
        vocab, hidden=hidden, layers=layers, heads=4, kv_heads=2, intermediate=hidden * 8 // 3, max_positions=seq
    )
    lm = models.init(models.config_from_hf(hf, dtype="float64", scan=False), seed)
    task = lm.task()
    rng = np.random.default_rng(seed)
    zipf = 1.0 / np.arange(1, vocab + 1) ** 1.1
    zipf /= zipf.sum()

    def sequences(n):
        return [rng.choice(vocab, size=seq, p=zipf).tolist() for _ in range(n)]

    doc_batch = tasks.lm_batch(sequences(docs))
    query_batch = tasks.lm_batch(sequences(queries), prompt_lengths=[seq // 2] * queries)
    tracked = capture.select_layers(
        capture.find_layers(lambda p, b, pr: task.train_loss(p, b, pr, None), lm.params, doc_batch), "mlp"
    )

    def keep(a, g, mask, context):
        return {"a": a, "g": g}

    def run(loss_fn, batch):
        stats, _ = jax.jit(lambda p, b: capture.layer_statistics(loss_fn, p, b, tracked, keep, mask=b["mask"]))(
            lm.params, batch
        )
        return {k: {n: np.asarray(v, np.float64) for n, v in s.items()} for k, s in stats.items()}

    key = jax.random.key(seed + 1)
    return {
        "fit": run(lambda p, b, pr: task.train_loss(p, b, pr, key), doc_batch),
        "docs": run(lambda p, b, pr: task.train_loss(p, b, pr, None), doc_batch),
        "queries": run(task.measurement, query_batch),
        "tokens": float(np.asarray(doc_batch["mask"]).sum()),
    }


def statistics(data: dict, mode: str) -> dict:
    """A, S, Lambda, P(G_q) per layer and the scores, every product by ``mode``."""
    mm, el = product(mode), elementwise(mode)
    eigh = (
        np.linalg.eigh
        if mode == "float64"
        else (lambda M: tuple(np.asarray(r, np.float64) for r in np.linalg.eigh(np.asarray(M, np.float32))))
    )
    out = {"A": {}, "S": {}, "Lambda": {}, "P": {}}
    scores = 0.0
    for name in data["fit"]:
        a, g = data["fit"][name]["a"], data["fit"][name]["g"]  # [N, T, d]
        N, T = a.shape[:2]
        a2, g2 = a.reshape(N * T, -1), g.reshape(N * T, -1)
        A = el(mm(a2.T, a2) / data["tokens"])  # covariance_statistic
        S = el(mm(g2.T, g2) / data["tokens"])
        eA, QA = eigh(el((A + A.T) / 2))
        eS, QS = eigh(el((S + S.T) / 2))
        ar, gr = mm(a2, QA).reshape(N, T, -1), mm(g2, QS).reshape(N, T, -1)  # rotated_gradient
        R = np.stack([mm(gr[n].T, ar[n]) for n in range(N)])  # [N, d_out, d_in]
        Lam = el(mm(np.ones((1, N)), el(R * R).reshape(N, -1)).reshape(R.shape[1:]) / N)  # sum_over_sequences
        damp = 0.1 * Lam.mean()
        qa, qg = data["queries"][name]["a"], data["queries"][name]["g"]
        Gq = np.stack([mm(qg[q].T, qa[q]) for q in range(qa.shape[0])])  # per_sequence_gradient
        P = np.stack([mm(mm(QS, el(mm(mm(QS.T, G), QA) / (Lam + damp))), QA.T) for G in Gq])  # precondition
        da, dg = data["docs"][name]["a"], data["docs"][name]["g"]
        Gd = np.stack([mm(dg[n].T, da[n]) for n in range(da.shape[0])])
        scores = scores + mm(P.reshape(P.shape[0], -1), Gd.reshape(Gd.shape[0], -1).T)  # block_scores
        out["A"][name], out["S"][name], out["Lambda"][name], out["P"][name] = A, S, Lam, P
    out["scores"] = el(scores)
    return out


def rel(x, ref) -> float:
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def spearman(x, y) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--docs", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the table as JSON here")
    args = ap.parse_args()
    data = captured(args.hidden, args.layers, args.docs, args.seq, args.queries, args.seed)
    ref = statistics(data, "float64")
    rows = {}
    for mode in MODES[1:]:
        got = statistics(data, mode)
        row = {k: max(rel(got[k][n], ref[k][n]) for n in ref[k]) for k in ("A", "S", "Lambda", "P")}
        row["scores"] = rel(got["scores"], ref["scores"])
        row["spearman"] = min(spearman(got["scores"][q], ref["scores"][q]) for q in range(ref["scores"].shape[0]))
        rows[mode] = row
    print(
        f"Llama hidden {args.hidden}, {args.layers} layers, MLP layers tracked; {args.docs} documents x "
        f"{args.seq} tokens, {args.queries} queries; relative error against float64 (largest over layers)\n"
    )
    print("| mode | A | S | Lambda | P(G_q) | scores | min Spearman |")
    print("|---|---|---|---|---|---|---|")
    for mode, r in rows.items():
        print(
            f"| {mode} | {r['A']:.1e} | {r['S']:.1e} | {r['Lambda']:.1e} | {r['P']:.1e} | {r['scores']:.1e} | "
            f"{r['spearman']:.6f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
