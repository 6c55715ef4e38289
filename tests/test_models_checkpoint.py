"""Checkpoint import: safetensors reading, placement, config.json layouts, and one-line errors for bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from models_support import LEGACY, write_tokenizer

from jaxinf.models import CheckpointError, ModelError, from_hf, parameter_paths, read_config
from jaxinf.models import __main__ as cli
from jaxinf.models.config_json import config_from_hf
from jaxinf.models.hf import read_converted, read_header, read_tensor, tensor_index
from jaxinf.sharding.axes import Axes


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _save_safetensors(file: Path, tensors: dict[str, np.ndarray]) -> None:
    """Writes a safetensors file by the format's definition (so bf16 can be written without torch)."""
    codes = {
        np.dtype("<f4"): "F32",
        np.dtype("<f2"): "F16",
        np.dtype(ml_dtypes.bfloat16): "BF16",
        np.dtype("<i8"): "I64",
    }
    header, offset, blobs = {}, 0, []
    for name, x in tensors.items():
        data = np.ascontiguousarray(x).tobytes()
        header[name] = {
            "dtype": codes[np.dtype(x.dtype)],
            "shape": list(x.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
        blobs.append(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    file.write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))


def _load_all(directory: Path) -> dict[str, np.ndarray]:
    tensors, _ = tensor_index(directory)
    out = {}
    for name, info in tensors.items():
        with open(info.file, "rb") as f:
            out[name] = read_tensor(info, f)
    return out


def _single_file(src: Path, dst: Path, edit) -> Path:
    """A copy of checkpoint ``src`` as one model.safetensors whose tensors went through ``edit(dict)``."""
    dst.mkdir()
    for f in ("config.json", "tokenizer.json"):
        shutil.copy(src / f, dst / f)
    tensors = _load_all(src)
    edit(tensors)
    _save_safetensors(dst / "model.safetensors", tensors)
    return dst


# --------------------------------------------------------------------------- reading and placing


def test_safetensors_reader_matches_the_safetensors_library(hf_checkpoint):
    safetensors = pytest.importorskip("safetensors.numpy")
    directory = hf_checkpoint("gpt_neox")
    ours = _load_all(directory)
    theirs = safetensors.load_file(str(directory / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    for k in ours:
        np.testing.assert_array_equal(ours[k], theirs[k])


def test_reader_handles_bfloat16_and_checks_offsets(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(3, 4).astype(ml_dtypes.bfloat16)
    _save_safetensors(tmp_path / "a.safetensors", {"x": x, "y": np.ones(5, np.float16)})
    info = read_header(tmp_path / "a.safetensors")
    with open(tmp_path / "a.safetensors", "rb") as f:
        got = read_tensor(info["x"], f)
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got, x)
    raw = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "b.safetensors").write_bytes(raw[:-4])
    with pytest.raises(CheckpointError, match=r"b\.safetensors: tensor y has data offsets"):
        read_header(tmp_path / "b.safetensors")
    (tmp_path / "c.safetensors").write_bytes(b"\xff" * 8 + raw[8:])
    with pytest.raises(CheckpointError, match=r"c\.safetensors: not a safetensors file"):
        read_header(tmp_path / "c.safetensors")


@pytest.mark.parametrize("chunk", [1, 24, 10**6])
def test_converted_reads_in_blocks(tmp_path, chunk):
    """Transposed and converted reads give ``weight.T`` in the target dtype, whatever the block size (bytes)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((7, 5)).astype(ml_dtypes.bfloat16)
    v = rng.standard_normal(9).astype(np.float32)
    _save_safetensors(tmp_path / "a.safetensors", {"w": w, "v": v})
    info = read_header(tmp_path / "a.safetensors")
    with open(tmp_path / "a.safetensors", "rb") as f:
        out = np.full((5, 7), np.nan, np.float32)
        read_converted(info["w"], f, out, transpose=True, chunk=chunk)
        np.testing.assert_array_equal(out, w.T.astype(np.float32))
        out = np.full(9, np.nan, ml_dtypes.bfloat16)
        read_converted(info["v"], f, out, transpose=False, chunk=chunk)
        np.testing.assert_array_equal(out, v.astype(ml_dtypes.bfloat16))


def test_place_gets_each_parameter_once_in_its_final_layout(hf_checkpoint):
    directory = hf_checkpoint("llama")  # sharded
    calls = []

    def place(name, array, axes):
        calls.append((name, array.shape, array.dtype, axes))
        return jnp.asarray(array) * 0 + 1  # a visible transformation

    lm, _ = from_hf(directory, place=place, dtype="bfloat16", tokenizer=False)
    names = list(parameter_paths(lm.params))
    assert [c[0] for c in calls] == names
    assert all(dt == ml_dtypes.bfloat16 for _, _, dt, _ in calls)
    shapes = dict((n, s) for n, s, _, _ in calls)
    assert shapes["model.layers.mlp.up_proj.kernel"] == (3, 32, 48)  # stacked, [layers, d_in, d_out]
    assert shapes["lm_head.kernel"] == (32, 61)
    axes = dict((n, a) for n, _, _, a in calls)  # each with its declared layout, at its rank
    assert axes["model.layers.mlp.up_proj.kernel"] == Axes("param", ("layers", "embed", "ff"))
    assert axes["lm_head.kernel"] == Axes("param", ("embed", "vocab"))
    assert axes["model.norm.scale"] == Axes("replicated", ("replicated",))
    assert all(float(x.min()) == 1.0 for x in jax.tree.leaves(lm.params))


def test_default_place_adopts_the_host_buffer_on_cpu(hf_checkpoint):
    lm, _ = from_hf(hf_checkpoint("gpt_neox"), tokenizer=False)
    for x in jax.tree.leaves(lm.params):
        assert isinstance(x, jax.Array) and x.dtype == jnp.float32
        assert x.unsafe_buffer_pointer() % 64 == 0


def test_stacked_and_per_layer_parameters_hold_the_same_tensors(hf_checkpoint):
    directory = hf_checkpoint("gpt_neox_sequential")
    stacked, _ = from_hf(directory, tokenizer=False)
    per_layer, _ = from_hf(directory, scan=False, tokenizer=False)
    tensors = _load_all(directory)
    qkv = tensors["gpt_neox.layers.1.attention.query_key_value.weight"]
    np.testing.assert_array_equal(
        stacked.params["gpt_neox"]["layers"]["attention"]["query_key_value"]["kernel"][1], qkv.T
    )
    np.testing.assert_array_equal(
        per_layer.params["gpt_neox"]["layers"]["1"]["attention"]["query_key_value"]["kernel"], qkv.T
    )
    np.testing.assert_array_equal(stacked.params["lm_head"]["kernel"], tensors["embed_out.weight"].T)


def test_unused_tensors_are_errors_except_recomputed_buffers(hf_checkpoint, tmp_path):
    """An unused tensor could change the function (a Qwen2 q_proj bias in a checkpoint renamed to Llama): refused.

    Buffers that transformers recomputes and ignores (rotary inv_freq) are skipped and listed.
    """

    def add_buffer(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)

    directory = _single_file(hf_checkpoint("cohere"), tmp_path / "buffer", add_buffer)
    lm, _ = from_hf(directory, tokenizer=False)
    assert lm.info["skipped_tensors"] == ["model.layers.0.self_attn.rotary_emb.inv_freq"]

    def add_bias(t):
        for i in range(3):
            t[f"model.layers.{i}.self_attn.q_proj.bias"] = np.ones(32, np.float32)

    directory = _single_file(hf_checkpoint("llama"), tmp_path / "bias", add_bias)
    assert _error(directory) == (
        f"{directory / 'model.safetensors'}: tensor model.layers.0.self_attn.q_proj.bias "
        "is not used by jaxinf's llama model (and 2 more: model.layers.1.self_attn.q_proj.bias, "
        "model.layers.2.self_attn.q_proj.bias)"
    )


def test_tied_checkpoint_may_store_the_output_projection(hf_checkpoint, tmp_path, recwarn):
    def add(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"]

    lm, _ = from_hf(_single_file(hf_checkpoint("cohere"), tmp_path / "tied", add), tokenizer=False)
    assert lm.config.tie_embeddings and lm.info["skipped_tensors"] == [] and not recwarn.list


def test_tokenizer_is_returned_and_may_be_smaller_than_the_vocabulary(hf_checkpoint):
    lm, tok = from_hf(hf_checkpoint("cohere"))
    assert tok.encode("w3 w7").ids == [3, 7]
    assert tok.get_vocab_size() < lm.config.vocab_size


# --------------------------------------------------------------------------- config.json layouts


def test_legacy_config_layouts_are_read_like_transformers(hf_checkpoint):
    """config.json in the transformers 4 layout (the parity tests run these checkpoints against transformers)."""
    variant = read_config(hf_checkpoint("llama_variant"))
    assert "rope_scaling" in json.loads((hf_checkpoint("llama_variant") / "config.json").read_text())
    assert (variant.rope_type, variant.rope_factor, variant.rope_original_max_position) == ("llama3", 4.0, 16)
    assert (variant.head_dim, variant.num_kv_heads, variant.tie_embeddings) == (12, 1, True)
    neox = read_config(hf_checkpoint("gpt_neox_sequential"))
    assert (neox.rotary_dim, neox.rope_theta, neox.parallel_residual) == (2, 500.0, False)
    assert set(LEGACY) == {"llama_variant", "gpt_neox_sequential"}


def test_config_defaults_follow_transformers():
    pythia = config_from_hf(
        {
            "architectures": ["GPTNeoXForCausalLM"],
            "vocab_size": 50304,
            "hidden_size": 512,
            "intermediate_size": 2048,
            "num_hidden_layers": 6,
            "num_attention_heads": 8,
        }
    )
    assert (pythia.rotary_dim, pythia.rope_theta, pythia.activation, pythia.parallel_residual) == (
        16,
        10000.0,
        "gelu",
        True,
    )
    assert pythia.attention_bias and pythia.mlp_bias and not pythia.tie_embeddings
    command_r = config_from_hf(
        {
            "model_type": "cohere",
            "vocab_size": 256000,
            "hidden_size": 8192,
            "intermediate_size": 22528,
            "num_hidden_layers": 40,
            "num_attention_heads": 64,
        }
    )
    assert (command_r.logit_scale, command_r.tie_embeddings, command_r.rope_theta) == (0.0625, True, 500000.0)
    llama = config_from_hf(
        {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 32000,
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": None,
        }
    )
    assert (llama.head_dim, llama.num_kv_heads, llama.norm_eps, llama.activation) == (128, 8, 1e-6, "silu")


# --------------------------------------------------------------------------- errors


def _error(directory, **kw) -> str:
    with pytest.raises(ModelError) as info:
        from_hf(directory, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_tensor(hf_checkpoint, tmp_path):
    directory = _single_file(
        hf_checkpoint("llama"), tmp_path / "missing", lambda t: t.pop("model.layers.1.mlp.up_proj.weight")
    )
    assert (
        _error(directory) == f"{directory / 'model.safetensors'}: tensor model.layers.1.mlp.up_proj.weight is missing"
    )


def test_missing_tensor_in_a_sharded_checkpoint(hf_checkpoint, tmp_path):
    directory = _copy(hf_checkpoint("llama"), tmp_path / "sharded")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.2.self_attn.k_proj.weight"]
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    assert _error(directory) == (
        f"{directory / 'model.safetensors.index.json'}: tensor model.layers.2.self_attn.k_proj.weight is missing"
    )
    index["weight_map"]["model.layers.2.self_attn.k_proj.weight"] = "model-00009-of-00009.safetensors"
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    assert _error(directory).endswith("model.safetensors.index.json: shard model-00009-of-00009.safetensors is missing")


def test_a_single_file_beside_a_sharded_index_is_refused(hf_checkpoint, tmp_path):
    """Issue 25, case 10: transformers loads model.safetensors before the index; jaxinf loaded the shards. Both
    present (different weights) is ambiguous: refused in one line naming both."""
    directory = _copy(hf_checkpoint("llama"), tmp_path / "both")
    single = _single_file(hf_checkpoint("llama"), tmp_path / "single", lambda t: None)
    shutil.copy(single / "model.safetensors", directory / "model.safetensors")
    assert _error(directory) == (
        f"{directory}: both model.safetensors and model.safetensors.index.json (sharded "
        "weights); transformers loads model.safetensors, so which weights are meant is "
        "ambiguous: remove one of them"
    )


@pytest.mark.parametrize("model_type", ["llamazing", "mistral"])
def test_a_model_type_that_is_not_the_architectures_is_refused(hf_checkpoint, tmp_path, model_type):
    """Issue 25, case 10: `"model_type": "llamazing"` or `"mistral"` beside LlamaForCausalLM ran silently as Llama."""
    directory = _copy(hf_checkpoint("llama"), tmp_path / model_type)
    cfg = json.loads((directory / "config.json").read_text())
    cfg["model_type"] = model_type
    (directory / "config.json").write_text(json.dumps(cfg))
    assert _error(directory) == (
        f"{directory / 'config.json'}: field model_type: {model_type!r} is not the model type "
        "of architecture 'LlamaForCausalLM' ('llama'); transformers would load another model: "
        "fix config.json"
    )


def test_misshaped_tensor(hf_checkpoint, tmp_path):
    def transpose(t):
        t["model.layers.1.mlp.up_proj.weight"] = np.ascontiguousarray(t["model.layers.1.mlp.up_proj.weight"].T)

    directory = _single_file(hf_checkpoint("cohere"), tmp_path / "shape", transpose)
    assert _error(directory) == (
        f"{directory / 'model.safetensors'}: tensor model.layers.1.mlp.up_proj.weight "
        "has shape (32, 48), expected (48, 32)"
    )


def test_integer_tensor(hf_checkpoint, tmp_path):
    def to_int(t):
        t["model.norm.weight"] = t["model.norm.weight"].astype(np.int64)

    directory = _single_file(hf_checkpoint("cohere"), tmp_path / "int", to_int)
    assert _error(directory).endswith("tensor model.norm.weight has dtype I64, expected a float type")


def test_unknown_architecture(hf_checkpoint, tmp_path):
    directory = _copy(hf_checkpoint("gpt_neox"), tmp_path / "arch")
    cfg = json.loads((directory / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["MambaForCausalLM"], "mamba"
    (directory / "config.json").write_text(json.dumps(cfg))
    from jaxinf.models.families import FAMILIES

    supported = ", ".join(a for family in FAMILIES.values() for a in family.architectures)
    assert supported.startswith("LlamaForCausalLM, GPTNeoXForCausalLM, CohereForCausalLM, MistralForCausalLM")
    assert _error(directory) == (
        f"{directory / 'config.json'}: field architectures: unknown architecture "
        f"'MambaForCausalLM' (supported: {supported})"
    )


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("hidden_size", None, "field hidden_size is missing"),
        ("num_attention_heads", "four", "field num_attention_heads has value 'four', expected int"),
        ("hidden_act", "mish", "field hidden_act is 'mish', not supported"),
        ("rope_parameters", {"rope_type": "mrope", "factor": 2.0}, "field rope_parameters.rope_type is 'mrope'"),
        # fields that change the computation and that cohere does not have: refused, not ignored
        (
            "sliding_window",
            4,
            "field sliding_window is not implemented by jaxinf's cohere (it may change the computation)",
        ),
        ("final_logit_softcapping", 30.0, "field final_logit_softcapping is not implemented by jaxinf's cohere"),
        (
            "rope_parameters",
            {"rope_type": "default", "rope_theta": 10.0, "beta_fast": 2.0},
            "field rope_parameters.beta_fast is not implemented by jaxinf",
        ),
        # JSON's NaN and Infinity: a NaN norm epsilon ran every stage to a non-finite loss blamed on a document
        ("layer_norm_eps", float("nan"), "field layer_norm_eps has value nan, expected a finite float"),
        ("layer_norm_eps", float("inf"), "field layer_norm_eps has value inf, expected a finite float"),
        ("num_attention_heads", 0, "num_heads=0 is not a positive multiple of num_kv_heads"),  # was a ZeroDivisionError
    ],
)
def test_bad_config_fields(hf_checkpoint, tmp_path, field, value, message):
    directory = _copy(hf_checkpoint("cohere"), tmp_path / "cfg")
    cfg = json.loads((directory / "config.json").read_text())
    cfg[field] = value
    if value is None:
        del cfg[field]
    (directory / "config.json").write_text(json.dumps(cfg))
    assert _error(directory).startswith(f"{directory / 'config.json'}: {message}")


def test_tokenizer_larger_than_the_vocabulary(hf_checkpoint, tmp_path):
    directory = _copy(hf_checkpoint("llama"), tmp_path / "vocab")
    write_tokenizer(directory, n_tokens=64)  # the model has 61 rows
    assert _error(directory) == (
        f"{directory / 'tokenizer.json'}: token 'w61' has id 61 (vocabulary up to id 63), "
        "beyond the model's vocab_size 61 (config.json)"
    )
    (directory / "tokenizer.json").unlink()
    assert _error(directory) == f"{directory / 'tokenizer.json'}: file is missing (the tokenizer)"
    assert from_hf(directory, tokenizer=False)[1] is None


def test_pytorch_bin_is_refused_with_the_conversion_command(hf_checkpoint, tmp_path):
    """No pickle is ever loaded: a checkpoint with only pytorch_model.bin gets one line saying how to convert it."""
    directory = tmp_path / "bin"
    directory.mkdir()
    (directory / "config.json").write_text((hf_checkpoint("llama") / "config.json").read_text())
    (directory / "pytorch_model.bin").write_bytes(b"\x80\x02not really a pickle")
    assert _error(directory, tokenizer=False) == (
        f"{directory}: only pytorch_model.bin (a pickle, which jaxinf never loads); convert it to safetensors with "
        f"python -c \"from transformers import AutoModelForCausalLM as M; M.from_pretrained('{directory}')"
        f".save_pretrained('{directory}-safetensors')\" and load that directory"
    )


def test_not_a_checkpoint(tmp_path):
    assert _error(tmp_path / "nowhere") == f"{tmp_path / 'nowhere'}: not a checkpoint directory"
    (tmp_path / "config.json").write_text("{not json")
    assert _error(tmp_path).startswith(f"{tmp_path / 'config.json'}: not valid JSON")


# --------------------------------------------------------------------------- command line


def test_command_line_reports_bad_input_in_one_line(hf_checkpoint, tmp_path, capsys):
    good = hf_checkpoint("cohere")
    assert cli.main([str(good)]) == 0
    out = capsys.readouterr().out
    assert "mlp model.layers.*.mlp.up_proj" in out and "lm_head" in out

    directory = _single_file(good, tmp_path / "missing", lambda t: t.pop("model.layers.0.mlp.down_proj.weight"))
    proc = subprocess.run(
        [sys.executable, "-m", "jaxinf.models", str(directory)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {directory / 'model.safetensors'}: tensor model.layers.0.mlp.down_proj.weight is missing"
    ]
    assert "Traceback" not in proc.stderr and proc.stdout == ""

    write_tokenizer(directory, n_tokens=80)
    assert cli.main([str(directory)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokenizer.json" in err and "vocab_size 61" in err


def test_missing_oracle_skips_or_fails_in_ci(monkeypatch):
    from conftest import oracle

    monkeypatch.delenv("JAXINF_REQUIRE_ORACLES", raising=False)
    with pytest.raises(pytest.skip.Exception):
        oracle("jaxinf_no_such_oracle")
    monkeypatch.setenv("JAXINF_REQUIRE_ORACLES", "1")
    with pytest.raises(pytest.fail.Exception, match="required oracle missing"):
        oracle("jaxinf_no_such_oracle")


def test_every_bad_dtype_of_a_model_config_is_named():
    """A bad ``dtype`` is reported next to a bad ``param_dtype`` (neither message hides the other)."""
    from jaxinf.models import ModelConfig

    base = dict(family="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4)
    with pytest.raises(ModelError) as info:
        ModelConfig(**base, dtype="int8", param_dtype="not-a-dtype")
    assert "dtype 'int8' is not one of" in str(info.value)
    assert "param_dtype 'not-a-dtype' is not a dtype" in str(info.value)
    assert ModelConfig(**base, dtype="bf16" if False else "bfloat16").param_dtype == "bfloat16"
