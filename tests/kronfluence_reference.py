"""kronfluence on the same model, documents and queries as a jaxinf run: the PyTorch reference side.

This module needs torch, transformers and kronfluence (the test extra), so it lives with the
tests, outside the package (``scripts/bench_vs_kronfluence.py`` imports it from here too). It gives kronfluence exactly what ``jaxinf run``
computes with:

- :func:`document_examples` / :func:`query_examples`: the token ids jaxinf's own
  data layer produces (:class:`jaxinf.data.tokenize.TextEncoder`, documents
  truncated to ``data.max_length``), as fixed-length right-padded rows with the
  attention mask and next-token labels (-100 where a position has no target);
- :class:`CausalLMTask`: a kronfluence ``Task`` whose training loss is the summed
  next-token NLL of a document (labels sampled from the model's predictive
  distribution when kronfluence asks for the true Fisher), whose measurement is the
  summed NLL of the completion tokens, with the attention mask given, tracking the
  named modules;
- :func:`factor_arguments` / :func:`score_arguments`: kronfluence's arguments for a
  jaxinf config's strategy, Fisher, damping, query rank and precision (full SVD,
  no example limits, every dtype float64 in a float64 run).

The sums kronfluence accumulates do not depend on how documents are grouped into
batches, so batch sizes are free; what must agree is which tokens count
(the attention mask, for ``N_tok``) and which rows are sequences (``N_seq``):
rows here are never all padding.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task

IGNORE = -100


def _rows(sequences: Sequence[np.ndarray], targets: Sequence[np.ndarray], length: int | None = None) -> list[dict]:
    """Right-padded examples: ``input_ids``, ``attention_mask``, ``labels`` (-100 where position t has no target)."""
    T = length or max(len(s) for s in sequences)
    out = []
    for ids, target in zip(sequences, targets):
        n = len(ids)
        if n > T:
            raise ValueError(f"a sequence of {n} tokens does not fit rows of {T}")
        input_ids = torch.zeros(T, dtype=torch.long)
        mask = torch.zeros(T, dtype=torch.long)
        labels = torch.full((T,), IGNORE, dtype=torch.long)
        input_ids[:n] = torch.as_tensor(np.asarray(ids, np.int64))
        mask[:n] = 1
        is_target = np.zeros(T, bool)
        is_target[:n] = target
        nxt = np.flatnonzero(is_target[1:])  # position t predicts token t+1
        labels[nxt] = input_ids[nxt + 1]
        out.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
    return out


def document_examples(ids: Sequence[np.ndarray], max_length: int, length: int | None = None) -> list[dict]:
    """Documents (jaxinf's token ids) truncated to ``max_length``: every token but the first is a target."""
    cut = [np.asarray(x[:max_length]) for x in ids]
    if any(len(x) == 0 for x in cut):
        raise ValueError("an empty document has no row (jaxinf does not count it either)")
    return _rows(cut, [np.arange(len(x)) > 0 for x in cut], length)


def query_examples(encoded, length: int | None = None) -> list[dict]:
    """Queries (:class:`jaxinf.data.tokenize.EncodedQuery`): only the completion tokens are targets."""
    return _rows([e.ids for e in encoded], [np.arange(len(e.ids)) >= e.prompt_length for e in encoded], length)


class Examples(torch.utils.data.Dataset):
    """A list of example dicts as a torch dataset (the default collate stacks them)."""

    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


def encoded_inputs(checkpoint: str | Path, documents: str | Path, queries: str | Path, max_length: int):
    """jaxinf's token ids of a documents file and a queries file (the same encoder ``jaxinf run`` uses)."""
    from jaxinf.data.queries import encode_queries, read_queries
    from jaxinf.data.sources import open_documents
    from jaxinf.data.tokenize import TextEncoder

    encoder = TextEncoder(Path(checkpoint))
    source = open_documents(str(documents))
    doc_ids = encoder.encode_documents(source.texts(list(range(len(source)))))
    encoded = encode_queries(read_queries(str(queries)), encoder, max_length=max_length)
    return doc_ids, encoded


class CausalLMTask(Task):
    """jaxinf's causal-LM task in kronfluence's terms (see the module docstring).

    ``compute_train_loss(sample=True)`` draws each target position's label from
    ``softmax(logits)`` with torch's generator (jaxinf draws its own with a JAX
    key, so the two true-Fisher estimates differ by sampling noise only), unless the
    batch brings ``sampled_labels``: labels drawn elsewhere (by jaxinf, for an exact
    comparison of the true Fisher), used as they are in every pass.
    """

    def __init__(self, modules: Sequence[str] | None, generator: torch.Generator | None = None):
        self.modules = None if modules is None else list(modules)
        self.generator = generator

    def _logits(self, batch, model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # jaxinf takes the log-softmax in float32 at least, like this.
        return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits

    def _nll(self, logits, labels):
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
        )

    def compute_train_loss(self, batch, model, sample: bool = False):
        logits = self._logits(batch, model)
        labels = batch["labels"]
        if sample and "sampled_labels" in batch:
            labels = batch["sampled_labels"]
        elif sample:
            with torch.no_grad():
                probs = torch.softmax(logits.detach().double(), dim=-1).reshape(-1, logits.size(-1))
                drawn = torch.multinomial(probs, 1, generator=self.generator).reshape(labels.shape)
            labels = torch.where(labels == IGNORE, labels, drawn)
        return self._nll(logits, labels)

    def compute_measurement(self, batch, model):
        return self._nll(self._logits(batch, model), batch["labels"])

    def get_influence_tracked_modules(self):
        return self.modules

    def get_attention_mask(self, batch):
        return batch["attention_mask"]


def factor_arguments(strategy: str, fisher: str, precision: str) -> FactorArguments:
    """kronfluence's factor arguments for a jaxinf ``factors.strategy``, ``factors.fisher`` and ``run.precision``."""
    dtype = torch.float64 if precision == "float64" else torch.float32
    return FactorArguments(
        strategy=strategy,
        use_empirical_fisher=fisher == "empirical",
        covariance_max_examples=None,
        lambda_max_examples=None,
        activation_covariance_dtype=dtype,
        gradient_covariance_dtype=dtype,
        eigendecomposition_dtype=torch.float64,
        per_sample_gradient_dtype=dtype,
        lambda_dtype=dtype,
    )


def score_arguments(
    damping: float | None, query_rank: int | None, precision: str, *, per_module: bool = False, svd: str = "full"
) -> ScoreArguments:
    """kronfluence's score arguments for jaxinf's ``scores.damping`` (None: the heuristic), ``scores.query_rank``
    and ``scores.query_svd`` (``svd``).

    ``svd="full"`` (the default here) truncates with the full SVD, the one method
    both libraries compute alike; ``"randomized"`` takes kronfluence's own
    randomized SVD (``torch.svd_lowrank``, another random sketch than jaxinf's).
    """
    dtype = torch.float64 if precision == "float64" else torch.float32
    return ScoreArguments(
        damping_factor=damping,
        query_gradient_low_rank=query_rank,
        use_full_svd=svd == "full",
        compute_per_module_scores=per_module,
        query_gradient_svd_dtype=torch.float64 if precision == "float64" else torch.float32,
        per_sample_gradient_dtype=dtype,
        precondition_dtype=dtype,
        score_dtype=dtype,
    )


def load_model(checkpoint: str | Path, precision: str, attention: str = "eager"):
    """The transformers model of a checkpoint directory, in eval mode, float64 or float32.

    ``attention``: transformers' ``attn_implementation``; eager (the default here)
    is the one whose float64 arithmetic the parity tests pin down, sdpa is
    transformers' own default.
    """
    transformers = importlib.import_module("transformers")
    dtype = torch.float64 if precision == "float64" else torch.float32
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(checkpoint), dtype=dtype, attn_implementation=attention
    ).eval()


def tracked_modules(model, patterns: str | Sequence[str]) -> list[str]:
    """The ``nn.Linear`` modules of a transformers model that jaxinf's ``factors.track`` selects."""
    import fnmatch

    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if patterns == "all":
        return names
    pats = ["*mlp*"] if patterns == "mlp" else ([patterns] if isinstance(patterns, str) else list(patterns))
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in pats)]


@contextlib.contextmanager
def quiet():
    """Silences kronfluence's and transformers' INFO logging."""
    import logging

    loggers = [logging.getLogger(n) for n in ("kronfluence", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
