"""The family registry: every family tested, strict refusals, GPT-2's bare checkpoints, `track: mlp`, run and plan.

Parity itself is in test_models_parity.py (every checkpoint of
``models_support.CHECKPOINTS`` at 1e-4 in float32 and 1e-10 in float64, each
feature a checkpoint exercises shown to matter); here: every registered family
has a checkpoint there, a checkpoint of one family renamed to another is
refused, `factors.track: mlp` means the same for every family, `jaxinf run`
works end to end on Phi-3 (Gemma 2 with -m heavy), and `jaxinf plan
--no-compile` fits the public shapes in configs/models/.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import test_models_checkpoint as checkpoint_tests  # its helpers (a module import: its tests are not collected twice)
from models_support import CHECKPOINTS, padded_batch

from jaxinf.engine import capture
from jaxinf.models import from_hf
from jaxinf.models.families import FAMILIES


def test_every_family_has_a_parity_checkpoint():
    assert set(FAMILIES) == {family for family, _, _ in CHECKPOINTS.values()}
    assert {"yarn", "dynamic", "longrope", "llama3"} <= {
        kwargs.get("rope_parameters", {}).get("rope_type") for _, kwargs, _ in CHECKPOINTS.values()
    }


def _rename(directory, tmp_path, architecture, model_type, drop=()):
    out = checkpoint_tests._copy(directory, tmp_path / f"{directory.name}-as-{model_type}")
    cfg = json.loads((out / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = [architecture], model_type
    for k in drop:
        cfg.pop(k, None)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_a_checkpoint_renamed_to_llama_is_refused(hf_checkpoint, tmp_path):
    """The workaround of renaming `architectures` loads nothing silently: the window or the biases are named."""
    mistral = _rename(hf_checkpoint("mistral"), tmp_path, "LlamaForCausalLM", "llama")
    assert checkpoint_tests._error(mistral) == (
        f"{mistral / 'config.json'}: field sliding_window is not implemented by jaxinf's llama "
        "(it may change the computation)"
    )
    qwen2 = _rename(hf_checkpoint("qwen2"), tmp_path, "LlamaForCausalLM", "llama")
    assert checkpoint_tests._error(qwen2).startswith(
        f"{qwen2 / 'config.json'}: field layer_types is not implemented by jaxinf's llama"
    )
    # with only the fields Llama knows left, the q/k/v biases are still refused
    qwen2 = _rename(
        hf_checkpoint("qwen2"),
        tmp_path / "bare",
        "LlamaForCausalLM",
        "llama",
        drop=("layer_types", "use_sliding_window", "sliding_window", "max_window_layers"),
    )
    message = checkpoint_tests._error(qwen2)
    assert message.startswith(f"{qwen2 / 'model.safetensors'}: tensor model.layers.0.self_attn.")
    assert ".bias is not used by jaxinf's llama model (and 5 more" in message


def test_gpt2_reads_a_bare_backbone_checkpoint(hf_checkpoint, tmp_path):
    """The original `gpt2` stores the backbone without its `transformer.` prefix (and causal-mask buffers)."""

    def strip(t):
        renamed = {k.removeprefix("transformer."): v for k, v in t.items()}
        t.clear()
        t.update(renamed, **{"h.0.attn.bias": np.tril(np.ones((1, 1, 16, 16), np.float32))})

    directory = checkpoint_tests._single_file(hf_checkpoint("gpt2"), tmp_path / "bare", strip)
    bare, _ = from_hf(directory, tokenizer=False)
    full, _ = from_hf(hf_checkpoint("gpt2"), tokenizer=False)
    assert bare.info["skipped_tensors"] == ["h.0.attn.bias"]
    b = padded_batch()
    np.testing.assert_array_equal(
        np.asarray(bare(jnp.asarray(b["tokens"]))), np.asarray(full(jnp.asarray(b["tokens"])))
    )


@pytest.mark.parametrize(
    "name,expected",
    [
        ("phi3", ["model.layers.*.mlp.gate_up_proj", "model.layers.*.mlp.down_proj"]),
        ("gpt2", ["transformer.h.*.mlp.c_fc", "transformer.h.*.mlp.c_proj"]),
        ("gemma2", ["model.layers.*.mlp.gate_proj", "model.layers.*.mlp.up_proj", "model.layers.*.mlp.down_proj"]),
    ],
)
def test_track_mlp_means_the_same_for_every_family(hf_checkpoint, name, expected):
    """`factors.track: mlp` selects the MLP's linear layers as stored (fused gate_up_proj tracked whole)."""
    lm, _ = from_hf(hf_checkpoint(name), tokenizer=False)
    batch = {k: jnp.asarray(v) for k, v in padded_batch().items()}
    layers = capture.find_layers(lambda p, bt, pr: lm.task().train_loss(p, bt, pr, None), lm.params, batch)
    mlp = capture.select_layers(layers, "mlp")
    assert list(mlp) == expected
    if name == "phi3":
        assert (mlp[expected[0]].d_in, mlp[expected[0]].d_out) == (32, 96)


@pytest.mark.parametrize(
    "name", ["phi3", pytest.param("gemma2", marks=pytest.mark.heavy), pytest.param("mixtral", marks=pytest.mark.heavy)]
)
def test_jaxinf_run_end_to_end(hf_checkpoint, tmp_path, name):
    """`jaxinf run` on a fused-projection, sliding-window family (and, with -m heavy, a soft-capped one and a
    mixture of experts): finite scores for every query and document, factors over the family's MLP layers."""
    from kronfluence_support import jaxinf_run

    rng = np.random.default_rng(0)
    docs, queries = tmp_path / "docs.jsonl", tmp_path / "queries.jsonl"
    with open(docs, "w") as f:
        for i in range(8):
            f.write(json.dumps({"id": f"d{i}", "text": " ".join(f"w{j}" for j in rng.integers(1, 50, 12))}) + "\n")
    with open(queries, "w") as f:
        for i in range(2):
            f.write(json.dumps({"id": f"q{i}", "prompt": f"w{i + 3} w{i + 5}", "completion": f"w{i + 7} w9"}) + "\n")
    out = tmp_path / "run"
    args = {
        "model.checkpoint": hf_checkpoint(name),
        "data.documents": docs,
        "data.queries": queries,
        "data.max_length": 12,
        "data.batch_size": 4,
        "scores.topk": 2,
        "run.out": out,
        "factors.strategy": "kfac",
    }
    run = jaxinf_run([f"{k}={v}" for k, v in args.items()])
    scores = np.load(run / "scores.npy")
    assert scores.shape == (2, 8) and np.isfinite(scores).all() and np.abs(scores).max() > 0
    names = json.loads((run / "layers.json").read_text())["names"]
    if name == "mixtral":  # the router and every expert's projections, per layer
        mlp = ["gate", *(f"experts.{e}.{p}_proj" for e in range(4) for p in ("gate", "up", "down"))]
        assert sorted(names) == sorted(f"model.layers.{i}.mlp.{p}" for i in range(2) for p in mlp)
        return
    mlp = {"phi3": ("gate_up", "down"), "gemma2": ("gate", "up", "down")}[name]
    assert names == [f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in mlp]


# config.json shapes of public checkpoints (configs/models/) and their parameter counts as published
PUBLIC = {
    "olmo-2-7b": ("olmo2", 7_298_617_344),
    "qwen2.5-7b": ("qwen2", 7_615_616_512),
    "llama-3.1-8b": ("llama", 8_030_261_248),
    "gemma-2-9b": ("gemma2", 9_241_705_984),
    "mistral-7b": ("mistral", 7_241_732_096),
}


@pytest.mark.parametrize("model", list(PUBLIC))
@pytest.mark.parametrize("host", ["8xh100", "v5p-32"])
def test_jaxinf_plan_no_compile_on_public_shapes(model, host, capsys):
    """`jaxinf plan --no-compile` on one 8-GPU host and one TPU slice: the plan fits, with the published size."""
    from pipeline_support import REPO

    from jaxinf import cli

    out = capsys.readouterr()
    assert cli.main(["plan", str(REPO / f"configs/plan/{model}_{host}.yaml"), "--no-compile"]) == 0
    out = capsys.readouterr().out
    family, parameters = PUBLIC[model]
    assert f"({family}, {parameters:,} parameters" in out
    assert "does not fit" not in out
