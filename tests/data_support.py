"""Small tokenizers and corpora built in the tests themselves (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

WORDS = (
    "the river of zorv is long and the mountain of quab is tall while three plus four makes seven "
    "slope between points rises over runs answer question every day people walk"
).split()


def corpus_texts(n: int = 200, seed: int = 0) -> list[str]:
    """Deterministic word salad with punctuation, digits and non-ASCII characters."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.choice([1, 3, 8, 20, 60, 150])
        words = [rng.choice(WORDS) for _ in range(k)]
        if i % 7 == 0:
            words.append("naïve café — 42.")
        out.append(" ".join(words))
    return out


def make_tokenizer(template: str = "bos", vocab_size: int = 300) -> Tokenizer:
    """A byte-level BPE trained here on :func:`corpus_texts`.

    ``template``: ``"bos"`` (``<s> $A``), ``"eos"`` (``$A </s>``), ``"both"``
    (``<s> $A </s>``) or ``"none"`` (no post-processor).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_texts(), trainer)
    single = {"bos": "<s> $A", "eos": "$A </s>", "both": "<s> $A </s>"}.get(template)
    if single is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=single, special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))]
        )
    return tok


def write_jsonl(path: Path, records: list, *, raw_lines: dict[int, bytes] | None = None) -> Path:
    """Writes one JSON object per line; ``raw_lines`` replaces chosen lines (1-based) with raw bytes."""
    lines = [json.dumps(r, ensure_ascii=False).encode("utf-8") for r in records]
    for number, raw in (raw_lines or {}).items():
        lines[number - 1] = raw
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def documents_file(path: Path, n: int = 60, seed: int = 0) -> Path:
    """A documents JSONL file with ids, sources and an extra field."""
    texts = corpus_texts(n, seed)
    sources = ["wiki", "code", "webdata"]
    return write_jsonl(
        path, [{"id": f"d{i}", "text": t, "source": sources[i % 3], "n": i} for i, t in enumerate(texts)]
    )
