"""Tokenization with a checkpoint's ``tokenizer.json`` (the Hugging Face ``tokenizers`` library).

Special tokens, decided once for documents and queries alike:

- A *document* is encoded as the tokenizer is configured: its post-processor
  adds whatever it adds to a single sequence (for example a BOS token in
  front, sometimes an EOS token at the end).
- A *query* is ``prefix + prompt + completion`` where ``prompt`` and
  ``completion`` are each encoded on their own *without* special tokens and
  ``prefix`` is what the post-processor puts *in front of* a single sequence
  (BOS, when it adds one). What it would put after a sequence (EOS) is not
  added: the completion is the text whose log-probability is measured, and
  its end is not part of it.

Truncation and padding configured in the ``tokenizer.json`` are switched off
(a copy is changed, never the caller's tokenizer): lengths are the batching
layer's business. Batches of texts are encoded with ``encode_batch_fast``,
which runs in parallel in Rust.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from jaxinf.data.errors import DataError

_PROBES = ("a", "x", "0", "the", ".", "A", " ")


def load_tokenizer(tokenizer: Tokenizer | str | os.PathLike) -> Tokenizer:
    """A copy of ``tokenizer`` (or of the ``tokenizer.json`` at a path, or in a directory) without truncation or padding."""
    if isinstance(tokenizer, Tokenizer):
        tok = Tokenizer.from_str(tokenizer.to_str())
    else:
        path = Path(tokenizer)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"{path}: no such tokenizer file")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a generic Exception with serde's message
            raise DataError(f"{path}: not a valid tokenizer.json ({' '.join(str(e).split())})") from None
    tok.no_truncation()
    tok.no_padding()
    return tok


def special_tokens_around(tokenizer: Tokenizer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(prefix, suffix)``: the ids the post-processor adds before and after a single sequence.

    Found by encoding a short probe text with and without special tokens and
    locating the plain encoding inside the full one.
    """
    n_special = tokenizer.num_special_tokens_to_add(False)
    for probe in _PROBES:
        try:
            plain = tokenizer.encode(probe, add_special_tokens=False).ids
            full = tokenizer.encode(probe, add_special_tokens=True).ids
        except Exception:  # e.g. a WordLevel model without an unknown token
            continue
        if not plain or len(full) - len(plain) != n_special:
            continue
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return tuple(full[:start]), tuple(full[start + len(plain) :])
    if n_special == 0:
        return (), ()
    raise DataError("tokenizer: cannot tell where its post-processor puts its special tokens")


def token_pieces(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token's text in place, as the tokenizer's own decoder writes it when decoding ``ids`` one by one
    (``DecodeStream``): a WordPiece ``##ing`` is ``ing``, a word after another ``" word"``, a byte-level BPE ``Ġthe``
    ``" the"``, and a token that only ends a character split over several tokens carries that character (the
    tokens before it ""). Joined, the pieces are ``tokenizer.decode(ids, skip_special_tokens=False)``, and a window
    of them that starts at a word is the decode of that window (its leading space aside): what a report shows as a
    token's context, rather than raw token strings run together."""
    stream = DecodeStream(skip_special_tokens=False)
    return [stream.step(tokenizer, int(i)) or "" for i in ids]


def prefix_chars(limit: int) -> int:
    """Characters of a truncated document tokenized at first: ``max(4096, 16 * limit)`` (issue 25: a line of
    tens of megabytes was otherwise tokenized whole for a 64-token limit; the figures are in docs/benchmarks.md).
    Shorter texts are tokenized whole."""
    return max(4096, 16 * int(limit))


class EncodedQuery(NamedTuple):
    """A query's tokens (``prefix + prompt + completion``) and where the completion starts."""

    ids: np.ndarray
    prompt_length: int

    @property
    def completion_length(self) -> int:
        return len(self.ids) - self.prompt_length


class TextEncoder:
    """Encodes documents and queries with one tokenizer; see the module docstring for special tokens."""

    def __init__(self, tokenizer: Tokenizer | str | os.PathLike):
        self.tokenizer = load_tokenizer(tokenizer)
        self.prefix, self.suffix = special_tokens_around(self.tokenizer)
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode_documents(self, texts: Sequence[str], limit: int | None = None) -> list[np.ndarray]:
        """Token ids (int32) of each text, special tokens as the tokenizer is configured.

        ``limit`` (the ``data.max_length`` of truncated documents): a text longer than
        :func:`prefix_chars` ``(limit)`` characters is tokenized only in a prefix (:meth:`encode_prefix`), so
        time and memory do not follow the longest document; the first ``limit`` ids are exactly those of the
        whole text's encoding (checked), the rest stop at the prefix.
        """
        if not texts:
            return []
        texts = list(texts)
        bound = None if limit is None else prefix_chars(limit)
        short = [j for j, t in enumerate(texts) if bound is None or len(t) <= bound]
        out: list[np.ndarray | None] = [None] * len(texts)
        if short:
            encoded = self.tokenizer.encode_batch_fast([texts[j] for j in short])
            for j, e in zip(short, encoded):
                out[j] = np.asarray(e.ids, np.int32)
        for j, t in enumerate(texts):
            if out[j] is None:
                assert limit is not None  # only a text over the bound is left
                out[j] = self.encode_prefix(t, int(limit))
        return out  # type: ignore[return-value]

    def encode_prefix(self, text: str, limit: int) -> np.ndarray:
        """The ids of the shortest prefix ``text[:c]`` (``c = prefix_chars(limit) * 2^k``) whose first ``limit``
        ids are those of the whole text, with more than ``limit`` ids before any special token at its end.

        The whole text's first ``limit`` ids are not known without tokenizing it, so each prefix is checked against
        the prefix twice as long (a cut can only change the tokens of the last words before it); when no prefix
        passes before the end, the whole text is encoded. Truncating keeps the first ``limit`` ids, so a run
        uses exactly the tokens it would have used; the document's token count is the prefix's (a lower bound).
        """
        c = prefix_chars(limit)
        n_suffix = len(self.suffix)
        while 2 * c < len(text):
            a = self.tokenizer.encode(text[:c]).ids
            if len(a) - n_suffix > limit:
                b = self.tokenizer.encode(text[: 2 * c]).ids
                if a[:limit] == b[:limit]:
                    return np.asarray(a, np.int32)
            c *= 2
        return np.asarray(self.tokenizer.encode(text).ids, np.int32)

    def document_lengths(self, texts: Sequence[str], limit: int | None = None) -> np.ndarray:
        """``[len(t) for t in encode_documents(texts, limit)]`` as int64."""
        if not texts:
            return np.zeros(0, np.int64)
        if limit is None:
            return np.asarray([len(e.ids) for e in self.tokenizer.encode_batch_fast(list(texts))], np.int64)
        return np.asarray([len(ids) for ids in self.encode_documents(texts, limit)], np.int64)

    def encode_plain(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of each text without any special tokens."""
        if not texts:
            return []
        return [
            np.asarray(e.ids, np.int32) for e in self.tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
        ]

    def encode_queries(self, prompts: Sequence[str], completions: Sequence[str]) -> list[EncodedQuery]:
        """``prefix + prompt + completion`` per query, each part encoded on its own (see the module docstring)."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        prefix = np.asarray(self.prefix, np.int32)
        out = []
        for p, c in zip(self.encode_plain(prompts), self.encode_plain(completions)):
            out.append(EncodedQuery(np.concatenate([prefix, p, c]).astype(np.int32), len(prefix) + len(p)))
        return out
