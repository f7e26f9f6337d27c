"""Layouts: where a PEFT (PyTorch) module lands in a Flax parameter tree, and with which axes.

A :class:`Rule` maps PEFT module names (a regex) to a kernel leaf (a path template) and says how
the leaf's axes relate to the PyTorch weight, einops-style. A :class:`Layout` is an ordered list of
rules; the first rule whose regex matches and whose leaf exists with the right number of axes wins.

The built-in ``"hf"`` layout (transformers' Flax naming) is such a list, plus two conveniences:
the base-model prefix that head classes have and base classes lack, and GPT-2's ``FlaxConv1D``
kernels, which are stored (out, in).

Example (a MaxText-style scanned model):
    >>> layout = jlora.Layout([
    ...     jlora.Rule(r"model\\.layers\\.(?P<layer>\\d+)\\.self_attn\\.q_proj",
    ...                "decoder/layers/attn/query/kernel", "(n h) i -> i layer n h"),
    ...     jlora.Rule(r"model\\.layers\\.(?P<layer>\\d+)\\.self_attn\\.o_proj",
    ...                "decoder/layers/attn/out/kernel", "o (n h) -> n layer h o"),
    ... ])
    >>> lora_params = jlora.load(params, "adapter", layout=layout)
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import numpy as np

from .errors import AdapterError
from .tree import find_key, iter_modules

logger = logging.getLogger("jlora")
_AXIS_TOKEN = re.compile(r"\(([^()]*)\)|([A-Za-z_][A-Za-z0-9_]*)")
LAYER, PART = "layer", "part"


def _parse_side(side: str) -> list[list[str]]:
    groups, pos = [], 0
    side = side.strip()
    for m in _AXIS_TOKEN.finditer(side):
        if side[pos:m.start()].strip():
            raise AdapterError(f"cannot parse axes {side!r}")
        groups.append(m.group(1).split() if m.group(1) is not None else [m.group(2)])
        pos = m.end()
    if side[pos:].strip():
        raise AdapterError(f"cannot parse axes {side!r}")
    return groups


@dataclasses.dataclass(frozen=True)
class Rule:
    """One PEFT module pattern -> one Flax kernel leaf.

    Args:
        match: regex full-matched against the PEFT module name (without ``base_model.model.``).
        path: ``/``-separated leaf path; ``{group}`` inserts a named group (dots in the value become
            path separators; digit segments also match the int keys of NNX trees).
        axes: ``"<torch weight axes> -> <flax leaf axes>"``. The torch side is the PyTorch weight:
            (out, in, *kernel) for Linear/Conv, (vocab, dim) for Embedding; parenthesised groups split
            a torch axis (``"(n h) i"``). On the right, ``layer`` is a stacking axis indexed by the
            ``layer`` group and ``part`` a fused-kernel axis indexed by ``part=``.
        sizes: sizes of split axes (``n=4``), checked against the leaf; ``part=`` an int or a group name.
            On the Flax side, a parenthesised group of output axes is one leaf axis holding them in that
            order (``"(n t j) i -> i n (j t)"``, ``t=2``: within each head, rows ``t * j_size + j`` of the
            PyTorch weight go to ``2 j + t``, an interleaving permutation of the output rows); at most one
            size per group may be left to infer from the leaf.
        out_scale: a factor by which the leaf's output rows are scaled relative to the PyTorch weight
            (e.g. a ``1/sqrt(head_dim)`` folded into a query kernel), a float or a callable that takes the
            axis sizes (``{"n": 4, "h": 16, ...}``) and returns one. ``lora_B`` (and DoRA's magnitude,
            ``lora_bias``) are multiplied by it in float32 on loading and divided by it on saving.

    Example:
        >>> Rule(r"model\\.layers\\.(?P<layer>\\d+)\\.self_attn\\.k_proj", "layers/{layer}/attn/kv/kernel",
        ...      "(k h) i -> i part k h", part=0)
        >>> Rule(r"model\\.layers\\.(?P<layer>\\d+)\\.self_attn\\.q_proj", "decoder/layers/query/kernel",
        ...      "(n t j) i -> i layer n (j t)", t=2, out_scale=lambda s: (2 * s["j"]) ** -0.5)
    """

    match: str
    path: str
    axes: str
    sizes: tuple = ()
    out_scale: float | Callable[[Mapping[str, int]], float] | None = None

    def __init__(self, match: str, path: str, axes: str, *,
                 out_scale: float | Callable[[Mapping[str, int]], float] | None = None, **sizes: Any):
        object.__setattr__(self, "match", match)
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "axes", axes)
        object.__setattr__(self, "sizes", tuple(sorted(sizes.items())))
        object.__setattr__(self, "out_scale", out_scale)
        if out_scale is not None and not callable(out_scale) and not isinstance(out_scale, (int, float)):
            raise AdapterError(f"Rule out_scale must be a number or a callable, found {type(out_scale).__name__}")
        try:
            re.compile(match)
        except re.error as err:
            raise AdapterError(f"Rule match {match!r} is not a valid regex: {err}") from None
        left, _, right = axes.partition("->")
        if not right:
            raise AdapterError(f"Rule axes {axes!r} need the form 'torch axes -> flax axes'")
        lhs, rhs = _parse_side(left), _parse_side(right)
        flat_left = [a for g in lhs for a in g]
        flat_right = [a for g in rhs for a in g]
        if any(len(g) != 1 and ({LAYER, PART} & set(g)) for g in rhs):
            raise AdapterError(f"Rule axes {axes!r}: the Flax side cannot group 'layer' or 'part'")
        extra = set(flat_right) - set(flat_left) - {LAYER, PART}
        missing = set(flat_left) - set(flat_right)
        if extra or missing or len(set(flat_right)) != len(flat_right) or len(lhs) < 2:
            raise AdapterError(f"Rule axes {axes!r}: the Flax side must use each torch axis once "
                               f"(extra {sorted(extra)}, missing {sorted(missing)})")
        if PART in flat_right and "part" not in dict(self.sizes):
            raise AdapterError(f"Rule axes {axes!r} use 'part': pass part=<index or group name>")

    @property
    def torch_groups(self) -> list[list[str]]:
        return _parse_side(self.axes.partition("->")[0])

    @property
    def flax_groups(self) -> list[list[str]]:
        """The Flax leaf's axes, each a list of the elementary axes it holds (one, unless grouped)."""
        return _parse_side(self.axes.partition("->")[2])

    @property
    def flax_axes(self) -> list[str]:
        """The Flax side's elementary axes, in order (a group's axes in the group's order)."""
        return [a for g in self.flax_groups for a in g]


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one PEFT module's tensors go, and how its factors map onto the kernel's axes.

    Canonical order is (input axes..., output axes...) in the kernel's own order (``part``, if any,
    is an output axis); the kernel without its layer axis is ``canonical.transpose(kernel_perm)``.
    """

    path: tuple  # keys from the tree root to the module's parameter dict
    kind: str  # "linear" | "embedding" | "none" (no LoRA factors)
    kernel_key: str = "kernel"
    in_ndim: int = 1
    kernel_perm: tuple[int, ...] = (0, 1)
    layer_axis: int | None = None  # axis of the kernel that stacks layers
    layer: int | None = None
    part_axis: int | None = None  # canonical axis indexing fused parts
    part: int | None = None
    in_sizes: tuple[int, ...] = ()  # PEFT's input axes, torch order (elementary)
    in_order: tuple[int, ...] = (0,)  # canonical input axis k = torch input axis in_order[k]
    out_sizes: tuple[int, ...] = ()
    out_order: tuple[int, ...] = (0,)
    a_tail: tuple[int, ...] = ()  # PEFT's lora_A shape after r
    b_tail: tuple[int, ...] = ()  # PEFT's lora_B shape after (out, r)
    # a grouped convolution's feature groups: PEFT's lora_A then reads all input channels (in = groups x the
    # kernel's), and its lora_B is a grouped 1x1 conv (out, r / groups, 1...): a block-diagonal lora_B
    groups: int = 1
    # block-diagonal factors (a grouped conv's lora_B, BD-LoRA's lora_A or lora_B): PEFT stores only the diagonal
    # blocks, stacked along the first axis (A (r, in / blocks), B (out, r / blocks, 1...)); jlora stores the full
    # factor with zeros off the blocks, which the forward masks so that training keeps them zero
    a_blocks: int = 1
    b_blocks: int = 1
    # a Flax-side group of output axes (Rule "... -> i (j t)"): the canonical outputs' shape, each leaf axis
    # holding its group's elementary axes (None: no group, one leaf axis per elementary output axis)
    out_shape: tuple[int, ...] | None = None
    # the leaf's output rows are the PyTorch weight's times this (Rule ``out_scale``)
    out_scale: float = 1.0

    def with_groups(self, groups: int) -> "Placement":
        """This placement for a LoRA on a convolution with ``groups`` feature groups (see ``groups``)."""
        grow = lambda sizes: (sizes[0] * groups, *sizes[1:])  # noqa: E731  (input channels: torch's first in axis)
        return dataclasses.replace(self, groups=groups, b_blocks=groups, in_sizes=grow(self.in_sizes),
                                   a_tail=grow(self.a_tail))

    def with_blocks(self, a_blocks: int, b_blocks: int) -> "Placement":
        """This placement for a BD-LoRA (block-diagonal lora_A or lora_B, see ``a_blocks``)."""
        return dataclasses.replace(self, a_blocks=a_blocks, b_blocks=b_blocks,
                                   a_tail=(self.a_tail[0] // a_blocks, *self.a_tail[1:]))

    # ---- PEFT factors <-> canonical factors ---------------------------------------------------
    def a_to_canonical(self, a: np.ndarray) -> np.ndarray:
        """PEFT lora_A (r, in...) -> (canonical inputs..., r); a block-diagonal one's (r, in / blocks) expanded."""
        a = _block_diagonal(a, self.a_blocks)
        a = a.reshape(a.shape[0], *self.in_sizes)
        return a.transpose(*(1 + i for i in self.in_order), 0)

    @property
    def out_elementary_shape(self) -> tuple[int, ...]:
        """The canonical outputs' elementary axes' sizes (before a Flax-side group merges some)."""
        return tuple(self.out_sizes[i] for i in self.out_order)

    def _b_canonical(self, b: np.ndarray) -> np.ndarray:
        b = _block_diagonal(b, self.b_blocks)
        b = b.reshape(*self.out_sizes, b.shape[1])
        b = b.transpose(len(self.out_sizes), *self.out_order)
        return b if self.out_shape is None else b.reshape(b.shape[0], *self.out_shape)

    def b_to_canonical(self, b: np.ndarray) -> np.ndarray:
        """PEFT lora_B (out, r, 1...) -> (r, canonical outputs... without part); a block-diagonal one's
        (out, r / blocks, 1...) expanded; times ``out_scale``."""
        return _scale_rows(self._b_canonical(b), self.out_scale)

    def out_to_canonical(self, v: np.ndarray) -> np.ndarray:
        """A PEFT per-output vector (out,) (DoRA magnitude, lora_B bias) -> canonical outputs, times ``out_scale``."""
        v = v.reshape(self.out_sizes).transpose(self.out_order)
        return _scale_rows(v if self.out_shape is None else v.reshape(self.out_shape), self.out_scale)

    def a_to_torch(self, a) -> np.ndarray:
        a = np.asarray(a)
        inverse = np.argsort(self.in_order)
        a = a.transpose(a.ndim - 1, *inverse).reshape(a.shape[-1], -1)
        return _diagonal_blocks(a, self.a_blocks).reshape(a.shape[0], *self.a_tail)

    def b_to_torch(self, b) -> np.ndarray:
        b = _unscale_rows(np.asarray(b), self.out_scale)
        if self.out_shape is not None:
            b = b.reshape(b.shape[0], *self.out_elementary_shape)
        inverse = np.argsort(self.out_order)
        b = b.transpose(*(1 + i for i in inverse), 0).reshape(-1, b.shape[0], *self.b_tail)
        return _diagonal_blocks(b, self.b_blocks)

    def a_block_mask(self, rank: int) -> np.ndarray | None:
        """Where a canonical ``(inputs..., rank)`` lora_A may be nonzero (None: everywhere)."""
        if self.a_blocks == 1:
            return None
        return self.a_to_canonical(np.ones((rank, int(np.prod(self.in_sizes)) // self.a_blocks), np.float32))

    def b_block_mask(self, rank: int) -> np.ndarray | None:
        """Where a canonical ``(rank, outputs...)`` lora_B may be nonzero (None: everywhere)."""
        if self.b_blocks == 1:
            return None
        ones = np.ones((int(np.prod(self.out_sizes)), rank // self.b_blocks, *self.b_tail), np.float32)
        return self._b_canonical(ones)

    def out_to_torch(self, v) -> np.ndarray:
        v = _unscale_rows(np.asarray(v), self.out_scale)
        if self.out_shape is not None:
            v = v.reshape(self.out_elementary_shape)
        return v.transpose(np.argsort(self.out_order)).reshape(-1)

    @property
    def magnitude_shape(self) -> tuple[int, ...]:
        """PEFT's DoRA magnitude shape: ``(out,)``, or ``(1, out, 1...)`` for a ConvNd (its weight norm, kept)."""
        out = int(np.prod(self.out_sizes))
        return (1, out, *self.b_tail) if self.b_tail else (out,)

    def magnitude_to_torch(self, v) -> np.ndarray:
        return self.out_to_torch(v).reshape(self.magnitude_shape)

    @property
    def stacked(self) -> bool:
        return self.layer_axis is not None

    @property
    def fused(self) -> bool:
        return self.part_axis is not None


@dataclasses.dataclass(frozen=True)
class ParamMapping:
    """How one PyTorch parameter of a module maps onto a Flax leaf."""

    flax_key: str
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


def _scale_rows(x: np.ndarray, scale: float) -> np.ndarray:
    """``x * scale`` computed as MaxText's converter does (in float32, cast back); ``x`` when ``scale`` is 1."""
    if scale == 1.0:
        return x
    work = np.float32 if np.dtype(x.dtype).itemsize <= 4 else np.float64
    return (np.asarray(x, work) * work(np.float32(scale))).astype(x.dtype)


def _unscale_rows(x: np.ndarray, scale: float) -> np.ndarray:
    """The inverse of :func:`_scale_rows`: ``x / scale`` in float64, rounded once to ``x``'s dtype (so that a
    scaled float32 value comes back to the value it was scaled from)."""
    if scale == 1.0:
        return x
    return (np.asarray(x, np.float64) / np.float64(np.float32(scale))).astype(x.dtype)


def _block_diagonal(x: np.ndarray, blocks: int) -> np.ndarray:
    """PEFT's stacked diagonal blocks ``(R, C / blocks, ...)`` (block ``i``: rows ``i R / blocks ...``) as the full
    block-diagonal ``(R, C, ...)`` (as ``torch.block_diag(*weight.chunk(blocks))``)."""
    if blocks == 1:
        return x
    rows, cols = x.shape[0] // blocks, x.shape[1]
    full = np.zeros((x.shape[0], cols * blocks, *x.shape[2:]), x.dtype)
    for i in range(blocks):
        full[i * rows:(i + 1) * rows, i * cols:(i + 1) * cols] = x[i * rows:(i + 1) * rows]
    return full


def _diagonal_blocks(x: np.ndarray, blocks: int) -> np.ndarray:
    """The inverse of :func:`_block_diagonal`: a full ``(R, C, ...)``'s diagonal blocks, stacked as
    ``(R, C / blocks, ...)``."""
    if blocks == 1:
        return x
    rows, cols = x.shape[0] // blocks, x.shape[1] // blocks
    return np.concatenate([x[i * rows:(i + 1) * rows, i * cols:(i + 1) * cols] for i in range(blocks)])


def torch_weight_to_kernel(w: np.ndarray) -> np.ndarray:
    """A PyTorch (out, in, *k) weight as a Flax (*k, in, out) kernel (GPT-2 Conv1D: (in,out)->(out,in))."""
    return w.transpose(*range(2, w.ndim), 1, 0)


def kernel_to_torch_weight(k: np.ndarray) -> np.ndarray:
    k = np.asarray(k)
    return k.transpose(k.ndim - 1, k.ndim - 2, *range(k.ndim - 2))


def w_leaf_to_torch_weight(w: Any) -> np.ndarray:
    """A tunix ``w`` leaf as a PyTorch weight: a 2-D one (an output head, ``(in, out)``) transposed, a 1-D one (a
    norm) as it is (the "tunix" layout places no other ``w`` leaf as a replaced tensor). ``jlora.save``, which reads
    trees without their layout, converts ``w`` leaves through :meth:`Layout.torch_param`, which calls this.

    Args:
        w: the leaf (any array).

    Returns:
        The PyTorch ``weight`` as a numpy array.

    Example:
        >>> w_leaf_to_torch_weight(np.zeros((32, 64))).shape     # lm_head/w (D, V) -> lm_head.weight (V, D)
        (64, 32)
    """
    w = np.asarray(w)
    return w.T if w.ndim == 2 else w


def _identity(x):
    return x


def _group_value(value: str | None) -> list[str]:
    return [] if value is None else value.split(".")


def _path_segments(path: str, m: re.Match) -> list[str]:
    """A rule's path template filled from match ``m``: a segment that is one ``{group}`` becomes the group's
    value split at its dots; a segment that mixes text and groups (``layers_{i}``) becomes one key."""
    segments: list[str] = []
    for seg in path.split("/"):
        pieces = [p for p in re.split(r"(\{\w+\})", seg) if p]
        values = [(m.groupdict().get(p[1:-1]) or "") if p.startswith("{") and p.endswith("}") else p for p in pieces]
        if len(pieces) == 1 and pieces[0].startswith("{") and pieces[0].endswith("}"):
            segments.extend(_group_value(m.groupdict().get(pieces[0][1:-1])))
        elif pieces:
            segments.append("".join(values))
    return segments


class Layout:
    """An ordered list of :class:`Rule`; pass it as ``jlora.load(..., layout=...)``.

    Example:
        >>> layout = jlora.Layout([jlora.Rule(r"(?P<m>.+)", "{m}/kernel", "o i -> i o")], name="plain")
    """

    tree_name = "Flax"  # how messages call the trees this layout reads

    def __init__(self, rules: Sequence[Rule], *, name: str | None = None, params: Mapping | None = None):
        self.rules = tuple(rules)
        self.name = name or "custom"
        self.params = params
        for r in self.rules:
            if not isinstance(r, Rule):
                raise AdapterError(f"Layout rules must be jlora.Rule objects, found {type(r).__name__}")

    # ---- binding ----------------------------------------------------------------------------
    def bind(self, params: Mapping, names: Sequence[str] = ()) -> "Layout":
        """This layout for ``params``."""
        _check_tree(params)
        return type(self)(self.rules, name=self.name, params=params)

    def module_name(self, name: str) -> str:
        """The name rules are matched against (hook for the hf layout's prefix handling)."""
        return name

    def rules_for(self, name: str, lora_kind: str | None = None) -> Sequence[Rule]:
        return self.rules

    # ---- placements ---------------------------------------------------------------------------
    def _walk(self, segments: Sequence[str]) -> tuple[tuple, Any] | None:
        node, path = self.params, []
        for seg in segments:
            if not isinstance(node, Mapping):
                return None
            key = find_key(node, seg)
            if key is None:
                return None
            path.append(key)
            node = node[key]
        return tuple(path), node

    def _module_path(self, name: str) -> tuple | None:
        found = self._walk(self.module_name(name).split("."))
        return found[0] if found and isinstance(found[1], Mapping) and found[0] else None

    def place(self, name: str, lora_kind: str | None = None,
              fits: Callable[[Placement], bool] | None = None) -> Placement | None:
        """The placement of PEFT module ``name`` (None when no rule places it).

        ``lora_kind`` is ``"linear"`` or ``"embedding"`` for a module with LoRA factors, ``"parameter"`` for a
        LoRA on a parameter (see :mod:`jlora.param_targets`: placed as a linear one), else None (only replacement
        tensors: the module's own dict is used). ``fits``: of the rules that place it, the first whose placement
        fits wins (when none fits, the first that places it, so that the error names the shapes).
        """
        target = self.module_name(name)
        first = None
        for rule in self.rules_for(name, lora_kind):
            m = re.fullmatch(rule.match, target)
            if m is None:
                continue
            found = self._walk(_path_segments(rule.path, m))
            if found is None or not hasattr(found[1], "shape"):
                continue
            path, leaf = found
            if lora_kind is None:
                return Placement(path[:-1], "none", path[-1])
            placement = _placement_from_rule(rule, m, path, leaf, "linear" if lora_kind == "parameter" else lora_kind)
            if placement is not None and (fits is None or fits(placement)):
                return placement
            first = first or placement
        if first is not None:
            return first
        if lora_kind is None:
            path = self._module_path(name)
            return Placement(path, "none") if path is not None else None
        return None

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
        if flax_key == "input_embedding":  # the "tunix" layout's leaves (jlora.save reads trees without their
            return "weight", np.asarray        # layout): the embedding table, and a head's or a norm's ``w``
        if flax_key == "w":
            return "weight", w_leaf_to_torch_weight
        return flax_key, np.asarray

    def report_unused(self, names: Sequence[str]) -> list[Rule]:
        """Rules that match none of ``names``, reported on the ``jlora`` logger (like qwix's
        ``get_unused_rules``): normal when an adapter targets a subset of what a layout covers."""
        unused = [r for r in self.rules if not any(re.fullmatch(r.match, self.module_name(n)) for n in names)]
        if unused:
            logger.info("layout %r: rules that matched no adapter module: %s", self.name, [r.match for r in unused])
        return unused

    # ---- diagnostics --------------------------------------------------------------------------
    def closest(self, name: str, n: int = 3) -> list[str]:
        """The module paths of the tree that look most like PEFT module ``name``."""
        paths = ["/".join(map(str, p)) for p, _ in iter_modules(self.params)]
        return difflib.get_close_matches(self.module_name(name).replace(".", "/"), paths, n=n, cutoff=0.4)

    def head_tied_to_embedding(self) -> bool:
        """Whether the tree looks like a model whose output head reads the input embedding table: it has no
        ``lm_head`` / ``embed_out`` module of its own (GPT-2, Gemma, OPT, Bart; also head-less base models)."""
        return not any(key in ("lm_head", "embed_out") for p, _ in iter_modules(self.params) for key in map(str, p))

    def head_copying(self, table: Any) -> tuple | None:
        """The module path of an output head (``lm_head`` / ``embed_out``) whose kernel is a copy of embedding
        ``table`` transposed: a tied model converted into a tree with an untied head (FlaxLlama has no tying)."""
        for path, module in iter_modules(self.params):
            kernel = module.get("kernel")
            if path and str(path[-1]) in ("lm_head", "embed_out") and getattr(kernel, "shape", None) == \
                    tuple(table.shape[::-1]) and np.array_equal(np.asarray(kernel[:, :4]), np.asarray(table[:4]).T) \
                    and np.array_equal(np.asarray(kernel), np.asarray(table).T):  # (a few rows first: cheap rejection)
                return path
        return None

    def explain_missing(self, name: str) -> str:
        hint = ""
        if name.split(".")[-1] in ("lm_head", "embed_out") and self.head_tied_to_embedding():
            hint = (f" (this {self.tree_name} model ties its output head to the input embedding, so it has no "
                    "separate lm_head leaf; PEFT's lm_head adapter cannot be placed. Untie the head, "
                    "or drop lm_head from the adapter)")
        wanted = self.module_name(name).replace(".", "/")
        same = next((m for p, m in iter_modules(self.params) if "/".join(map(str, p)) == wanted), None)
        if same is not None:  # (e.g. a weight-normalised conv: weight_g / weight_v, no kernel)
            return (f"module {name!r}: the {self.tree_name} module {wanted!r} holds no leaf this layout adapts "
                    f"(its leaves: {sorted(map(str, same))}){hint}")
        close = self.closest(name)
        near = f"; closest {self.tree_name} paths: {close}" if close else ""
        return f"module {name!r} has no place in the {self.tree_name} tree (layout {self.name!r}){hint}{near}"


def _group_sizes(rule: Rule, path: tuple, leaf, groups: list[list[str]]) -> dict[str, int]:
    """Every elementary Flax-side axis' size: a leaf axis' own, or within a group the declared sizes with at most
    one left to infer (the product must be the leaf axis' size)."""
    declared = dict(rule.sizes)
    sizes: dict[str, int] = {}
    where = f"Rule {rule.match!r} at {'/'.join(map(str, path))} {list(leaf.shape)}"
    for dim, group in zip(leaf.shape, groups):
        if len(group) == 1:
            sizes[group[0]] = int(dim)
            continue
        unknown = [a for a in group if a not in declared]
        known = int(np.prod([declared[a] for a in group if a in declared]))
        if len(unknown) > 1 or known == 0 or dim % known or (not unknown and known != dim):
            raise AdapterError(f"{where}: the group ({' '.join(group)}) needs sizes whose product is {dim} "
                               f"(at most one left to infer), declared {declared}")
        sizes.update({a: int(declared[a]) for a in group if a in declared})
        sizes.update({a: int(dim) // known for a in unknown})
    return sizes


def _layer_index(rule: Rule, m: re.Match, leaf, layer_axis: int | None) -> tuple[int | None, bool]:
    """The ``layer`` group's value (None without a layer axis) and whether it is within the leaf."""
    if layer_axis is None:
        return None, True
    value = m.groupdict().get(LAYER)
    if value is None or not value.isdigit():
        raise AdapterError(f"Rule {rule.match!r} stacks layers but has no (?P<layer>\\d+) group")
    return int(value), int(value) < leaf.shape[layer_axis]


def _placement_from_rule(rule: Rule, m: re.Match, path: tuple, leaf, kind: str) -> Placement | None:
    flax_groups = rule.flax_groups
    if leaf.ndim != len(flax_groups):
        return None
    groups = rule.torch_groups
    if kind == "embedding":
        if len(groups) != 2:
            return None
        in_groups, out_groups = groups[:1], groups[1:2]
    else:
        in_groups, out_groups = groups[1:], groups[:1]
    in_elems = [a for g in in_groups for a in g]
    out_elems = [a for g in out_groups for a in g]
    if any(len(g) > 1 and not set(g) <= set(out_elems) for g in flax_groups):
        raise AdapterError(f"Rule {rule.match!r} ({rule.axes!r}): a Flax-side group may only hold output axes")
    sizes = _group_sizes(rule, path, leaf, flax_groups)
    declared = dict(rule.sizes)
    bad = [f"{a}={v} (leaf has {sizes[a]})" for a, v in declared.items() if a in sizes and a != PART and sizes[a] != v]
    if bad:
        raise AdapterError(f"Rule {rule.match!r}: sizes do not match the leaf at {'/'.join(map(str, path))} "
                           f"{list(leaf.shape)}: {bad}")
    no_layer = [g for g in flax_groups if g != [LAYER]]
    canonical = [g for g in no_layer if g[0] in in_elems] + [g for g in no_layer if g[0] not in in_elems]
    layer_axis = flax_groups.index([LAYER]) if [LAYER] in flax_groups else None
    layer, inside = _layer_index(rule, m, leaf, layer_axis)
    if not inside:
        return None
    part_axis = part = None
    if [PART] in flax_groups:
        part_axis = canonical.index([PART])
        spec = declared[PART]
        part = spec if isinstance(spec, int) else int(m.group(spec))
    canon_in = [g[0] for g in canonical if g[0] in in_elems]
    canon_out = [a for g in canonical for a in g if a in out_elems]
    merged = any(len(g) > 1 for g in flax_groups)
    scale = rule.out_scale(dict(sizes)) if callable(rule.out_scale) else rule.out_scale
    return Placement(
        path=path[:-1], kind=kind, kernel_key=path[-1], in_ndim=len(canon_in),
        kernel_perm=tuple(canonical.index(g) for g in no_layer),
        layer_axis=layer_axis, layer=layer, part_axis=part_axis, part=part,
        in_sizes=tuple(sizes[a] for a in in_elems), in_order=tuple(in_elems.index(a) for a in canon_in),
        out_sizes=tuple(sizes[a] for a in out_elems), out_order=tuple(out_elems.index(a) for a in canon_out),
        a_tail=tuple(int(np.prod([sizes[a] for a in g])) for g in in_groups),
        b_tail=(1,) * (len(in_groups) - 1) if kind != "embedding" else (),
        out_shape=tuple(int(np.prod([sizes[a] for a in g])) for g in canonical
                        if g[0] in out_elems) if merged else None,
        out_scale=1.0 if scale is None else float(scale),
    )


# ---- the built-in "hf" layout ------------------------------------------------------------------
GPT2_CONV1D = r"(?P<name>(.*\.)?(attn\.(c_attn|c_proj|q_attn)|mlp\.(c_fc|c_proj)))"
HF_RULES = (
    Rule(r"(?P<name>.+)", "{name}/embedding", "v d -> v d"),
    Rule(r"(?P<name>.+)", "{name}/kernel", "o i -> i o"),
    Rule(r"(?P<name>.+)", "{name}/kernel", "o i k -> k i o"),
    Rule(r"(?P<name>.+)", "{name}/kernel", "o i kh kw -> kh kw i o"),
    Rule(r"(?P<name>.+)", "{name}/kernel", "o i kd kh kw -> kd kh kw i o"),
)
GPT2_RULE = Rule(GPT2_CONV1D, "{name}/kernel", "o i -> o i")
# LoRA on parameters (jlora.param_targets): the leaf as PyTorch stores it, an expert stack (E, out, in) as PEFT reads
# it, or (E, in, out) as it reads classes with ``is_transposed`` (the one that fits the factors wins); a 2-D one
# (out, in), or transposed
_EXPERT = r"(?P<name>.+)\.(?P<param>[^.]+)\.(?P<layer>\d+)"
PARAMETER_RULES = (
    Rule(_EXPERT, "{name}/{param}", "o i -> layer o i"),
    Rule(_EXPERT, "{name}/{param}", "o i -> layer i o"),
    Rule(r"(?P<name>.+)\.(?P<param>[^.]+)", "{name}/{param}", "o i -> o i"),
    Rule(r"(?P<name>.+)\.(?P<param>[^.]+)", "{name}/{param}", "o i -> i o"),
)


def _check_tree(params: Any) -> None:
    if not isinstance(params, Mapping):
        raise AdapterError(f"params must be a nested dict of arrays, found {type(params).__name__}")


class HfLayout(Layout):
    """transformers' Flax naming (see module docstring). Use :meth:`bind` on a tree first.

    Example:
        >>> bound = HfLayout().bind(model.params)          # what jlora.load(..., layout="hf") uses
    """

    def __init__(self, rules: Sequence[Rule] = HF_RULES, *, name: str | None = "hf", params: Mapping | None = None,
                 prefix_mode: tuple = ("exact",), gpt2_style: bool | None = None):
        super().__init__(rules, name=name or "hf", params=params)
        self.prefix_mode = prefix_mode
        if gpt2_style is None:  # GPT-2's Conv1D kernels are (out, in): found by its attention naming
            gpt2_style = params is not None and any(p[-2:] == ("attn", "c_attn") for p, _ in iter_modules(params))
        self.gpt2_style = gpt2_style

    def bind(self, params: Mapping, names: Sequence[str] = ()) -> "HfLayout":
        """This layout for ``params``, with the base-prefix convention that fits ``names`` best."""
        _check_tree(params)
        modes = [("exact",), ("strip",)] + [("add", k) for k in params if isinstance(k, str)]
        best, best_hits = ("exact",), -1
        gpt2_style = type(self)(self.rules, name=self.name, params=params).gpt2_style  # one walk of the tree
        for mode in modes:
            cand = type(self)(self.rules, name=self.name, params=params, prefix_mode=mode, gpt2_style=gpt2_style)
            hits = sum(cand._module_path(n) is not None for n in names)
            if hits > best_hits:
                best, best_hits = mode, hits
        return type(self)(self.rules, name=self.name, params=params, prefix_mode=best, gpt2_style=gpt2_style)

    def module_name(self, name: str) -> str:
        if self.prefix_mode[0] == "strip":
            return name.partition(".")[2]
        if self.prefix_mode[0] == "add":
            return f"{self.prefix_mode[1]}.{name}"
        return name

    def rules_for(self, name: str, lora_kind: str | None = None) -> Sequence[Rule]:
        if lora_kind == "parameter":
            return PARAMETER_RULES
        return (GPT2_RULE,) + self.rules if self.gpt2_style else self.rules

    def report_unused(self, names: Sequence[str]) -> list[Rule]:
        return []
