"""A model as the engine uses it: a config, a pure ``apply`` and a pytree of parameters.

:class:`LM` bundles the static part (the :class:`ModelConfig` and the NNX graph
definition) with the parameters, a plain nested dict of arrays mirroring the
Hugging Face module tree (``params["model"]["layers"]["mlp"]["up_proj"]["kernel"]``).
The dict is what ``jax.grad``, optax and Orbax see; :meth:`LM.apply` is the
functional core ``apply(params, tokens, mask, tap) -> logits`` that
:func:`jaxinf.engine.tasks.causal_lm_task` wraps (:meth:`LM.task`).

Three ways to get one: :func:`init` (random weights, e.g. to train the demo
model), :func:`abstract` (shapes and dtypes only, nothing allocated: for
planning a 35B run) and :func:`jaxinf.models.from_hf` (a checkpoint).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinf.engine.capture import Tap
from jaxinf.engine.tasks import Task, causal_lm_task
from jaxinf.models.config import ModelConfig
from jaxinf.models.decoder import DecoderLM

Array = jax.Array
Params = dict[str, Any]


@dataclasses.dataclass(frozen=True, eq=False)
class LM:
    """A decoder LM: ``config``, NNX ``graphdef`` and ``params`` (nested dict of arrays, or shapes when abstract).

    ``info`` records where the model came from (checkpoint path, unused checkpoint tensors).
    """

    config: ModelConfig
    graphdef: Any
    params: Params
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def apply(self, params: Params, tokens: Array, mask: Array, tap: Tap | None = None) -> Array:
        """``logits [B, T, vocab]`` of ``tokens`` ``[B, T]`` under ``params``; tracked layers go through ``tap``."""
        return nnx.merge(self.graphdef, params)(tokens, mask, tap)

    def __call__(self, tokens: Array, mask: Array | None = None) -> Array:
        """Logits under this model's own parameters (``mask`` defaults to all ones)."""
        mask = jnp.ones(tokens.shape, jnp.float32) if mask is None else mask
        return self.apply(self.params, tokens, mask)

    def task(self) -> Task:
        """The causal-LM task (documents: summed next-token NLL; queries: completion NLL)."""
        return causal_lm_task(self.apply)

    def replace(self, **changes: Any) -> LM:
        return dataclasses.replace(self, **changes)

    @property
    def num_params(self) -> int:
        """Number of parameters (the tied embedding counted once)."""
        return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(self.params)))

    @property
    def nbytes(self) -> int:
        """Bytes of all parameters in their storage dtype."""
        return int(
            sum(np.prod(x.shape, dtype=np.int64) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(self.params))
        )


def _string_keys(tree: Any) -> Any:
    """Nested dicts with every key a string (``nnx.List`` layers are keyed 0, 1, ...; Orbax restores "0", "1")."""
    if isinstance(tree, Mapping):
        return {str(k): _string_keys(v) for k, v in tree.items()}
    return tree


def _split(module: DecoderLM) -> tuple[Any, Params]:
    graphdef, state = nnx.split(module)
    return graphdef, _string_keys(nnx.to_pure_dict(state))


def init(config: ModelConfig, key: Array | int = 0) -> LM:
    """A model with random weights: kernels and embeddings ``N(0, initializer_range^2)``, biases 0, norm scales 1.

    ``key``: a PRNG key or an integer seed. The parameters are created by one
    jitted program (on the default device), each layer of a stack from its own key.
    """
    config.check_dtypes()
    key = jax.random.key(key) if isinstance(key, int) else key
    return LM(config, abstract(config).graphdef, _initializer(config)(key))


@functools.lru_cache(maxsize=16)
def _initializer(config: ModelConfig):
    """The jitted ``key -> params`` of a config (compiled once per config)."""
    return jax.jit(lambda k: _split(DecoderLM(config, nnx.Rngs(params=k)))[1])


def abstract(config: ModelConfig) -> LM:
    """The model with ``jax.ShapeDtypeStruct`` parameters: its structure, shapes and dtypes, no memory.

    ``lm.apply`` works under ``jax.eval_shape`` (and so does
    :func:`jaxinf.engine.capture.find_layers`) with these parameters.
    """
    config.check_dtypes()
    module = nnx.eval_shape(lambda: DecoderLM(config, nnx.Rngs(params=0)))
    graphdef, params = _split(module)
    return LM(config, graphdef, params)


def parameter_axes(config: ModelConfig) -> dict[str, Any]:
    """The declared logical axes of every parameter: a tree shaped like the parameters, with
    :class:`jaxinf.sharding.axes.Axes` leaves (each ``nnx.Param``'s ``axes`` metadata, see :mod:`jaxinf.models.layers`).

    A declaration names a parameter's trailing dimensions; stacked layers add a leading ``layers`` axis
    (:func:`jaxinf.sharding.axes.declared_axes` resolves them against the parameters).
    """
    module = nnx.eval_shape(lambda: DecoderLM(config, nnx.Rngs(params=0)))
    out: dict[str, Any] = {}
    for path, variable in nnx.to_flat_state(nnx.state(module)):
        node = out
        for key in path[:-1]:
            node = node.setdefault(str(key), {})
        node[str(path[-1])] = variable.get_metadata()["axes"]
    return out


def parameter_paths(params: Params) -> dict[str, Any]:
    """``{"model.layers.mlp.up_proj.kernel": leaf, ...}``: each parameter under its dotted path."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        out[".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)] = leaf
    return out
