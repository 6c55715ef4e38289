"""A checkpoint's tokenizer from the files it has: ``tokenizer.json``, or ``vocab.json`` + ``merges.txt``.

- ``tokenizer.json``: read by the ``tokenizers`` library as is.
- ``vocab.json`` + ``merges.txt`` only (GPT-2-style checkpoints): a byte-level
  BPE tokenizer is built with the ``tokenizers`` library (GPT-2's byte-to-unicode
  alphabet, its pre-tokenizing regular expression, merges by rank), with the
  added tokens of ``tokenizer_config.json`` kept whole. It is checked on
  :data:`SAMPLE` (ASCII, accents, CJK, emoji, whitespace runs): every text must
  decode back to itself and every id be in ``vocab.json``; a vocabulary that is
  not byte-level fails this and is refused with the conversion command.
- ``tokenizer.model`` only (SentencePiece): refused with the conversion
  command (transformers writes the equivalent ``tokenizer.json``).

Every refusal is a :class:`TokenizerError`, one line naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxinf.errors import missing
from jaxinf.models.config import ModelError

SAMPLE = (
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "  leading spaces,\ttabs\nand newlines\n\n",
    "naïve café — Zürich, São Paulo, Ångström",
    "数据归因 データ 데이터 🙂🚀 1234567890 3.14159",
    "def f(x):\n    return x ** 2  # code",
)


class TokenizerError(ModelError):
    """A checkpoint whose tokenizer files cannot be used (one line naming the file)."""


def convert_command(path: Path) -> str:
    return (
        f'python -c "from transformers import AutoTokenizer; '
        f"AutoTokenizer.from_pretrained('{path}').save_pretrained('{path}')\" (writes tokenizer.json)"
    )


def read_tokenizer(path: str | Path):
    """The ``tokenizers.Tokenizer`` of a checkpoint directory (see the module docstring for the files tried)."""
    from tokenizers import Tokenizer

    path = Path(path)
    file = path / "tokenizer.json"
    if file.exists():
        try:
            return Tokenizer.from_file(str(file))
        except Exception as e:  # the tokenizers library raises plain Exceptions
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TokenizerError(f"{file}: not a tokenizers tokenizer ({first})") from None
    if (path / "vocab.json").exists() and (path / "merges.txt").exists():
        return byte_level_bpe(path)
    if (path / "tokenizer.model").exists():
        raise TokenizerError(
            f"{path / 'tokenizer.model'}: a SentencePiece model and no tokenizer.json; "
            f"convert it with {convert_command(path)}"
        )
    raise TokenizerError(f"{file}: {missing(file)} (the tokenizer)")


def tokenizer_file(path: str | Path) -> Path:
    """The file :func:`read_tokenizer` reads the tokenizer from: ``tokenizer.json``, else ``vocab.json``."""
    path = Path(path)
    return path / "tokenizer.json" if (path / "tokenizer.json").exists() else path / "vocab.json"


def byte_level_bpe(path: Path):
    """GPT-2's byte-level BPE from ``vocab.json`` + ``merges.txt`` (+ ``tokenizer_config.json``'s added tokens)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab_file, merges_file = path / "vocab.json", path / "merges.txt"
    try:
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
        lines = merges_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{vocab_file}: cannot be read with {merges_file.name} ({e})") from None
    merges = []
    for i, line in enumerate(lines, 1):
        if not line.strip() or (i == 1 and line.startswith("#version")):
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise TokenizerError(f"{merges_file}:{i}: expected two space-separated symbols, got {line!r}")
        merges.append((pair[0], pair[1]))
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise TokenizerError(f"{vocab_file}: not an object of token -> id")
    for i, (a, b) in enumerate(merges):
        missing = next((t for t in (a, b, a + b) if t not in vocab), None)
        if missing is not None:
            raise TokenizerError(
                f"{merges_file}: merge {a!r} {b!r} (merge {i + 1}) uses {missing!r}, which is not in {vocab_file.name}"
            )
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    config = path / "tokenizer_config.json"
    if config.exists():
        try:
            added = json.loads(config.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise TokenizerError(f"{config}: cannot be read ({e})") from None
        for entry in added.values():
            if isinstance(entry, dict) and isinstance(entry.get("content"), str) and entry["content"] in vocab:
                tok.add_special_tokens([AddedToken(entry["content"], special=True)])
    known = set(vocab.values())
    for text in SAMPLE:
        ids = tok.encode(text).ids
        if tok.decode(ids, skip_special_tokens=False) != text or not set(ids) <= known:
            raise TokenizerError(
                f"{vocab_file}: not a byte-level BPE vocabulary ({text[:20]!r} does not decode back "
                f"to itself); convert it with {convert_command(path)}"
            )
    return tok
