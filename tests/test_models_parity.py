"""Logit and per-token-loss parity of jaxinf.models against transformers (torch, CPU).

Tolerances (fixed): max abs difference <= 1e-4 in float32 and <= 1e-10 in
float64, over the real tokens of a right-padded batch, for every family and
variant in ``models_support.CHECKPOINTS`` (grouped-query attention, partial
rotary, parallel and sequential residuals, tied embeddings, logit scale, q/k
norm, llama3 rope scaling, sharded safetensors, legacy config.json layouts).
The float32 oracle is transformers unchanged; the float64 oracle is
transformers with its internal float32 upcasts made float64
(``models_support.float64_transformers``). In float32, switching off each
feature a checkpoint exercises (``FEATURES``: a sliding window, a soft-cap, a
rope scaling, ...) must move the logits more than 1e-2 away from transformers'.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import oracle
from models_support import CHECKPOINTS, hf_logits, hf_token_losses, padded_batch

from jaxinf.engine import tasks
from jaxinf.models import LM, abstract, from_hf

TOLERANCE = {"float32": 1e-4, "float64": 1e-10}

# checkpoint -> config changes that each switch off one feature its test exercises: each must move the
# logits away from transformers' by more than 1e-2 (in float32), so that parity at 1e-4 is not vacuous
FEATURES = {
    "mistral": [{"sliding_window": None, "layer_types": None}],
    "qwen2": [{"sliding_window": None, "layer_types": None}],
    "gemma2": [
        {"attn_softcap": None},
        {"final_softcap": None},
        {"query_pre_attn_scalar": None},
        {"sliding_window": None, "layer_types": None},
    ],
    "gemma3": [{"sliding_rope_theta": None}],
    "olmo": [{"clip_qkv": None}],
    "olmo3": [{"sliding_window": None, "layer_types": None}],
    "phi3": [{"sliding_window": None, "layer_types": None}, {"rotary_dim": 8}],
    "cohere2": [{"rope_layers": None}],
    "smollm3": [{"rope_layers": None}],
    "qwen2_yarn": [{"rope_type": "default"}, {"rope_attention_factor": 1.0}],
    "llama_dynamic": [{"rope_type": "default"}],
    "phi3_longrope": [{"rope_original_max_position": 64}],  # the short factors
    "qwen3_moe": [{"moe_renormalize": True}],
    "olmoe": [{"clip_qkv": None}],
}


def _jax_batch(b):
    return {k: jnp.asarray(v) for k, v in b.items()}


@pytest.mark.parametrize("precision", ["float32", "float64"])
@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_logits_and_token_losses_match_transformers(hf_checkpoint, name, precision):
    directory = hf_checkpoint(name)
    b = padded_batch()
    tol = TOLERANCE[precision]
    with jax.enable_x64(precision == "float64"):
        lm, _ = from_hf(directory, dtype=precision)
        assert lm.info["skipped_tensors"] == []
        batch = _jax_batch(b)
        logits = jax.jit(lm.apply)(lm.params, batch["tokens"], batch["mask"])
        assert logits.dtype == jnp.dtype(precision)
        losses = np.asarray(tasks.next_token_losses(logits, batch, None))
        logits = np.asarray(logits)
    ref = hf_logits(directory, b["tokens"], b["mask"], float64=precision == "float64")
    real = b["mask"] > 0
    logit_diff = np.abs(logits - ref)[real].max()
    ref_losses = hf_token_losses(ref, b["tokens"], b["weights"])
    loss_diff = np.abs(losses - ref_losses).max()
    print(f"{name} {precision}: max |logit diff| {logit_diff:.2e}, max |token loss diff| {loss_diff:.2e}")
    assert logit_diff <= tol
    assert loss_diff <= tol
    assert np.abs(ref[real]).max() > 0.5  # the comparison is not between near-zero logits
    if precision == "float32":
        for change in FEATURES.get(name, []):
            without = lm.config.replace(**change)
            other = jax.jit(LM(without, abstract(without).graphdef, lm.params).apply)(
                lm.params, batch["tokens"], batch["mask"]
            )
            assert np.abs(np.asarray(other) - ref)[real].max() > 1e-2, change


@pytest.mark.parametrize("name", ["llama", "gpt_neox", "cohere"])
def test_right_padding_leaves_real_tokens_unchanged(hf_checkpoint, name):
    """Each row of a padded batch has the logits of its sequence run alone (float64, 1e-12)."""
    b = padded_batch()
    with jax.enable_x64(True):
        lm, _ = from_hf(hf_checkpoint(name), dtype="float64", tokenizer=False)
        padded = np.asarray(lm(jnp.asarray(b["tokens"]), jnp.asarray(b["mask"])))
        for i, n in enumerate(b["mask"].sum(1).astype(int)):
            alone = np.asarray(lm(jnp.asarray(b["tokens"][i : i + 1, :n])))
            assert np.abs(padded[i, :n] - alone[0]).max() <= 1e-12


def test_bfloat16_checkpoint(hf_checkpoint):
    """A bfloat16 checkpoint: exact bf16 parameters, float32 parity with transformers' upcast, bf16 compute."""
    torch = oracle("torch")
    transformers = oracle("transformers")
    directory = hf_checkpoint("cohere", dtype="bfloat16")
    b = padded_batch()
    real = b["mask"] > 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    embed = hf.state_dict()["model.embed_tokens.weight"].float().numpy()
    up = hf.state_dict()["model.layers.2.mlp.up_proj.weight"].float().numpy()

    lm16, _ = from_hf(directory, dtype="bfloat16")
    params = lm16.params["model"]
    assert params["embed_tokens"]["embedding"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(params["embed_tokens"]["embedding"], np.float32), embed)
    np.testing.assert_array_equal(np.asarray(params["layers"]["mlp"]["up_proj"]["kernel"][2], np.float32), up.T)

    lm32, _ = from_hf(directory, dtype="float32")
    logits32 = np.asarray(lm32(jnp.asarray(b["tokens"]), jnp.asarray(b["mask"])))
    ref = hf_logits(directory, b["tokens"], b["mask"])  # transformers upcasts the bf16 weights to float32
    assert np.abs(logits32 - ref)[real].max() <= TOLERANCE["float32"]

    # bf16 compute: a sanity bound (bf16 has 8 significant bits), not a parity claim
    logits16 = np.asarray(lm16(jnp.asarray(b["tokens"]), jnp.asarray(b["mask"])), np.float32)
    assert np.isfinite(logits16).all()
    assert np.abs(logits16 - logits32)[real].max() <= 0.05 * np.abs(logits32[real]).max()


def test_float32_parameters_float64_compute_is_rejected_without_x64(hf_checkpoint):
    from jaxinf.models import CheckpointError

    with jax.enable_x64(False), pytest.raises(CheckpointError, match="float64 needs 64-bit jax"):
        from_hf(hf_checkpoint("llama"), dtype="float64")
