"""Layouts: where a PEFT (PyTorch) module lands in a Flax parameter tree, and with which axes.

The built-in ``"hf"`` layout is transformers' Flax naming: the PyTorch module name with dots as
nested keys, ``kernel`` stored (in, out) (GPT-2's ``FlaxConv1D``: (out, in)), ``embedding`` (V, D),
conv kernels (kh, kw, in, out), and a base-model prefix that head classes have and base classes lack.

Example:
    >>> layout = get_layout("hf").bind(params)
    >>> layout.place("model.layers.0.self_attn.q_proj").path
    ('model', 'layers', '0', 'self_attn', 'q_proj')
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np

from .errors import AdapterError
from .tree import find_key, iter_modules

# GPT-2 family modules that are transformers' Conv1D (kernel stored (out, in) in Flax).
_GPT2_CONV1D = re.compile(r"(^|.*\.)(attn\.(c_attn|c_proj|q_attn)|mlp\.(c_fc|c_proj))$")


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one PEFT module's tensors go in the Flax tree."""

    path: tuple  # keys from the tree root to the module's parameter dict
    kind: str  # "linear" (Dense, Conv1D, conv) | "embedding" | "none" (no LoRA kernel)
    kernel_key: str = "kernel"
    in_ndim: int = 1
    kernel_perm: tuple[int, ...] = (0, 1)


def torch_to_flax_factors(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PEFT factors -> jlora's: A (r, in, *k) -> (*k, in, r); B (out, r, 1...) -> (r, out)."""
    return a.transpose(*range(2, a.ndim), 1, 0), b.reshape(b.shape[0], b.shape[1]).T


def flax_to_torch_factors(a, b, kernel_ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`torch_to_flax_factors` for a kernel with ``kernel_ndim`` axes."""
    a = np.asarray(a)
    a_t = a.transpose(a.ndim - 1, a.ndim - 2, *range(a.ndim - 2))
    b_t = np.asarray(b).T
    if a.ndim > 2:  # conv: B is (out, r, 1, ...)
        b_t = b_t.reshape(*b_t.shape, *([1] * (kernel_ndim - 2)))
    return a_t, b_t


def torch_weight_to_kernel(w: np.ndarray) -> np.ndarray:
    """A PyTorch (out, in, *k) weight as a Flax (*k, in, out) kernel (GPT-2 Conv1D: (in,out)->(out,in))."""
    return w.transpose(*range(2, w.ndim), 1, 0)


def kernel_to_torch_weight(k: np.ndarray) -> np.ndarray:
    k = np.asarray(k)
    return k.transpose(k.ndim - 1, k.ndim - 2, *range(k.ndim - 2))


def _identity(x):
    return x


@dataclasses.dataclass(frozen=True)
class ParamMapping:
    """How one PyTorch parameter of a module maps onto a Flax leaf."""

    flax_key: str
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


class HfLayout:
    """transformers' Flax naming (see module docstring). Use :meth:`bind` on a tree first."""

    name = "hf"
    tree_name = "Flax"  # how messages call the trees this layout reads

    def __init__(self, params: Mapping | None = None, prefix_mode: tuple = ("exact",)):
        self.params = params
        self.prefix_mode = prefix_mode
        self.gpt2_style = params is not None and any(
            p[-2:] == ("attn", "c_attn") for p, _ in iter_modules(params))

    # ---- binding to a tree ----------------------------------------------------------------
    def bind(self, params: Mapping, names: list[str] = ()) -> "HfLayout":
        """This layout for ``params``, with the base-prefix convention that fits ``names`` best."""
        if not isinstance(params, Mapping):
            raise AdapterError(f"params must be a nested dict of arrays, found {type(params).__name__}")
        modes = [("exact",), ("strip",)] + [("add", k) for k in params if isinstance(k, str)]
        best, best_hits = ("exact",), -1
        for mode in modes:
            cand = type(self)(params, mode)
            hits = sum(cand._find(n) is not None for n in names)
            if hits > best_hits:
                best, best_hits = mode, hits
        return type(self)(params, best)

    def _segments(self, name: str) -> list[str]:
        segs = name.split(".")
        if self.prefix_mode[0] == "strip":
            return segs[1:]
        if self.prefix_mode[0] == "add":
            return [self.prefix_mode[1]] + segs
        return segs

    def _find(self, name: str) -> tuple | None:
        node, path = self.params, []
        for seg in self._segments(name):
            if not isinstance(node, Mapping):
                return None
            key = find_key(node, seg)
            if key is None:
                return None
            path.append(key)
            node = node[key]
        return tuple(path) if isinstance(node, Mapping) and path else None

    # ---- placements ---------------------------------------------------------------------------
    def place(self, name: str, lora_kind: str | None = None) -> Placement | None:
        """The placement of PEFT module ``name`` (None when the tree has no such module).

        ``lora_kind`` is ``"linear"`` or ``"embedding"`` for a module with LoRA factors, else None.
        """
        path = self._find(name)
        if path is None:
            return None
        module = self._module(path)
        if lora_kind is None:
            return Placement(path, "none")
        if lora_kind == "embedding":
            if "embedding" not in module:
                return None
            return Placement(path, "embedding", "embedding", 1, (0, 1))
        kernel = module.get("kernel")
        if kernel is None or kernel.ndim < 2:
            return None
        if kernel.ndim == 2:
            conv1d = self.gpt2_style and _GPT2_CONV1D.match(name)
            return Placement(path, "linear", "kernel", 1, (1, 0) if conv1d else (0, 1))
        # conv kernels (*k, in, out): canonical already
        return Placement(path, "linear", "kernel", kernel.ndim - 1, tuple(range(kernel.ndim)))

    def embedding_key(self, path: tuple) -> str | None:
        """The key of the embedding table (V, D) of the module at ``path`` (trainable tokens), or None."""
        return "embedding" if "embedding" in self._module(path) else None

    def _module(self, path: tuple) -> Mapping:
        node = self.params
        for k in path:
            node = node[k]
        return node

    def param_mapping(self, path: tuple, torch_param: str) -> ParamMapping | None:
        """How PyTorch parameter ``torch_param`` (e.g. ``weight``) of the module at ``path`` maps."""
        module = self._module(path)
        if torch_param == "weight":
            if "kernel" in module:
                return ParamMapping("kernel", torch_weight_to_kernel, kernel_to_torch_weight)
            for key in ("embedding", "scale", "weight"):
                if key in module:
                    return ParamMapping(key, _identity, np.asarray)
            return None
        if torch_param in module:
            return ParamMapping(torch_param, _identity, np.asarray)
        return None

    def torch_param(self, flax_key: str) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
        """The PyTorch parameter name of Flax leaf ``flax_key`` and the conversion to its layout."""
        if flax_key == "kernel":
            return "weight", kernel_to_torch_weight
        if flax_key in ("embedding", "scale"):
            return "weight", np.asarray
        return flax_key, np.asarray

    # ---- diagnostics --------------------------------------------------------------------------
    def closest(self, name: str, n: int = 3) -> list[str]:
        """The module paths of the tree that look most like PEFT module ``name``."""
        paths = ["/".join(map(str, p)) for p, _ in iter_modules(self.params)]
        return difflib.get_close_matches("/".join(self._segments(name)), paths, n=n, cutoff=0.4)

    def explain_missing(self, name: str) -> str:
        hint = ""
        if name.split(".")[-1] in ("lm_head", "embed_out") and not any(
                "lm_head" in map(str, p) for p, _ in iter_modules(self.params)):
            hint = (f" (this {self.tree_name} model ties its output head to the input embedding, so it has no "
                    "separate lm_head leaf; PEFT's lm_head adapter cannot be placed. Untie the head, "
                    "or drop lm_head from the adapter)")
        close = self.closest(name)
        near = f"; closest {self.tree_name} paths: {close}" if close else ""
        return f"module {name!r} has no place in the {self.tree_name} tree{hint}{near}"


def get_layout(layout: Any) -> HfLayout:
    """The layout object for ``layout`` ("hf", "torch" or a layout instance)."""
    if layout == "hf":
        return HfLayout()
    if layout == "torch":
        from .torch_layout import TorchLayout  # a variant of HfLayout, in its own file

        return TorchLayout()
    if hasattr(layout, "bind") and hasattr(layout, "place"):
        return layout
    raise AdapterError(f"unknown layout {layout!r}; use 'hf', 'torch' or a jlora layout object")
