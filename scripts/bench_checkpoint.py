"""Peak host memory while loading a Hugging Face checkpoint with ``jaxinf.models.from_hf``.

Writes a synthetic Llama-shaped bfloat16 checkpoint (sharded safetensors with an
index, config.json, tokenizer.json; random weights, written tensor by tensor),
then loads it in fresh processes, one per case, and reports for each:

- ``baseline``: resident memory after importing jax and jaxinf.models;
- ``peak``: the process's maximum resident memory (``ru_maxrss``) after loading;
- ``model``: bytes of the loaded parameters (they live in host memory: CPU jax);
- ``overhead = peak - baseline - model``, next to the largest checkpoint tensor
  and the largest parameter (a stacked parameter holds ``num_layers`` tensors).

The target: overhead at most the largest tensor. The ``handed off`` rows use a
``place`` that drops each parameter after it is built (as when parameters go to
accelerators): their peak over baseline is the loader's own host working set.
With ``--transformers`` the same checkpoint is also loaded by
``transformers.AutoModelForCausalLM.from_pretrained`` (then every parameter is
read once, so its memory-mapped weights are resident) as a side-by-side reference.

    python scripts/bench_checkpoint.py [--layers 8 --hidden 2048 ...] [--transformers]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

MiB = 2**20


def rss() -> int:
    """Current resident set size in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------------------- writing a checkpoint


def llama_tensors(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a Llama checkpoint's tensors (Hugging Face layout: Linear weight ``[out, in]``)."""
    H, I, V, L = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    D = H // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * D
    out = [("model.embed_tokens.weight", (V, H))]
    for i in range(L):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (H,)),
            (p + "post_attention_layernorm.weight", (H,)),
            (p + "self_attn.q_proj.weight", (H, H)),
            (p + "self_attn.k_proj.weight", (kv, H)),
            (p + "self_attn.v_proj.weight", (kv, H)),
            (p + "self_attn.o_proj.weight", (H, H)),
            (p + "mlp.gate_proj.weight", (I, H)),
            (p + "mlp.up_proj.weight", (I, H)),
            (p + "mlp.down_proj.weight", (H, I)),
        ]
    return out + [("model.norm.weight", (H,)), ("lm_head.weight", (V, H))]


def write_checkpoint(directory: Path, c: dict, shard_bytes: int, seed: int = 0) -> None:
    """Writes bf16 shards by the safetensors format (header size, JSON header, data), one tensor in memory at a time."""
    import ml_dtypes
    from tokenizers import Tokenizer, models

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = llama_tensors(c)
    shards, current, size = [], [], 0
    for name, shape in tensors:
        nbytes = int(np.prod(shape)) * 2
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    shards.append(current)
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name, shape in shard:
            n = int(np.prod(shape)) * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = fname
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(directory / fname, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for name, shape in shard:
                scale = 1.0 if name.endswith("norm.weight") else 1 / np.sqrt(shape[-1])
                x = (scale * rng.standard_normal(shape, np.float32)).astype(ml_dtypes.bfloat16)
                f.write(x.tobytes())
                del x
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(
        json.dumps(
            {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16", **c}, indent=1
        )
    )
    vocab = {"[UNK]": 0, **{f"t{i}": i for i in range(1, 1000)}}
    Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")).save(str(directory / "tokenizer.json"))


# --------------------------------------------------------------------------- measuring (in a fresh process)


def measure(directory: str, dtype: str, scan: bool, handed_off: bool) -> dict:
    import jax
    import jax.numpy as jnp

    import jaxinf.models as models

    def drop(name, x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype)

    jnp.zeros(1).block_until_ready()
    base = rss()
    t = time.perf_counter()
    lm, _ = models.from_hf(directory, dtype=dtype, scan=scan, place=drop if handed_off else None)
    jax.block_until_ready(lm.params)
    seconds = time.perf_counter() - t
    largest_param = max(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(lm.params))
    return {
        "loader": "jaxinf, handed off" if handed_off else "jaxinf",
        "dtype": dtype,
        "scan": scan,
        "seconds": seconds,
        "baseline": base,
        "peak": peak_rss(),
        "final": rss(),
        "model": 0 if handed_off else lm.nbytes,
        "largest_param": largest_param,
    }


def measure_transformers(directory: str) -> dict:
    import torch
    import transformers

    torch.zeros(1)
    base = rss()
    t = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.sum()
    seconds = time.perf_counter() - t
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "loader": "transformers",
        "dtype": "bfloat16",
        "scan": None,
        "seconds": seconds,
        "baseline": base,
        "peak": peak_rss(),
        "final": rss(),
        "model": nbytes,
        "largest_param": None,
    }


def largest_tensor(directory: Path) -> int:
    from jaxinf.models.hf import tensor_index

    tensors, _ = tensor_index(directory)
    return max(info.end - info.start for info in tensors.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, help="checkpoint directory (written when absent; default: a temp dir)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--shard-mib", type=int, default=256)
    ap.add_argument("--transformers", action="store_true", help="also measure transformers' from_pretrained")
    ap.add_argument("--measure", nargs=4, metavar=("DIR", "DTYPE", "SCAN", "HANDOFF"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        d, dtype, scan, handoff = args.measure
        result = measure_transformers(d) if dtype == "transformers" else measure(d, dtype, scan == "1", handoff == "1")
        print(json.dumps(result))
        return

    directory = args.dir or Path(tempfile.mkdtemp()) / "ckpt"
    config = {
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    }
    if not (directory / "config.json").exists():
        t = time.perf_counter()
        write_checkpoint(directory, config, args.shard_mib * MiB)
        print(f"wrote {directory} in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    files = sorted(directory.glob("*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    big = largest_tensor(directory)
    print(
        f"checkpoint: Llama, {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, "
        f"vocab {args.vocab}; {len(files)} bf16 shards, {total / MiB:.0f} MiB; largest tensor {big / MiB:.0f} MiB\n"
    )
    cases = [(dt, scan, "0") for dt in ("bfloat16", "float32") for scan in ("1", "0")]
    cases += [("bfloat16", "1", "1"), ("bfloat16", "0", "1")]
    if args.transformers:
        cases.append(("transformers", "-", "0"))
    print(
        "| loader | dtype | layers | load s | baseline MiB | peak MiB | model MiB | overhead MiB "
        "| largest tensor MiB | largest param MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dtype, scan, handoff in cases:
        proc = subprocess.run(
            [sys.executable, __file__, "--measure", str(directory), dtype, scan, handoff],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if proc.returncode:
            sys.exit(proc.stderr)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        overhead = r["peak"] - r["baseline"] - r["model"]
        layout = "-" if r["scan"] is None else ("stacked" if r["scan"] else "per layer")
        lp = "-" if r["largest_param"] is None else f"{r['largest_param'] / MiB:.0f}"
        print(
            f"| {r['loader']} | {r['dtype']} | {layout} | {r['seconds']:.1f} | {r['baseline'] / MiB:.0f} "
            f"| {r['peak'] / MiB:.0f} | {r['model'] / MiB:.0f} | {overhead / MiB:.0f} | {big / MiB:.0f} | {lp} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
