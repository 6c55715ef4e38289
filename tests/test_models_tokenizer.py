"""Tokenizers from vocab.json + merges.txt (byte-level BPE), checked against a BPE written here from its definition;
refusals of a SentencePiece-only checkpoint and of a vocabulary that is not byte-level."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jaxinf.models.tokenizer import SAMPLE, TokenizerError, read_tokenizer

TEXTS = SAMPLE + ("It's the model's data; they'll re-use it, won't they?", "a  b   c\n\n\nd", "")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes to printable characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = dict(zip(keep, map(chr, keep))), 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _oracle_ids(text: str, vocab: dict[str, int], merges: list[tuple[str, str]]) -> list[int]:
    """Byte-level BPE by definition: GPT-2's pre-tokenizing regex, bytes as characters, lowest-rank merge first."""
    import regex

    pattern = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    rank = {pair: i for i, pair in enumerate(merges)}
    table = _bytes_to_unicode()
    ids = []
    for piece in pattern.findall(text):
        word = [table[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            pairs = [(rank.get((a, b), len(rank)), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
            best, i = min(pairs)
            if best == len(rank):
                break
            word = word[:i] + [word[i] + word[i + 1]] + word[i + 2 :]
        ids += [vocab[w] for w in word]
    return ids


@pytest.fixture(scope="module")
def bpe_files(tmp_path_factory) -> Path:
    """vocab.json + merges.txt of a small byte-level BPE trained on the texts (data made here)."""
    from tokenizers import ByteLevelBPETokenizer

    directory = tmp_path_factory.mktemp("bpe")
    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator([t * 3 for t in TEXTS], vocab_size=400, min_frequency=1, show_progress=False)
    trainer.save_model(str(directory))
    return directory


def test_vocab_and_merges_give_the_ids_of_byte_level_bpe(bpe_files):
    tok = read_tokenizer(bpe_files)
    vocab = json.loads((bpe_files / "vocab.json").read_text())
    lines = (bpe_files / "merges.txt").read_text().splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    assert len(merges) > 50
    for text in TEXTS:
        ids = tok.encode(text).ids
        assert ids == _oracle_ids(text, vocab, merges), text
        assert tok.decode(ids) == text
    assert any(len(tok.encode(t).ids) < len(t.encode()) for t in TEXTS)  # merges are applied


def test_added_tokens_stay_whole(bpe_files, tmp_path):
    directory = tmp_path / "added"
    directory.mkdir()
    vocab = json.loads((bpe_files / "vocab.json").read_text())
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text((bpe_files / "merges.txt").read_text())
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"added_tokens_decoder": {str(len(vocab) - 1): {"content": "<|endoftext|>", "special": True}}})
    )
    assert read_tokenizer(directory).encode("Hello<|endoftext|>").ids[-1] == len(vocab) - 1


def test_sentencepiece_only_and_non_byte_level_vocabularies_are_refused(bpe_files, tmp_path):
    spm = tmp_path / "spm"
    spm.mkdir()
    (spm / "tokenizer.model").write_bytes(b"\x0a\x05hello")
    with pytest.raises(TokenizerError) as info:
        read_tokenizer(spm)
    assert str(info.value) == (
        f"{spm / 'tokenizer.model'}: a SentencePiece model and no tokenizer.json; convert it with "
        f"python -c \"from transformers import AutoTokenizer; AutoTokenizer.from_pretrained('{spm}')"
        f".save_pretrained('{spm}')\" (writes tokenizer.json)"
    )

    words = tmp_path / "words"  # a character-level vocabulary without GPT-2's byte alphabet
    words.mkdir()
    (words / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate([*"abcdefghijklmnopqrstuvwxyz", "ab"])}))
    (words / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(
        TokenizerError,
        match=r"vocab\.json: not a byte-level BPE vocabulary \('Hello, world! The qu' "
        r"does not decode back to itself\); convert it with python -c",
    ):
        read_tokenizer(words)
    (words / "merges.txt").write_text("#version: 0.2\na b\nab c\n")
    with pytest.raises(
        TokenizerError,
        match=r"merges\.txt: merge 'ab' 'c' \(merge 2\) uses 'abc', which is not in "
        r"vocab\.json$",
    ):
        read_tokenizer(words)
