"""Training the demo's model: a word-level tokenizer, a small Llama, optax, Orbax checkpoints, greedy completions.

The trained model is written as a Hugging Face checkpoint directory
(``config.json``, ``model.safetensors``, ``tokenizer.json``), so the pipeline
reads it exactly as it reads any user's checkpoint (and transformers or
kronfluence can load it too). Training state is checkpointed with Orbax every
``save_every`` steps and resumed after an interruption; a finished model is
reused by the next run.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxinf import models
from jaxinf.engine.progress import Progress

log = logging.getLogger("jaxinf")

SPECIAL = ("<pad>", "<bos>", "<eos>", "<unk>")


def build_tokenizer(texts: list[str]):
    """A word-level tokenizer over the corpus words whose numbers are spelled digit by digit.

    Every whitespace-separated word of the corpus that is not a number is one
    token; a number is its digits (``305`` -> ``3 ##0 ##5``, a WordPiece
    vocabulary of ``0``-``9`` and ``##0``-``##9``), so the model meets numbers
    it never saw in training as digits it knows, as a BPE model would. Documents
    are encoded as ``<bos> text <eos>``. Decoding joins words with single spaces
    and digits within a number, so a decoded completion re-encodes to the same
    tokens.
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers import models as tmodels

    digits = [str(d) for d in range(10)]
    words = sorted({w for t in texts for w in t.split() if not w.isdigit()})
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL) + digits + ["##" + d for d in digits] + words)}
    tok = Tokenizer(tmodels.WordPiece(vocab, unk_token="<unk>", continuing_subword_prefix="##"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return tok


def hf_config(
    vocab_size: int,
    *,
    hidden: int = 128,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 384,
    max_positions: int = 128,
) -> dict:
    """The ``config.json`` of the demo's Llama (grouped-query attention, SwiGLU, RMSNorm, RoPE)."""
    return dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def _batches(ids: list[np.ndarray], batch_size: int, length: int, seed: int):
    """An endless stream of shuffled, right-padded training batches (epoch after epoch)."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(ids))
        for lo in range(0, len(order) - batch_size + 1, batch_size):
            tokens = np.zeros((batch_size, length), np.int32)
            mask = np.zeros((batch_size, length), np.float32)
            for j, i in enumerate(order[lo : lo + batch_size]):
                x = ids[i][:length]
                tokens[j, : len(x)] = x
                mask[j, : len(x)] = 1.0
            weights = mask.copy()
            weights[:, 0] = 0.0
            yield {"tokens": tokens, "mask": mask, "weights": weights}


def train(
    workdir: Path,
    texts: list[str],
    *,
    steps: int = 1200,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    save_every: int = 200,
) -> tuple[models.LM, object, Path]:
    """Trains (or resumes, or reuses) the demo model; returns it, its tokenizer and its checkpoint directory."""
    import orbax.checkpoint as ocp

    workdir = Path(workdir)
    model_dir = workdir / "model"
    if (model_dir / "model.safetensors").exists():
        lm, tok = models.from_hf(model_dir)
        log.info("demo model: reusing %s (%s parameters)", model_dir, f"{lm.num_params:,}")
        return lm, tok, model_dir
    tok = build_tokenizer(texts)
    ids = [np.asarray(e.ids, np.int32) for e in tok.encode_batch(texts)]
    length = int(min(128, 2 ** math.ceil(math.log2(max(map(len, ids))))))
    config_dict = hf_config(tok.get_vocab_size(), max_positions=length)
    lm = models.init(models.config_from_hf(config_dict), seed)
    task = lm.task()
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10), steps, lr / 20)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    state = {"params": lm.params, "opt": opt.init(lm.params), "step": jnp.zeros((), jnp.int32)}
    manager = ocp.CheckpointManager(
        (workdir / "train").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False, create=True),
    )
    start = 0
    if manager.latest_step() is not None:
        start = int(manager.latest_step())
        state = manager.restore(start, args=ocp.args.StandardRestore(state))
        log.info("demo model: resuming training at step %d of %d", start, steps)

    def loss_fn(params, batch):
        token_losses = task.train_loss(params, batch, None, None)
        return token_losses.sum() / batch["weights"].sum()

    @jax.jit
    def step_fn(state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch)
        updates, opt_state = opt.update(grads, state["opt"], state["params"])
        return {
            "params": optax.apply_updates(state["params"], updates),
            "opt": opt_state,
            "step": state["step"] + 1,
        }, loss

    stream = _batches(ids, batch_size, length, seed)
    for _ in range(start):  # the same batches an uninterrupted run would see
        next(stream)
    progress = Progress("train demo model", steps, start, unit="steps", interval=15.0)
    recent = []
    for i in range(start, steps):
        batch = next(stream)
        state, loss = step_fn(state, batch)
        recent.append(loss)
        progress.update(int(batch["mask"].sum()))
        if (i + 1) % save_every == 0 or i + 1 == steps:
            manager.save(i + 1, args=ocp.args.StandardSave(state), force=True)
            manager.wait_until_finished()
            log.info("demo model: step %d, loss/token %.3f", i + 1, float(np.mean(np.asarray(jnp.stack(recent)))))
            recent = []
    progress.close()
    lm = lm.replace(params=state["params"])
    models.save_hf(lm, model_dir, config_dict, tok)
    log.info("demo model: written to %s", model_dir)
    return lm, tok, model_dir


def complete(lm: models.LM, tok, prompts: list[str], max_new: int = 24) -> list[str]:
    """Greedy completions of each prompt (after ``<bos>``), up to ``<eos>`` or ``max_new`` tokens.

    The first token is never ``<eos>``, so every completion has at least one token to measure.
    """
    eos = tok.token_to_id("<eos>")
    bos = tok.token_to_id("<bos>")
    encoded = [[bos] + tok.encode(p, add_special_tokens=False).ids for p in prompts]
    T = max(map(len, encoded)) + max_new
    tokens = np.zeros((len(prompts), T), np.int32)
    lengths = np.asarray([len(e) for e in encoded])
    for j, e in enumerate(encoded):
        tokens[j, : len(e)] = e
    forward = jax.jit(lambda params, t, m: lm.apply(params, t, m))
    done = np.zeros(len(prompts), bool)
    generated: list[list[int]] = [[] for _ in prompts]
    for step in range(max_new):
        mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
        logits = np.asarray(forward(lm.params, jnp.asarray(tokens), jnp.asarray(mask)))
        last = logits[np.arange(len(prompts)), lengths - 1]
        if step == 0:
            last[:, eos] = -np.inf
        nxt = last.argmax(-1)
        for j in range(len(prompts)):
            if done[j]:
                continue
            if nxt[j] == eos:
                done[j] = True
                continue
            generated[j].append(int(nxt[j]))
            tokens[j, lengths[j]] = nxt[j]
            lengths[j] += 1
        if done.all():
            break
    return [tok.decode(g) for g in generated]
