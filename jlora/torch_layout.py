"""Layout ``"torch"``: a PyTorch state dict as a tree (a Hugging Face checkpoint's flat keys nested
at the dots), placed by the same rules machinery as the Flax ``"hf"`` layout.

Only the leaves differ from ``"hf"``: every module keeps PyTorch's ``weight`` (and ``bias``):
Linear ``(out, in)``, GPT-2's Conv1D ``(in, out)``, Embedding ``(V, D)``, ConvNd ``(out, in, *k)``.
Name lookup, base-model prefixes, GPT-2 detection and diagnostics are :class:`HfLayout`'s.

Example:
    >>> tree = nest_keys(safetensors_shard)               # {"model": {"layers": {"0": ...}}}
    >>> lp = jlora.place(tree, config, adapter_tensors, layout="torch")
    >>> merged = jlora.merge(lp)                           # same tree, weights with the adapter folded in
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable

import numpy as np

from .errors import CheckpointError
from .layout import GPT2_CONV1D, PARAMETER_RULES, HfLayout, ParamMapping, Rule

_EMBEDDING_RULES = (Rule(r"(?P<name>.+)", "{name}/weight", "v d -> v d"),)
_LINEAR_RULES = (
    Rule(r"(?P<name>.+)", "{name}/weight", "o i -> o i"),
    Rule(r"(?P<name>.+)", "{name}/weight", "o i k -> o i k"),
    Rule(r"(?P<name>.+)", "{name}/weight", "o i kh kw -> o i kh kw"),
    Rule(r"(?P<name>.+)", "{name}/weight", "o i kd kh kw -> o i kd kh kw"),
)
_CONV1D_RULE = Rule(GPT2_CONV1D, "{name}/weight", "o i -> i o")  # transformers' Conv1D stores (in, out)


def _identity(x):
    return x


class TorchLayout(HfLayout):
    """PyTorch names and layouts (see module docstring). Use :meth:`bind` on a tree first."""

    tree_name = "PyTorch"

    def __init__(self, rules: Sequence[Rule] = _LINEAR_RULES, *, name: str | None = "torch",
                 params: Mapping | None = None, prefix_mode: tuple = ("exact",), gpt2_style: bool | None = None):
        super().__init__(rules, name=name or "torch", params=params, prefix_mode=prefix_mode, gpt2_style=gpt2_style)

    def rules_for(self, name: str, lora_kind: str | None = None) -> Sequence[Rule]:
        if lora_kind == "embedding":
            return _EMBEDDING_RULES
        if lora_kind == "parameter":
            return PARAMETER_RULES
        return (_CONV1D_RULE,) + self.rules if self.gpt2_style else self.rules

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
