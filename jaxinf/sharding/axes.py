"""Logical axes, declared where arrays are made, and read back as one tree per pytree.

Every array the engine lays out on a mesh has a *logical* name per dimension
(``rows``, ``cols``, ``embed``, ``ff``, ...) and a *family* (``factor``,
``query``, ``param``, ...) whose partition rules map those names to mesh axes.
Both are declared next to the code that creates the array, never guessed from
its name:

- an engine pytree (a registered dataclass: covariance sums, eigenbases, Lambda,
  query gradients) declares each field's :class:`Axes` in the field's metadata,
  ``A: dict[str, Array] = logical("factor", "rows", "cols")``;
- a model declares each parameter's :class:`Axes` in the metadata of the
  ``nnx.Param`` that holds it (:mod:`jaxinf.models.layers`), read back by
  :func:`jaxinf.models.parameter_axes` as a tree shaped like the parameters.

A declaration names the *trailing* dimensions; any leading dimensions are stacking
axes named ``layers`` (a stacked block's layer axis, a MoE layer's expert list).
:func:`declared_axes` resolves a whole pytree to one :class:`Axes` per array,
with every dimension named, and raises :class:`AxesError` naming the first array
that has no declaration. Nothing here knows a mesh: the partition rules do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

from jaxinf.errors import JaxinfError

LAYERS = "layers"
"""The logical name of a leading (stacking) dimension."""

REPLICATED_FAMILY = "replicated"
"""The family of arrays every device holds whole (norm scales, counts, losses)."""


class AxesError(JaxinfError, ValueError):
    """An array without a declared layout, or a declaration that does not fit its pytree (names which)."""


@dataclasses.dataclass(frozen=True)
class Axes:
    """A layout: the partition-rule ``family`` and the logical ``names`` of the trailing dimensions."""

    family: str
    names: tuple[str, ...] = ()

    def of_rank(self, ndim: int) -> Axes:
        """The layout of an array of ``ndim`` dimensions: leading dimensions named ``layers``.

        A replicated family, or an array with fewer dimensions than declared names, is
        replicated: every dimension named ``replicated``.
        """
        if self.family == REPLICATED_FAMILY or len(self.names) > ndim:
            return Axes(REPLICATED_FAMILY, (REPLICATED_FAMILY,) * ndim)
        return Axes(self.family, (LAYERS,) * (ndim - len(self.names)) + tuple(self.names))


REPLICATED = Axes(REPLICATED_FAMILY)


def param(*names: str) -> Axes:
    """A model parameter split by the ``param`` rules along the named trailing dimensions."""
    return Axes("param", tuple(names))


def logical(family: str, *names: str) -> Any:
    """A dataclass field whose arrays (a dict of blocks, or one array) have the layout ``Axes(family, names)``."""
    return dataclasses.field(metadata={"axes": Axes(family, tuple(names))})


def field_axes(cls: type, name: str) -> Axes:
    """The :class:`Axes` declared on field ``name`` of the dataclass ``cls`` (for the bare value of that field)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if "axes" not in f.metadata:
                raise AxesError(f"{cls.__name__}.{name}: no logical axes declared in its field metadata")
            return f.metadata["axes"]
    raise AxesError(f"{cls.__name__} has no field {name!r}")


def declared_axes(tree: Any, declared: Any = None, *, what: str = "") -> Any:
    """The resolved :class:`Axes` of every array of ``tree``, as a tree of the same structure.

    ``declared`` is a prefix tree of :class:`Axes` for a tree that carries no
    declarations itself (a model's parameters, a dict that was a field's value:
    see :func:`field_axes`); without it, every dataclass in ``tree`` supplies its
    fields' declarations and containers are walked into. An array reached with no
    declaration in scope raises :class:`AxesError` naming its path (``what`` is
    the tree's name in that message).
    """
    if declared is not None:
        return _resolve(declared, tree, what or "tree")
    return _walk(tree, what)


def _resolve(declared: Any, tree: Any, where: str) -> Any:
    """Each array of ``tree`` under the :class:`Axes` that the prefix tree ``declared`` gives it, at its rank."""

    def subtree(axes, sub):
        if not isinstance(axes, Axes):
            raise AxesError(f"{where}: declared layout {axes!r} is not an Axes")
        return jax.tree.map(lambda x: axes.of_rank(len(x.shape)), sub)

    try:
        return jax.tree.map(subtree, declared, tree)
    except ValueError as e:
        if isinstance(e, AxesError):
            raise
        raise AxesError(f"{where}: the declared axes do not have the tree's structure ({e})") from None


def _walk(node: Any, where: str) -> Any:
    """:func:`declared_axes` without a declaration in scope: dataclasses declare, containers are walked into."""
    if node is None:
        return None
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        name = type(node).__name__
        changes = {}
        for f in dataclasses.fields(node):
            if f.metadata.get("static"):
                continue
            if "axes" not in f.metadata:
                raise AxesError(
                    f"{where + ': ' if where else ''}{name}.{f.name}: no logical axes declared in its "
                    "field metadata (jaxinf.sharding.axes.logical)"
                )
            changes[f.name] = _resolve(
                f.metadata["axes"], getattr(node, f.name), f"{where + '.' if where else ''}{name}.{f.name}"
            )
        return dataclasses.replace(node, **changes)
    if isinstance(node, Mapping):
        # the concrete mapping types of a tree (dict, FrozenDict) take (key, value) pairs; Mapping itself declares none
        return type(node)((k, _walk(v, f"{where}[{k!r}]")) for k, v in node.items())  # type: ignore[call-arg]
    if isinstance(node, (list, tuple)) and not hasattr(node, "_fields"):
        return type(node)(_walk(v, f"{where}[{i}]") for i, v in enumerate(node))
    raise AxesError(
        f"{where or 'the tree'}: an array {getattr(node, 'shape', '')} with no declared logical axes "
        "(declare them where it is made, or pass them as `declared`)"
    )
