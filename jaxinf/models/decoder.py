"""The decoder-only LM as a Flax NNX module, assembled from a family's parts (:mod:`jaxinf.models.families`).

Module attributes carry the Hugging Face names, so the parameter tree reads
like the checkpoint (``model.layers.mlp.up_proj.kernel``) and every tracked
layer calls the tap under its Hugging Face module path (``model.layers.{i}.mlp.up_proj``,
``gpt_neox.layers.{i}.attention.query_key_value``, ``transformer.h.{i}.mlp.c_fc``,
``lm_head``); each family's module lists its names.

With ``config.scan`` the layers are one block whose parameters carry a leading
layer axis, run by :meth:`jaxinf.engine.capture.Tap.scan` under ``{backbone}.{layers}``
(tracked names ``model.layers.*.mlp.up_proj``, one entry per layer index) together
with each layer's kind index (sliding or full attention, rotary or not), which
selects the layer's rotary tables and attention mask; otherwise an ``nnx.List``
of blocks run in a Python loop. The output projection is tracked as ``lm_head``
also when it is tied to the token embedding (as in transformers, where
``lm_head`` is an ``nn.Linear`` sharing the embedding's weight).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinf.engine.capture import Tap
from jaxinf.models.config import ModelConfig
from jaxinf.models.layers import HEAD, POSITIONS, VOCAB, Embed, Linear, attention_mask, rotary_tables
from jaxinf.models.parts import Context
from jaxinf.sharding.partitioning import layer_parameter

Array = jax.Array


def stacked_blocks(config: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    """One block of the family whose parameters carry a leading axis of ``num_layers`` (independent inits)."""
    block = config.spec.block

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(r):
        return block(config, r)

    return make(rngs)


class Backbone(nnx.Module):
    """Embeddings, the layers, and the final norm (the Hugging Face ``model`` / ``gpt_neox`` / ``transformer`` module)."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        fam = config.spec
        setattr(self, fam.embed, Embed(config, rngs, VOCAB))
        if fam.positions is not None:
            setattr(self, fam.positions, Embed(config, rngs, POSITIONS, rows=config.max_position_embeddings))
        if config.scan:
            layers = stacked_blocks(config, rngs)
        else:
            layers = nnx.List([fam.block(config, rngs) for _ in range(config.num_layers)])
        setattr(self, fam.layers, layers)
        setattr(self, fam.norm, fam.final_norm(config))


def final_logits(h: Array, config: ModelConfig) -> Array:
    """``logit_scale * h`` (Cohere), then ``c tanh(x / c)`` with ``c = final_softcap`` (Gemma 2 and 3)."""
    if config.logit_scale != 1.0:
        h = h * jnp.asarray(config.logit_scale, h.dtype)
    if config.final_softcap is not None:
        cap = jnp.asarray(config.final_softcap, h.dtype)
        h = jnp.tanh(h / cap) * cap
    return h


class DecoderLM(nnx.Module):
    """A decoder-only LM; ``model(tokens, mask, tap) -> logits [B, T, vocab]``."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.config = config
        setattr(self, config.backbone, Backbone(config, rngs))
        if config.tie_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(
                "lm_head", config.hidden_size, config.vocab_size, bias=False, axes=HEAD, config=config, rngs=rngs
            )

    def __call__(self, tokens: Array, mask: Array, tap: Tap | None = None) -> Array:
        """Logits of right-padded ``tokens`` ``[B, T]``; ``mask`` is 1 at real tokens.

        Positions are ``0..T-1`` in every row and attention is causal over real
        tokens, so right padding never changes the logits of real tokens.
        """
        c, fam = self.config, self.config.spec
        tap = Tap() if tap is None else tap
        backbone = getattr(self, c.backbone)
        embed = getattr(backbone, fam.embed)
        h = embed(tokens, c.dtype)
        if fam.embed_scale:
            h = h * jnp.asarray(c.hidden_size**0.5, c.dtype)
        if fam.positions is not None:
            h = h + getattr(backbone, fam.positions)(jnp.arange(tokens.shape[1])[None, :], c.dtype)
        cos, sin = rotary_tables(c, tokens.shape[1], c.dtype)
        allowed = attention_mask(mask, c)
        prefix = f"{c.backbone}.{fam.layers}"
        layers = getattr(backbone, fam.layers)
        if c.scan:
            graphdef, state = nnx.split(layers)

            def body(h, xs, inner_tap):
                layer_state, kind = xs
                return nnx.merge(graphdef, layer_state)(h, Context(cos[kind], sin[kind], allowed[kind]), inner_tap, "")

            kinds = jnp.asarray(c.layer_kind_indices, jnp.int32)
            h = tap.scan(prefix, body, h, (state, kinds), remat=c.remat)
        else:
            for i, block in enumerate(layers):
                kind = c.layer_kind_indices[i]
                h = block(h, Context(cos[kind], sin[kind], allowed[kind]), tap, f"{prefix}.{i}.")
        h = getattr(backbone, fam.norm)(h)
        if self.lm_head is None:
            logits = tap.linear(
                "lm_head", h, layer_parameter(embed.embedding[...], embed.embedding.get_metadata()["axes"]).T
            )
        else:
            logits = self.lm_head(h, tap)
        return final_logits(logits, c)
