"""Tiny random Hugging Face checkpoints and the transformers oracle for the model tests.

Every checkpoint is built here with ``XxxConfig(...)`` + ``XxxForCausalLM(config)``
+ ``save_pretrained`` (nothing is downloaded). Weights are redrawn at unit scale
(``weight ~ N(0, 1/fan_in)``, embeddings ``N(0, 1)``, norm weights ``1 + N(0, 0.2^2)``,
biases ``N(0, 0.2^2)``) so that logits are O(1) and every component matters.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np
from conftest import oracle

VOCAB = 61
TOKENIZER_TOKENS = 50  # fewer than VOCAB: checkpoints may pad the embedding beyond the tokenizer

_BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4)
_TWO = dict(_BASE, num_hidden_layers=2)

# name -> (transformers family, config kwargs, save_pretrained max_shard_size or None)
# Checkpoints in LEGACY get their config.json rewritten in the transformers 4 layout
# (rope_theta / rope_scaling / rotary_pct / rotary_emb_base instead of rope_parameters),
# which transformers 5 still reads: both sides must interpret it the same way.
CHECKPOINTS = {
    # grouped-query attention, separate lm_head, sharded safetensors with an index
    "llama": (
        "llama",
        dict(
            _BASE,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        "40KB",
    ),
    # explicit head_dim != hidden/heads, biases, tied embeddings, llama3 rope scaling, tanh gelu
    "llama_variant": (
        "llama",
        dict(
            _BASE,
            num_key_value_heads=1,
            head_dim=12,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
            hidden_act="gelu_pytorch_tanh",
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
        None,
    ),
    # parallel residual, partial rotary (half of each head)
    "gpt_neox": ("gpt_neox", dict(_BASE, rotary_pct=0.5, use_parallel_residual=True), None),
    # sequential residual, a quarter of each head rotated, sharded
    "gpt_neox_sequential": ("gpt_neox", dict(_BASE, use_parallel_residual=False), "40KB"),
    # grouped-query attention, tied embeddings, logit scale, sharded
    "cohere": (
        "cohere",
        dict(
            _BASE,
            num_key_value_heads=2,
            logit_scale=0.25,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
        ),
        "40KB",
    ),
    # per-head q/k LayerNorm (Command R+), untied head
    "cohere_qk_norm": (
        "cohere",
        dict(
            _BASE,
            num_key_value_heads=4,
            use_qk_norm=True,
            tie_word_embeddings=False,
            logit_scale=0.5,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        None,
    ),
    # ---- the families added with the registry: 2 layers, sequences (11 tokens) longer than the windows (4)
    # sliding window on every layer
    "mistral": ("mistral", dict(_TWO, num_key_value_heads=2, sliding_window=4), None),
    # q/k/v biases (not o), layer 1 sliding (use_sliding_window from max_window_layers on)
    "qwen2": (
        "qwen2",
        dict(_TWO, num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=1),
        None,
    ),
    # per-head q/k RMSNorms, explicit head_dim, biases everywhere
    "qwen3": ("qwen3", dict(_TWO, num_key_value_heads=2, head_dim=12, attention_bias=True), None),
    # (1 + w) RMSNorms, sqrt(hidden) embedding scale, GeGLU, tied head, multi-query
    "gemma": ("gemma", dict(_TWO, num_key_value_heads=1, head_dim=8), None),
    # sandwich norms, attention and final soft-caps, query_pre_attn_scalar, sliding then full layer
    "gemma2": (
        "gemma2",
        dict(
            _TWO,
            num_key_value_heads=2,
            head_dim=8,
            query_pre_attn_scalar=6,
            sliding_window=4,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
        ),
        None,
    ),
    # q/k norms, local rope base on the sliding layer, linearly scaled global rope on the full one
    "gemma3": (
        "gemma3",
        dict(
            _TWO,
            num_key_value_heads=2,
            head_dim=8,
            query_pre_attn_scalar=8,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
            },
        ),
        None,
    ),
    # non-parametric LayerNorms, clip_qkv (active at unit-scale weights)
    "olmo": ("olmo", dict(_TWO, clip_qkv=0.5, pad_token_id=0), None),
    # post-norms, q/k RMSNorms over the whole projections
    "olmo2": ("olmo2", dict(_TWO, num_key_value_heads=2, pad_token_id=0), None),
    # OLMo 2 with a sliding layer
    "olmo3": (
        "olmo3",
        dict(
            _TWO,
            num_key_value_heads=2,
            pad_token_id=0,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
        ),
        None,
    ),
    # Conv1D weights [d_in, d_out], learned positions, tied head
    "gpt2": ("gpt2", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=16, n_inner=48), None),
    # fused qkv_proj and gate_up_proj, partial rotary, sliding window
    "phi3": (
        "phi3",
        dict(
            _TWO,
            num_key_value_heads=2,
            sliding_window=4,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        ),
        None,
    ),
    # a sliding layer with interleaved rotary and a full layer without rotary
    "cohere2": (
        "cohere2",
        dict(
            _TWO,
            num_key_value_heads=2,
            sliding_window=4,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            layer_types=["sliding_attention", "full_attention"],
        ),
        None,
    ),
    # LayerNorms with bias, a quarter of each head rotated, q/k/v biases, grouped-query attention
    "stablelm": (
        "stablelm",
        dict(_TWO, num_key_value_heads=2, use_qkv_bias=True, bos_token_id=1, eos_token_id=2),
        None,
    ),
    # a layer without rotary embedding
    "smollm3": (
        "smollm3",
        dict(_TWO, num_key_value_heads=2, no_rope_layers=[1, 0], pad_token_id=0, bos_token_id=1, eos_token_id=2),
        None,
    ),
    # mixture of 4 experts, 2 per token, with a sliding window
    "mixtral": (
        "mixtral",
        dict(_TWO, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, sliding_window=4),
        None,
    ),
    # Qwen3's attention, 4 experts of 20 features, 2 per token, probabilities not renormalized
    "qwen3_moe": (
        "qwen3_moe",
        dict(
            _TWO,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=20,
            norm_topk_prob=False,
        ),
        None,
    ),
    # whole-projection q/k norms then clip_qkv, renormalized top-2 of 4 experts
    "olmoe": (
        "olmoe",
        dict(_TWO, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, clip_qkv=0.5, pad_token_id=0),
        None,
    ),
    # multi-query attention in a fused c_attn (nn.Linear), learned positions, tied head
    "gpt_bigcode": (
        "gpt_bigcode",
        dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=16, n_inner=48),
        None,
    ),
    # ---- rope scalings where these families use them (the 11-token test sequence exceeds each original context)
    # YaRN (Qwen2.5 long context): blended frequencies and the attention temperature on cos/sin
    "qwen2_yarn": (
        "qwen2",
        dict(
            _TWO,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=32,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 8,
                "beta_fast": 8.0,
            },
        ),
        None,
    ),
    # dynamic NTK: the base grows with a sequence longer than max_position_embeddings
    "llama_dynamic": (
        "llama",
        dict(
            _TWO,
            max_position_embeddings=8,
            rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
        ),
        None,
    ),
    # longrope (Phi-3 128k): the long factors beyond original_max_position_embeddings
    "phi3_longrope": (
        "phi3",
        dict(
            _TWO,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            max_position_embeddings=64,
            original_max_position_embeddings=8,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "long_factor": [1.0, 1.5, 3.0, 7.0],
                "short_factor": [1.0, 1.1, 1.2, 1.3],
            },
        ),
        None,
    ),
}

LEGACY = {
    "llama_variant": {
        "rope_theta": 10000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    },
    "gpt_neox_sequential": {"rotary_pct": 0.25, "rotary_emb_base": 500.0},
}

_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", "llama.modeling_llama"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", "gpt_neox.modeling_gpt_neox"),
    "cohere": ("CohereConfig", "CohereForCausalLM", "cohere.modeling_cohere"),
    "mistral": ("MistralConfig", "MistralForCausalLM", "mistral.modeling_mistral"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "qwen2.modeling_qwen2"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "qwen3.modeling_qwen3"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", "gemma.modeling_gemma"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", "gemma2.modeling_gemma2"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", "gemma3.modeling_gemma3"),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", "olmo.modeling_olmo"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", "olmo2.modeling_olmo2"),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", "olmo3.modeling_olmo3"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", "gpt2.modeling_gpt2"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", "phi3.modeling_phi3"),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", "cohere2.modeling_cohere2"),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", "stablelm.modeling_stablelm"),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", "smollm3.modeling_smollm3"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", "mixtral.modeling_mixtral"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", "qwen3_moe.modeling_qwen3_moe"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", "olmoe.modeling_olmoe"),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", "gpt_bigcode.modeling_gpt_bigcode"),
}


def randomize(model, seed: int = 0) -> None:
    """Redraws every parameter at unit scale (see the module docstring)."""
    torch = oracle("torch")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if "norm" in name or ".ln_" in name:
                value = 1.0 + 0.2 * noise if name.endswith("weight") else 0.2 * noise
            elif name.endswith("bias"):
                value = 0.2 * noise
            elif ("embed" in name and "embed_out" not in name) or ".wte." in name or ".wpe." in name:
                value = noise
            else:
                value = noise / math.sqrt(p.shape[-1])
            p.copy_(value.to(p.dtype))


def write_tokenizer(directory: Path, n_tokens: int = TOKENIZER_TOKENS) -> None:
    """A word-level ``tokenizer.json`` with ``n_tokens`` ids (``[UNK]`` and ``w1`` ... ``w{n-1}``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, n_tokens)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))


def hf_model(name: str, seed: int = 0):
    """A randomized transformers model of checkpoint ``name`` (float32, eval mode)."""
    transformers = oracle("transformers")
    family, kwargs, _ = CHECKPOINTS[name]
    config_cls, model_cls, _ = _CLASSES[family]
    config = getattr(transformers, config_cls)(**kwargs)
    model = getattr(transformers, model_cls)(config).eval()
    randomize(model, seed)
    return model


def save_checkpoint(name: str, directory: Path, *, dtype=None, seed: int = 0) -> Path:
    """Saves the randomized model ``name`` (optionally cast, e.g. to bfloat16) with its tokenizer."""
    model = hf_model(name, seed)
    if dtype is not None:
        model = model.to(dtype)
    shard = CHECKPOINTS[name][2]
    model.save_pretrained(directory, **({"max_shard_size": shard} if shard else {}))
    if name in LEGACY:
        cfg = config_json(directory)
        del cfg["rope_parameters"]
        cfg.update(LEGACY[name])
        (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    write_tokenizer(directory)
    return directory


@contextlib.contextmanager
def float64_transformers():
    """Runs transformers' model code with its float32 upcasts made float64 upcasts.

    transformers computes norms, the attention softmax and the rotary tables
    in float32 even in a ``.double()`` model (explicit ``.float()``,
    ``torch.float32`` and ``dtype=torch.float``), which limits its agreement
    with any float64 computation to ~1e-7. For the float64 oracle, each model
    module's ``torch`` is replaced by a view of torch in which ``float32`` and
    ``float`` are ``float64``, ``Tensor.float`` converts to float64, and the
    default dtype (of tensors made from Python floats) is float64; the model
    code itself is unchanged.
    """
    torch = oracle("torch")
    import importlib

    class Torch64:
        float32 = torch.float64
        float = torch.float64

        def __getattr__(self, name):
            return getattr(torch, name)

    modules = [importlib.import_module(f"transformers.models.{m}") for _, _, m in _CLASSES.values()]
    modules.append(importlib.import_module("transformers.modeling_rope_utils"))
    saved = [(m, m.torch) for m in modules]
    to_float = torch.Tensor.float
    default = torch.get_default_dtype()
    try:
        for m in modules:
            m.torch = Torch64()
        torch.Tensor.float = lambda self, *args, **kwargs: self.to(torch.float64)
        torch.set_default_dtype(torch.float64)  # tensors made from Python floats (dynamic rope's base)
        yield
    finally:
        torch.set_default_dtype(default)
        torch.Tensor.float = to_float
        for m, t in saved:
            m.torch = t


def hf_logits(directory: Path, tokens: np.ndarray, mask: np.ndarray, float64: bool = False) -> np.ndarray:
    """transformers' logits for a saved checkpoint (eager attention and experts; float64 through
    :func:`float64_transformers`)."""
    torch = oracle("torch")
    transformers = oracle("transformers")
    ctx = float64_transformers() if float64 else contextlib.nullcontext()
    with ctx, torch.no_grad():
        moe = (
            {"experts_implementation": "eager"}
            if {"num_local_experts", "num_experts"} & set(config_json(Path(directory)))
            else {}
        )
        model = transformers.AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch.float64 if float64 else torch.float32, attn_implementation="eager", **moe
        ).eval()
        out = model(
            input_ids=torch.tensor(np.asarray(tokens), dtype=torch.long),
            attention_mask=torch.tensor(np.asarray(mask), dtype=torch.long),
        ).logits
    return out.numpy()


def hf_token_losses(logits: np.ndarray, tokens: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """torch's cross-entropy of next tokens, weighted like ``jaxinf.engine.tasks.next_token_losses`` (last position 0)."""
    torch = oracle("torch")
    lg = torch.tensor(logits[:, :-1])
    ce = (
        torch.nn.functional.cross_entropy(
            lg.reshape(-1, lg.shape[-1]), torch.tensor(tokens[:, 1:]).reshape(-1).long(), reduction="none"
        )
        .reshape(lg.shape[:2])
        .numpy()
    )
    out = np.zeros(tokens.shape, ce.dtype)
    out[:, :-1] = ce * weights[:, 1:]
    return out


def padded_batch(seed: int = 0, lengths=(11, 7, 4), vocab: int = VOCAB) -> dict[str, np.ndarray]:
    """A right-padded document batch (pad id 0) as numpy arrays: tokens, mask, weights."""
    rng = np.random.default_rng(seed)
    T = max(lengths)
    tokens = np.zeros((len(lengths), T), np.int32)
    mask = np.zeros((len(lengths), T), np.float32)
    for i, n in enumerate(lengths):
        tokens[i, :n] = rng.integers(1, vocab, n)
        mask[i, :n] = 1
    weights = mask.copy()
    weights[:, 0] = 0
    return {"tokens": tokens, "mask": mask, "weights": weights}


def config_json(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())
