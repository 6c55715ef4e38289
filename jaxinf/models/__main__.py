"""``python -m jaxinf.models CHECKPOINT``: load a Hugging Face checkpoint and list its tracked layers.

A bad checkpoint gets one line on stderr naming the file and the tensor or
field, and exit status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import sys

from jaxinf.models.config import ModelError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxinf.models", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a Hugging Face directory: config.json, *.safetensors, tokenizer.json")
    parser.add_argument("--dtype", default="float32", help="compute and parameter dtype (default float32)")
    parser.add_argument("--no-scan", action="store_true", help="one parameter set per layer instead of stacked layers")
    args = parser.parse_args(argv)
    try:
        return _inspect(args)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _inspect(args) -> int:
    import jax
    import jax.numpy as jnp

    from jaxinf.engine import capture
    from jaxinf.models.hf import from_hf

    with jax.enable_x64(args.dtype == "float64"):
        lm, tok = from_hf(args.checkpoint, dtype=args.dtype, scan=not args.no_scan)
        c = lm.config
        print(
            f"{c.family}: {c.num_layers} layers, hidden {c.hidden_size}, vocab {c.vocab_size} "
            f"(tokenizer {tok.get_vocab_size(with_added_tokens=True)}), {lm.num_params:,} parameters, {c.dtype}"
        )
        task = lm.task()
        batch = {
            k: jnp.ones((1, 2), jnp.int32 if k == "tokens" else jnp.float32) for k in ("tokens", "mask", "weights")
        }
        layers = capture.find_layers(lambda p, b, pr: task.train_loss(p, b, pr, None), lm.params, batch)
        mlp = capture.select_layers(layers, "mlp")
        for name, spec in layers.items():
            mark = "mlp" if name in mlp else "   "
            print(f"  {mark} {name}  [{spec.d_out} x {spec.d_in_aug}]" + (f" x {spec.stack}" if spec.stacked else ""))
        if lm.info.get("skipped_tensors"):
            print(f"skipped buffers (recomputed, as transformers does): {', '.join(lm.info['skipped_tensors'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
