"""Layout ``"torch"``: a PyTorch state dict as a tree (a Hugging Face checkpoint's flat keys nested
at the dots), placed by the same machinery as the Flax ``"hf"`` layout.

Only the leaves differ from ``"hf"``: every module keeps PyTorch's ``weight`` (and ``bias``):
Linear ``(out, in)``, GPT-2's Conv1D ``(in, out)``, Embedding ``(V, D)``, ConvNd ``(out, in, *k)``.
Name lookup, base-model prefixes, GPT-2 detection and diagnostics are :class:`HfLayout`'s.

Example:
    >>> tree = nest_keys(safetensors_shard)               # {"model": {"layers": {"0": ...}}}
    >>> lp = jlora.place(tree, config, adapter_tensors, layout="torch")
    >>> merged = jlora.merge(lp)                           # same tree, weights with the adapter folded in
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import numpy as np

from .errors import CheckpointError
from .layout import _GPT2_CONV1D, HfLayout, ParamMapping, Placement


def _identity(x):
    return x


class TorchLayout(HfLayout):
    """PyTorch names and layouts (see module docstring). Use :meth:`bind` on a tree first."""

    name = "torch"
    tree_name = "PyTorch"

    def place(self, name: str, lora_kind: str | None = None) -> Placement | None:
        """The placement of PEFT module ``name`` (None when the tree has no such module).

        The canonical kernel is ``(inputs..., outputs...)``; ``kernel_perm`` turns it into the stored
        weight: ``(1, 0)`` for Linear, ``(0, 1)`` for Conv1D and Embedding, ``(n-1, n-2, 0, ..)`` for ConvNd.
        """
        path = self._find(name)
        if path is None:
            return None
        if lora_kind is None:
            return Placement(path, "none")
        weight = self._module(path).get("weight")
        if weight is None or weight.ndim < 2:
            return None
        if lora_kind == "embedding":
            return Placement(path, "embedding", "weight", 1, (0, 1)) if weight.ndim == 2 else None
        n = weight.ndim
        if n == 2:
            conv1d = self.gpt2_style and _GPT2_CONV1D.match(name)
            return Placement(path, "linear", "weight", 1, (0, 1) if conv1d else (1, 0))
        return Placement(path, "linear", "weight", n - 1, (n - 1, n - 2, *range(n - 2)))

    def param_mapping(self, path: tuple, torch_param: str) -> ParamMapping | None:
        """PyTorch parameters map onto themselves."""
        if torch_param in self._module(path):
            return ParamMapping(torch_param, _identity, np.asarray)
        return None

    def torch_param(self, flax_key: str) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
        return flax_key, np.asarray

    def embedding_key(self, path: tuple) -> str | None:
        weight = self._module(path).get("weight")
        return "weight" if getattr(weight, "ndim", 0) == 2 else None


def nest_keys(flat: Mapping[str, Any]) -> dict:
    """``{"a.b.weight": x}`` -> ``{"a": {"b": {"weight": x}}}`` (a state dict as a tree).

    Example:
        >>> nest_keys({"model.norm.weight": w})
        {'model': {'norm': {'weight': w}}}
    """
    tree: dict = {}
    clashes = []
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        if not isinstance(node, dict) or leaf in node:
            clashes.append(key)
            continue
        node[leaf] = value
    if clashes:
        raise CheckpointError("tensor names that cannot form a tree (a name is both a tensor and a module)",
                           clashes[:20])
    return tree


def flatten_keys(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """Inverse of :func:`nest_keys` (AdaptedModule nodes included: they are mappings)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_keys(value, name + "."))
        else:
            out[name] = value
    return out
