"""Hugging Face checkpoint import, without torch: ``config.json``, ``*.safetensors``, ``tokenizer.json``.

:func:`from_hf` builds the model's structure abstractly (no memory), then fills
it one parameter at a time: a host buffer of the parameter's final dtype and
layout (kernels ``[d_in, d_out]``; with stacked layers, ``[num_layers, ...]``
holding one checkpoint tensor per layer) is filled straight from the
safetensors files, tensors that need a transpose or a dtype conversion passing
through in blocks of 16 MiB, and is handed to ``place(name, array, axes) -> jax.Array``.
Host memory beyond what ``place`` keeps is therefore one parameter buffer plus
one block. The default ``place`` is ``jax.device_put``, which on CPU adopts the
(64-byte aligned) buffer without copying, so loading onto the host costs the
model plus one block; a sharded run passes a ``place`` that puts each
parameter on its mesh.

The safetensors format is read directly (an 8-byte little-endian header size, a
JSON header of ``{name: {dtype, shape, data_offsets}}``, then the raw data):
``safetensors.safe_open(framework="numpy")`` cannot return bfloat16 tensors,
which most large checkpoints are; ``ml_dtypes`` supplies the numpy bfloat16.

Every problem is a :class:`CheckpointError` whose one-line message names the
file and the tensor or field.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import struct
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from jaxinf.errors import missing
from jaxinf.models.config import ConfigError, ModelConfig, ModelError
from jaxinf.models.config_json import config_from_hf
from jaxinf.models.lm import LM, abstract, parameter_axes, parameter_paths
from jaxinf.sharding.axes import Axes

Place = Callable[[str, np.ndarray, Axes], jax.Array]
"""``place(parameter_path, host_buffer, axes)``: puts one parameter where it belongs, by its declared axes."""

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_FLOATS = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_MAX_HEADER = 100 * 2**20
CHUNK = 16 * 2**20  # bytes of a checkpoint tensor converted at a time


class CheckpointError(ModelError):
    """A checkpoint directory that cannot be loaded; the message names the file and the tensor or field."""


# --------------------------------------------------------------------------- safetensors


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: its file, dtype code, shape and absolute byte range."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(file: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, checked for consistent dtypes, shapes and byte ranges."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{file}: not a safetensors file (shorter than its 8-byte header size)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(_MAX_HEADER, size - 8):
                raise CheckpointError(f"{file}: not a safetensors file (header size {n} exceeds the file)")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"{file}: {missing(file)}") from None
    except OSError as e:
        raise CheckpointError(f"{file}: cannot be read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: the safetensors header is not a JSON object")
    base = 8 + n
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: tensor {name} has a malformed header entry {entry!r}") from None
        if dtype not in _DTYPES:
            raise CheckpointError(f"{file}: tensor {name} has unsupported dtype {dtype}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
        if (
            not (isinstance(begin, int) and isinstance(end, int))
            or end - begin != nbytes
            or begin < 0
            or base + end > size
        ):
            raise CheckpointError(
                f"{file}: tensor {name} has data offsets {[begin, end]} that do not hold "
                f"{dtype} {list(shape)} within the file"
            )
        out[name] = TensorInfo(file, dtype, shape, base + begin, base + end)
    return out


def aligned_empty(shape: tuple[int, ...], dtype, align: int = 64) -> np.ndarray:
    """An uninitialized array whose data starts on an ``align``-byte boundary (so jax can adopt it on CPU)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(n + align, np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset : offset + n].view(dtype).reshape(shape)


def read_tensor(info: TensorInfo, f: io.BufferedIOBase, out: np.ndarray | None = None) -> np.ndarray:
    """The tensor's data read from the open file ``f`` into ``out`` (a new array when None)."""
    if out is None:
        out = np.empty(info.shape, _DTYPES[info.dtype])
    f.seek(info.start)
    view = memoryview(out.reshape(-1).view(np.uint8))  # type: ignore[arg-type]  # an ndarray is a buffer
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise CheckpointError(f"{info.file}: tensor data ends early (truncated file)")
        got += n
    return out


def tensor_index(path: Path) -> tuple[dict[str, TensorInfo], Path]:
    """Every tensor of the checkpoint, and the file to name when one is missing.

    Uses ``model.safetensors.index.json`` when present (checking that every
    file it lists exists and holds the tensors it lists), else
    ``model.safetensors``, else all ``*.safetensors`` files of the directory.
    """
    index_file = path / INDEX
    if index_file.exists() and (path / SINGLE).exists():  # transformers would load the single file, jaxinf the shards
        raise CheckpointError(
            f"{path}: both {SINGLE} and {INDEX} (sharded weights); transformers loads {SINGLE}, so "
            "which weights are meant is ambiguous: remove one of them"
        )
    if index_file.exists():
        raw = _read_json(index_file)
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_file}: field weight_map is missing or not an object")
        headers = {}
        for fname in sorted(set(weight_map.values())):
            file = path / str(fname)
            if not file.exists():
                raise CheckpointError(f"{index_file}: shard {fname} is {missing(file, 'missing')}")
            headers[fname] = read_header(file)
        tensors: dict[str, TensorInfo] = {}
        for name, fname in weight_map.items():
            if name not in headers[fname]:
                raise CheckpointError(f"{path / fname}: tensor {name} (listed in {INDEX}) is missing")
            tensors[name] = headers[fname][name]
        return tensors, index_file
    files = [path / SINGLE] if (path / SINGLE).exists() else sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        if pickles:
            raise CheckpointError(
                f"{path}: only {pickles[0]} (a pickle, which jaxinf never loads); convert it to safetensors with "
                f'python -c "from transformers import AutoModelForCausalLM as M; '
                f"M.from_pretrained('{path}').save_pretrained('{path}-safetensors')\" and load that directory"
            )
        raise CheckpointError(f"{path}: no {SINGLE}, {INDEX} or *.safetensors file")
    tensors = {}
    for file in files:
        for name, info in read_header(file).items():
            if name in tensors:
                raise CheckpointError(f"{file}: tensor {name} is also in {tensors[name].file.name}")
            tensors[name] = info
    return tensors, files[0] if len(files) == 1 else path


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: {missing(file)}") from None
    except OSError as e:
        raise CheckpointError(f"{file}: cannot be read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None


# --------------------------------------------------------------------------- parameter <-> tensor names

_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


@dataclasses.dataclass(frozen=True)
class ParamSource:
    """Where a parameter comes from: one checkpoint tensor per layer (one name when not stacked).

    ``names[i]`` lists the accepted tensor names of layer ``i`` (the first is
    reported when missing); ``transpose``: kernel = ``weight.T``.
    """

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    names: tuple[tuple[str, ...], ...]
    stacked: bool
    transpose: bool

    @property
    def tensor_shape(self) -> tuple[int, ...]:
        """The shape each checkpoint tensor must have."""
        shape = self.shape[1:] if self.stacked else self.shape
        return tuple(reversed(shape)) if self.transpose else shape


def param_sources(lm: LM) -> list[ParamSource]:
    """The checkpoint tensors of every parameter of ``lm`` (abstract or not), in parameter order.

    A parameter path ``model.layers.mlp.up_proj.kernel`` of a stacked model is
    read from ``model.layers.{i}.mlp.up_proj.weight`` for every layer ``i``;
    leaves ``kernel``/``scale``/``embedding`` are Hugging Face ``weight``.
    Each name is also accepted without the backbone prefix (a checkpoint of
    the bare backbone, such as the original ``gpt2``), and ``lm_head.weight``
    under the family's ``head_aliases`` (GPT-NeoX: ``embed_out.weight``).
    A kernel is the transposed ``weight`` unless the family stores linear
    weights as ``[d_in, d_out]`` (GPT-2's ``Conv1D``); the family's ``renames``
    map module paths to checkpoint names where they differ (Mixtral's experts).
    """
    c, fam = lm.config, lm.config.spec
    out = []
    for path, leaf in parameter_paths(lm.params).items():
        parts = path.split(".")
        module, leaf_name = parts[:-1], _LEAVES[parts[-1]]
        stacked = c.scan and module[:2] == [c.backbone, fam.layers]
        if stacked:
            names = tuple(".".join(module[:2] + [str(i)] + module[2:] + [leaf_name]) for i in range(c.num_layers))
        else:
            names = (".".join(module + [leaf_name]),)
        for pattern, replacement in fam.renames:
            names = tuple(re.sub(pattern, replacement, n) for n in names)
        aliased = []
        for n in names:
            if n == "lm_head.weight":
                aliased.append((n, *fam.head_aliases))
            elif n.startswith(c.backbone + "."):
                aliased.append((n, n[len(c.backbone) + 1 :]))
            else:
                aliased.append((n,))
        out.append(
            ParamSource(
                path,
                tuple(leaf.shape),
                np.dtype(leaf.dtype),
                tuple(aliased),
                stacked,
                parts[-1] == "kernel" and fam.linear_transposed,
            )
        )
    return out


# --------------------------------------------------------------------------- loading


def read_config(path: str | Path, **overrides: Any) -> ModelConfig:
    """The :class:`ModelConfig` of a checkpoint directory's ``config.json`` (no weights read)."""
    file = Path(path) / "config.json"
    raw = _read_json(file)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: not a JSON object")
    try:
        return config_from_hf(raw, str(file), **overrides)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def load_tokenizer(path: str | Path, vocab_size: int | None = None):
    """The ``tokenizers.Tokenizer`` of a checkpoint (:func:`jaxinf.models.tokenizer.read_tokenizer`: ``tokenizer.json``,
    or ``vocab.json`` + ``merges.txt``); checks that its ids fit ``vocab_size``.

    A model's embedding may have more rows than the tokenizer has tokens
    (checkpoints pad the vocabulary, e.g. Pythia's 50304 rows for 50277
    tokens), so only a token id ``>= vocab_size`` is an error.
    """
    from jaxinf.models.tokenizer import TokenizerError, read_tokenizer

    file = Path(path) / "tokenizer.json"
    try:
        tok = read_tokenizer(path)
    except TokenizerError as e:
        raise CheckpointError(str(e)) from None
    if not file.exists():
        file = Path(path) / "vocab.json"
    if vocab_size is not None:
        vocab = tok.get_vocab(with_added_tokens=True)
        top = max(vocab.values(), default=-1)
        if top >= vocab_size:
            token = min((t for t, i in vocab.items() if i >= vocab_size), key=vocab.get)
            raise CheckpointError(
                f"{file}: token {token!r} has id {vocab[token]} (vocabulary up to id {top}), beyond the model's "
                f"vocab_size {vocab_size} (config.json)"
            )
    return tok


def _lookup(tensors: dict[str, TensorInfo], names: tuple[str, ...]) -> tuple[str, TensorInfo] | None:
    for n in names:
        if n in tensors:
            return n, tensors[n]
    return None


def load_params(
    path: Path,
    lm: LM,
    place: Place | None = None,
) -> tuple[dict, list[str]]:
    """The parameters of the (abstract) ``lm`` read from ``path``, and the buffers left unused (:func:`check_unused`).

    Names, shapes and dtypes of all tensors, and that no other tensor is left
    unused, are checked first; then for each
    parameter a host buffer of its dtype and shape is filled one checkpoint
    tensor at a time (:func:`read_converted`) and passed to ``place(parameter_path, buffer, axes)`` with the
    parameter's declared :class:`~jaxinf.sharding.axes.Axes` (:func:`~jaxinf.models.parameter_axes`).
    """
    place = _default_place if place is None else place
    declared = parameter_paths(parameter_axes(lm.config))
    tensors, where = tensor_index(path)
    sources = param_sources(lm)
    used: set[str] = set()
    # Check names, shapes and dtypes of everything before reading any data.
    plan = []
    for src in sources:
        found = []
        for names in src.names:
            hit = _lookup(tensors, names)
            if hit is None:
                raise CheckpointError(f"{where}: tensor {names[0]} is missing")
            name, info = hit
            if info.shape != src.tensor_shape:
                raise CheckpointError(f"{info.file}: tensor {name} has shape {info.shape}, expected {src.tensor_shape}")
            if info.dtype not in _FLOATS:
                raise CheckpointError(f"{info.file}: tensor {name} has dtype {info.dtype}, expected a float type")
            found.append(info)
            used.update(names)
        plan.append((src, found))
    if lm.config.tie_embeddings:  # some tied checkpoints also store the (identical) output projection
        used.update({"lm_head.weight", *lm.config.spec.head_aliases})
    skipped = check_unused(lm, sorted(set(tensors) - used), where)
    flat: dict[str, Any] = {}
    with ExitStack() as stack:
        handles: dict[Path, io.BufferedIOBase] = {}
        for src, infos in plan:
            buf = aligned_empty(src.shape, src.dtype)
            for i, info in enumerate(infos):
                f = handles.get(info.file)
                if f is None:
                    f = handles[info.file] = stack.enter_context(open(info.file, "rb"))
                read_converted(info, f, buf[i] if src.stacked else buf, src.transpose)
                check_finite(tensors, info, buf[i] if src.stacked else buf)
            flat[src.path] = place(src.path, buf, declared[src.path].of_rank(buf.ndim))
            del buf
    return _unflatten(lm.params, flat), skipped


def check_finite(tensors: dict[str, TensorInfo], info: TensorInfo, values: np.ndarray) -> None:
    """Raises :class:`CheckpointError` naming the file and tensor when ``values`` (just read) has a NaN or infinity."""
    flat, block = values.reshape(-1), 1 << 24  # a bounded temporary, whatever the tensor's size
    bad = sum(
        int(flat[i : i + block].size - np.isfinite(flat[i : i + block]).sum()) for i in range(0, flat.size, block)
    )
    if bad:
        name = next((n for n, t in tensors.items() if t is info), "?")
        raise CheckpointError(
            f"{info.file}: tensor {name} has {bad} non-finite value(s) (NaN or infinity); stage: loading the model"
        )


def check_unused(lm: LM, unused: list[str], where: Path) -> list[str]:
    """The unused checkpoint tensors that are buffers transformers recomputes (``Family.buffers``); any other is an error.

    A tensor that no parameter reads could change the function in transformers
    (a bias this family does not have, a tensor of another architecture), so it
    is a :class:`CheckpointError` naming it rather than a warning.
    """
    patterns = [re.compile(p) for p in lm.config.spec.buffers]
    bad = [n for n in unused if not any(p.search(n) for p in patterns)]
    if bad:
        more = f" (and {len(bad) - 1} more: {', '.join(bad[1:4])}{', ...' if len(bad) > 4 else ''})" if bad[1:] else ""
        raise CheckpointError(f"{where}: tensor {bad[0]} is not used by jaxinf's {lm.config.family} model{more}")
    return unused


def read_converted(
    info: TensorInfo, f: io.BufferedIOBase, out: np.ndarray, transpose: bool, chunk: int = CHUNK
) -> None:
    """Reads a tensor into ``out`` converted to ``out.dtype`` (and transposed: ``out = weight.T``).

    Without conversion the data is read straight into ``out``; otherwise in
    blocks of leading rows of at most ``chunk`` bytes, so the only memory
    beyond ``out`` is one block.
    """
    dtype = _DTYPES[info.dtype]
    if not transpose and dtype == out.dtype:
        read_tensor(info, f, out)
        return
    shape = info.shape if info.shape else (1,)
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    step = max(1, chunk // max(row_bytes, 1))
    target = out.reshape(shape) if not transpose else out
    for r0 in range(0, shape[0], step):
        r1 = min(shape[0], r0 + step)
        rows = (r1 - r0,) + tuple(shape[1:])
        nbytes = int(np.prod(rows, dtype=np.int64)) * dtype.itemsize
        block = read_tensor(
            TensorInfo(info.file, info.dtype, rows, info.start + r0 * row_bytes, info.start + r0 * row_bytes + nbytes),
            f,
        )
        if transpose:
            np.copyto(target[:, r0:r1], block.T, casting="unsafe")
        else:
            np.copyto(target[r0:r1], block, casting="unsafe")


def _default_place(name: str, x: np.ndarray, axes: Axes) -> jax.Array:
    return jax.device_put(x)


def _unflatten(template: dict, flat: dict[str, Any]) -> dict:
    paths = list(parameter_paths(template))
    leaves = [flat[p] for p in paths]
    return jax.tree.unflatten(jax.tree.structure(template), leaves)


def from_hf(
    path: str | Path,
    *,
    dtype: str = "float32",
    param_dtype: str | None = None,
    scan: bool = True,
    remat: bool = False,
    place: Place | None = None,
    tokenizer: bool = True,
) -> tuple[LM, Any]:
    """The model and tokenizer of a Hugging Face checkpoint directory.

    ``dtype`` is the compute dtype and, unless ``param_dtype`` is given, the
    parameters' dtype (each tensor is converted as it is read). ``place(name,
    array, axes)`` puts each parameter where it belongs (``name`` its dotted path in
    ``lm.params``, ``array`` its full host buffer, ``axes`` its declared logical
    axes); default ``jax.device_put``.
    Returns ``(lm, tokenizer)`` (tokenizer None when ``tokenizer=False``);
    a checkpoint tensor the model does not use is an error, except buffers
    that transformers also recomputes (rotary ``inv_freq``, causal masks),
    which are listed in ``lm.info["skipped_tensors"]``.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    config = read_config(path, dtype=dtype, param_dtype=param_dtype, scan=scan, remat=remat)
    try:
        config.check_dtypes()
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    tok = load_tokenizer(path, config.vocab_size) if tokenizer else None
    tensors, where = tensor_index(path)
    if config.num_layers > len(tensors):  # each layer has a tensor: fail before naming num_layers x params tensors
        raise CheckpointError(
            f"{where}: config.json gives the model {config.num_layers:,} layers, more than the checkpoint's "
            f"{len(tensors):,} tensors could hold (each layer has its own weights)"
        )
    shell = abstract(config)
    params, skipped = load_params(path, shell, place)
    info = {"checkpoint": str(path), "skipped_tensors": skipped}
    return LM(config, shell.graphdef, params, info), tok


# --------------------------------------------------------------------------- saving


def save_hf(lm: LM, path: str | Path, hf_config: dict, tokenizer=None) -> Path:
    """Writes ``lm`` as a Hugging Face checkpoint directory: ``config.json``, ``model.safetensors``, ``tokenizer.json``.

    The inverse of :func:`from_hf`: every parameter goes back to its checkpoint
    tensor(s) (a stacked parameter to one tensor per layer, a kernel transposed
    to ``weight``). ``hf_config`` is the ``config.json`` to write; it must
    describe ``lm`` (checked by reading it back as a :class:`ModelConfig`).
    Files are written under a temporary name and renamed.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    back = config_from_hf(hf_config, "hf_config")
    mine = dataclasses.replace(
        lm.config, dtype=back.dtype, param_dtype=back.param_dtype, scan=back.scan, remat=back.remat
    )
    if back != mine:
        raise ConfigError(f"save_hf: config.json does not describe the model ({back} vs {lm.config})")
    path.mkdir(parents=True, exist_ok=True)
    flat = parameter_paths(lm.params)
    tensors: dict[str, np.ndarray] = {}
    for src in param_sources(lm):
        value = np.asarray(jax.device_get(flat[src.path]))
        per_layer = [value[i] for i in range(value.shape[0])] if src.stacked else [value]
        for names, tensor in zip(src.names, per_layer):
            tensors[names[0]] = np.ascontiguousarray(tensor.T if src.transpose else tensor)
    tmp = path / ".model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path / "model.safetensors")
    (path / ".config.json.tmp").write_text(json.dumps(hf_config, indent=2) + "\n")
    os.replace(path / ".config.json.tmp", path / "config.json")
    if tokenizer is not None:
        tokenizer.save(str(path / ".tokenizer.json.tmp"))
        os.replace(path / ".tokenizer.json.tmp", path / "tokenizer.json")
    return path
