"""The kronfluence parity world: tiny transformers checkpoints, documents, queries, jaxinf and kronfluence on them.

Everything is built here (nothing is downloaded): a tiny random Llama, GPT-NeoX
or Cohere from ``models_support`` saved as a Hugging Face directory with a
word-level tokenizer, random documents of 6-16 words and queries of a 3-8 word
prompt and a 1-4 word completion. Both libraries see the token ids of jaxinf's
encoder (``tests/kronfluence_reference.py``).

Worlds and kronfluence analyses are built once per session and shared by the
test modules (a cache in this module, keyed by family and settings).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import numpy as np
from conftest import oracle

MAX_LENGTH = 16
BATCH = 8  # jaxinf's data.batch_size in parity runs
FAMILIES = ("llama", "gpt_neox", "cohere")

_cache: dict = {}


def write_corpus(root: Path, n_documents: int, n_queries: int, seed: int, vocab: int = 50) -> tuple[Path, Path]:
    """``docs.jsonl`` (6-16 random words each) and ``queries.jsonl`` (3-8 word prompt, 1-4 word completion)."""
    rng = np.random.default_rng(seed)

    def words(lo: int, hi: int) -> str:
        return " ".join(f"w{t}" for t in rng.integers(1, vocab, int(rng.integers(lo, hi + 1))))

    docs, queries = root / "docs.jsonl", root / "queries.jsonl"
    with open(docs, "w") as f:
        for i in range(n_documents):
            f.write(json.dumps({"id": f"doc{i:05d}", "text": words(6, MAX_LENGTH), "source": "random"}) + "\n")
    with open(queries, "w") as f:
        for i in range(n_queries):
            f.write(json.dumps({"id": f"q{i}", "prompt": words(3, 8), "completion": words(1, 4)}) + "\n")
    return docs, queries


def world(tmp_path_factory, family: str, n_documents: int = 32, n_queries: int = 5, seed: int = 0) -> dict:
    """Checkpoint directory, documents and queries of one family (built once per session)."""
    import models_support

    key = ("world", family, n_documents, n_queries, seed)
    if key not in _cache:
        root = tmp_path_factory.mktemp(f"kronfluence-{family}-{n_documents}")
        model = models_support.save_checkpoint(family, root / "model", seed=seed)
        docs, queries = write_corpus(root, n_documents, n_queries, seed)
        _cache[key] = {"family": family, "root": root, "model": model, "docs": docs, "queries": queries}
    return _cache[key]


def overrides(w: dict, out: Path, **extra) -> list[str]:
    """``jaxinf run`` settings of a parity run (float64, empirical Fisher, self-influence) with ``extra`` on top."""
    base = {
        "model.checkpoint": w["model"],
        "data.documents": w["docs"],
        "data.queries": w["queries"],
        "data.max_length": MAX_LENGTH,
        "data.batch_size": BATCH,
        "model.dtype": "float64",
        "run.precision": "float64",
        "factors.fisher": "empirical",
        "scores.self_influence": True,
        "scores.topk": 3,
        "run.out": out,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def config(w: dict, out: Path, **extra):
    """The :class:`jaxinf.config.Config` of :func:`overrides`."""
    from jaxinf import config as cfg

    return cfg.load(None, overrides(w, out, **extra))


def sampled_float64(w: dict) -> dict:
    """What the in-process comparisons of the true Fisher start from (call inside ``jax.enable_x64(True)``): the
    world's config under ``factors.fisher: sampled``, its tracked ``layers``, the model ``lm`` in float64 and its
    ``task``, the text ``encoder``, the documents ``source``, and the queries' one batch ``queries`` (tokens, mask,
    weights on the device)."""
    import jax.numpy as jnp

    from jaxinf import models
    from jaxinf.data.queries import encode_queries, query_batches, read_queries
    from jaxinf.data.sources import open_documents
    from jaxinf.data.tokenize import TextEncoder
    from jaxinf.interop import transfer

    conf = config(w, w["root"] / "unused", **{"factors.fisher": "sampled"})
    lm, tok = models.from_hf(w["model"], dtype="float64")
    encoder = TextEncoder(tok)
    (qb,) = query_batches(encode_queries(read_queries(str(w["queries"])), encoder, max_length=MAX_LENGTH))
    return {
        "config": conf,
        "layers": transfer.tracked_layers(conf),
        "lm": lm,
        "task": lm.task(),
        "encoder": encoder,
        "source": open_documents(str(w["docs"])),
        "queries": {k: jnp.asarray(qb[k]) for k in ("tokens", "mask", "weights")},
    }


@contextlib.contextmanager
def global_x64_restored():
    """``jaxinf run`` with ``run.precision: float64`` turns on x64 for the process; turn it back afterwards."""
    import jax

    before = bool(jax.config.read("jax_enable_x64"))
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", before)


def jaxinf_run(args: list[str]) -> Path:
    """``jaxinf run`` in this process (x64 restored afterwards; an existing run directory is resumed)."""
    from jaxinf import config as cfg
    from jaxinf import pipeline

    with global_x64_restored():
        return pipeline.run(cfg.load(None, args))


def parity_run(w: dict, name: str = "run", **extra) -> Path:
    """The world's float64 ``jaxinf run`` with :func:`overrides` (plus ``extra``), made once per session."""
    key = ("run", str(w["root"]), name, tuple(sorted(extra.items())))
    if key not in _cache:
        _cache[key] = jaxinf_run(overrides(w, w["root"] / name, **extra))
    return _cache[key]


class Kronfluence:
    """A kronfluence ``Analyzer`` on a world's checkpoint, documents and queries (jaxinf's token ids).

    ``precision`` float64 runs the model in float64 with transformers' float32
    upcasts made float64 (``models_support.float64_transformers``) and every
    kronfluence dtype float64; float32 keeps kronfluence's defaults (eigendecomposition
    in float64, the rest float32). Factors are fitted per strategy on demand. ``sampled_labels``: per document,
    the label of each position (position t predicting token t+1) that the true Fisher uses in every pass, instead
    of kronfluence's own draws.
    """

    def __init__(
        self,
        w: dict,
        root: Path,
        *,
        precision: str = "float64",
        fisher: str = "empirical",
        seed: int = 0,
        n_documents: int | None = None,
        track: str = "mlp",
        sampled_labels: list[np.ndarray] | None = None,
    ):
        oracle("kronfluence")
        torch = oracle("torch")
        import kronfluence_reference as ref
        from kronfluence.analyzer import Analyzer, prepare_model

        self.ref, self.precision, self.fisher = ref, precision, fisher
        doc_ids, encoded = ref.encoded_inputs(w["model"], w["docs"], w["queries"], MAX_LENGTH)
        if n_documents is not None:
            doc_ids = doc_ids[:n_documents]
        examples = ref.document_examples(doc_ids, MAX_LENGTH)
        for example, drawn in zip(examples, sampled_labels or []):  # document i's labels at its target positions
            labels = example["labels"]
            full = np.zeros(len(labels), np.int64)  # the last position predicts nothing
            full[: len(drawn)] = np.asarray(drawn)[: len(labels)]
            example["sampled_labels"] = torch.where(labels == ref.IGNORE, labels, torch.from_numpy(full))
        self.documents = ref.Examples(examples)
        self.queries = ref.Examples(ref.query_examples(encoded))
        with self.context():
            model = ref.load_model(w["model"], precision)
            self.modules = ref.tracked_modules(model, track)
            self.task = ref.CausalLMTask(self.modules, torch.Generator().manual_seed(seed))
            model = prepare_model(model, self.task)
            self.analyzer = Analyzer("parity", model, self.task, cpu=True, disable_tqdm=True, output_dir=str(root))
        self.root = root / "parity"
        self.fitted: set[str] = set()
        # Sums do not depend on how documents are batched; fewer, larger batches cost less per call.
        self.batch = min(len(self.documents), 64)

    def context(self):
        """Where kronfluence runs: quiet, float64 transformers when asked, one torch thread, no full GC scans.

        On the tiny models of the tests, torch's tiny matmuls and SVDs are many times
        faster on one thread than on two busy cores; and kronfluence calls
        ``gc.collect()`` several times per call, which in a process that also holds
        JAX scans a large heap: objects alive before the call are frozen out of it.
        """
        import gc

        import models_support

        torch = oracle("torch")
        stack = contextlib.ExitStack()
        stack.enter_context(self.ref.quiet())
        if self.precision == "float64":
            stack.enter_context(models_support.float64_transformers())
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        stack.callback(torch.set_num_threads, threads)
        gc.freeze()
        stack.callback(gc.unfreeze)
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message=r".*GradScaler", category=FutureWarning)  # kronfluence's, not ours
        return stack

    def fit(self, strategy: str) -> str:
        """Fits the factors of ``strategy`` (K-FAC from EK-FAC's covariance); returns the factors name."""
        if strategy in self.fitted:
            return strategy
        args = self.ref.factor_arguments(strategy, self.fisher, self.precision)
        with self.context():
            if strategy == "kfac":
                self.fit("ekfac")
                self.analyzer.perform_eigendecomposition(
                    strategy, factor_args=args, overwrite_output_dir=True, load_from_factors_name="ekfac"
                )
            else:
                self.analyzer.fit_all_factors(
                    strategy,
                    self.documents,
                    per_device_batch_size=self.batch,
                    factor_args=args,
                    overwrite_output_dir=True,
                )
        self.fitted.add(strategy)
        return strategy

    def pairwise(
        self,
        strategy: str,
        damping: float | None = None,
        rank: int | None = None,
        name: str | None = None,
        factors_name: str | None = None,
    ) -> np.ndarray:
        """kronfluence's pairwise scores ``[queries, documents]`` (float64 numpy)."""
        factors_name = factors_name or self.fit(strategy)
        name = name or f"pairwise_{factors_name}_{damping}_{rank}"
        args = self.ref.score_arguments(damping, rank, self.precision)
        with self.context():
            self.analyzer.compute_pairwise_scores(
                name,
                factors_name,
                self.queries,
                self.documents,
                per_device_query_batch_size=len(self.queries),
                per_device_train_batch_size=self.batch,
                score_args=args,
                overwrite_output_dir=True,
            )
            return self.analyzer.load_pairwise_scores(name)["all_modules"].double().numpy()

    def self_scores(self, strategy: str, damping: float | None = None, name: str | None = None) -> np.ndarray:
        """kronfluence's self-influence scores ``[documents]`` (float64 numpy)."""
        factors_name = self.fit(strategy)
        name = name or f"self_{factors_name}_{damping}"
        args = self.ref.score_arguments(damping, None, self.precision)
        with self.context():
            self.analyzer.compute_self_scores(
                name,
                factors_name,
                self.documents,
                per_device_train_batch_size=self.batch,
                score_args=args,
                overwrite_output_dir=True,
            )
            return self.analyzer.load_self_scores(name)["all_modules"].double().numpy()


def kronfluence(tmp_path_factory, w: dict, **kwargs) -> Kronfluence:
    """The session's :class:`Kronfluence` of a world and settings."""
    key = ("kronfluence", w["family"], str(w["root"]), tuple(sorted(kwargs.items())))
    if key not in _cache:
        _cache[key] = Kronfluence(w, tmp_path_factory.mktemp(f"kf-{w['family']}"), **kwargs)
    return _cache[key]


def rel_error(x, ref) -> float:
    from jaxinf.interop.compare import rel_error as r

    return r(x, ref)
