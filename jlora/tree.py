"""The LoRA parameter tree: the caller's tree with some module dicts replaced by AdaptedModule.

An :class:`AdaptedModule` is a read-only mapping (so ``lp["q_proj"]["lora_A"]`` works) and a pytree
node whose children are arrays (the base ``kernel``/``bias`` shared with the caller's tree, plus
``lora_A``, ``lora_B`` and friends) and whose static metadata is a :class:`ModuleSpec`.

Example:
    >>> node = lora_params["model"]["layers"]["0"]["self_attn"]["q_proj"]
    >>> sorted(node), float(node["lora_scale"])
    (['kernel', 'lora_A', 'lora_B', 'lora_scale'], 2.0)
"""
from __future__ import annotations

import dataclasses
import sys
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import jax

from .errors import UnwrappedAdapterWarning

LORA_A = "lora_A"
LORA_B = "lora_B"
MAGNITUDE = "lora_magnitude"
LORA_BIAS = "lora_bias"
TOKEN_DELTA = "token_delta"
RANK_SCALE = "lora_scale"
# a replaced embedding table whose output head is tied to it: the base table, which the head keeps reading
# (PEFT's modules_to_save copies the embedding module; the tied head still holds the original weight)
BASE_TABLE = "base_table"
# Arrow routing (jlora.arrow): each task adapter's prototype, the top right singular vector of its B @ A (E, in)
ARROW_PROTOTYPES = "arrow_prototypes"
# KaSA (PEFT's kasa_config): the trainable singular values between A and B (r,), and the base weight's r smallest
# singular components, which KaSA drops: frozen, as ``x @ kasa_down @ kasa_up`` ((in, r) and (r, out)) added to the
# base output, so the base arrays stay as they are
LORA_DIAG = "lora_diag"
KASA_DOWN = "kasa_down"
KASA_UP = "kasa_up"
ADAPTER_KEYS = (LORA_A, LORA_B, MAGNITUDE, LORA_BIAS, TOKEN_DELTA, RANK_SCALE, BASE_TABLE, ARROW_PROTOTYPES, LORA_DIAG,
                KASA_DOWN, KASA_UP)
# several adapters that replace a module's tensors (modules_to_save, trainable tokens): ``by_adapter_<key>``
# holds every adapter's value of the module's ``<key>`` along a leading adapter axis (base values for an adapter
# that leaves it alone), and ``by_adapter_token_delta`` their trainable-token rows
BY_ADAPTER = "by_adapter_"
# tensors of PEFT LoRA variants that change only PEFT's training pass (VeLoRA's projection buffer, MonteCLoRA's
# sampler): ``variant:<PEFT key suffix>`` holds them as read, unused by the forward, untrained, written back by save
VARIANT_EXTRA = "variant:"


def is_adapter_key(key: str) -> bool:
    """Whether a module child is an adapter tensor rather than one of the module's own parameters."""
    return key in ADAPTER_KEYS or isinstance(key, str) and key.startswith((BY_ADAPTER, VARIANT_EXTRA))


@dataclasses.dataclass(frozen=True)
class FactorSource:
    """One PEFT module's LoRA factors inside an adapted kernel: rank columns
    ``offset:offset+rank`` of the stored factors, at ``placement.layer`` / ``placement.part``."""

    peft_name: str
    # not compared (jit cache keys): with pad_rank, adapters of different ranks share compiled functions;
    # save checks that the columns past ``rank`` in this source's block are still zero
    rank: int = dataclasses.field(compare=False)
    offset: int
    placement: Any  # layout.Placement (how PEFT's axes map onto the kernel's)
    file_keys: tuple[tuple[str, str], ...] = ()  # child key -> PEFT key suffix


@dataclasses.dataclass(frozen=True)
class ModuleSpec:
    """Static facts about one adapted module (hashable; travels as pytree metadata, so it is part of
    every jit cache key: nothing here may differ between two adapters of equal shapes that should share
    a compiled function. The scale is therefore a leaf, and ``config_json`` is left out of equality).

    Kernel axes: the LoRA factors are stored so that ``x @ lora_A @ lora_B`` runs over the kernel's
    *canonical* layout ``(inputs..., outputs...)`` with ``in_ndim`` input axes; the kernel (without
    a layer axis) is ``canonical.transpose(kernel_perm)``. A stacked kernel has its layer axis at
    ``layer_axis``, and so do the adapter tensors. The LoRA scale is the ``lora_scale`` child: a
    scalar, or one value per rank column for stacked or fused kernels (zero on padding).
    """

    peft_name: str
    kind: str = "none"  # "linear" | "embedding" | "none" (replaced tensors only)
    kernel_key: str = "kernel"
    in_ndim: int = 1
    kernel_perm: tuple[int, ...] = (0, 1)
    layer_axis: int | None = None
    dora: bool = False
    dropout: float = 0.0
    token_indices: tuple[int, ...] = ()
    trainable: tuple[str, ...] = ()
    # child key -> PEFT key suffix of replaced tensors (biases, modules_to_save, token rows)
    file_keys: tuple[tuple[str, str], ...] = ()
    sources: tuple[FactorSource, ...] = ()
    # the adapter_config.json text; not compared, so adapters differing only in their config text
    # (lora_alpha, base model name, ...) share compiled functions. jit outputs keep the spec of the
    # first call: jlora.combine and jlora.save guard against that (see save._config_json).
    config_json: str = dataclasses.field(default="{}", compare=False)
    # multi-adapter modules: (name, that adapter's own spec or None, its rank width; 0 for replaced tensors) per
    # adapter index
    adapters: tuple[tuple[str, "ModuleSpec | None", int], ...] = ()
    # an input embedding whose output head shares its table, adapter included (PEFT's ensure_weight_tying): the
    # head's PEFT name, whose mirrored tensors save writes back; its LoRA is merged into the table in the call
    tied_copy: str = ""
    # trainable tokens whose output head is a separate copy of the table in this tree (a tied model untied by
    # copying): (depth of this module below the tree root, head kernel path from that root); its columns change too
    token_head: tuple = ()
    # a LoRA on a parameter (PEFT's target_parameters, see jlora.param_targets): the PEFT name of its ParamWrapper
    # module, under which save writes its keys. The node stands where the parameter's leaf stood, and the forward
    # adds the delta to the parameter inside the call, as PEFT's ParamWrapper does
    wrapper: str = ""
    # activated LoRA (alora_invocation_tokens, see jlora.alora): the LoRA term only on each example's last
    # alora_offsets tokens
    activated: bool = False
    # Arrow routing over the module's adapters (jlora.arrow): (top_k, router_temperature); every token runs the
    # softmax-weighted top_k adapters whose prototypes its input is closest to
    arrow: tuple = ()

    @property
    def has_lora(self) -> bool:
        return self.kind in ("linear", "embedding")

    @property
    def merged_in_call(self) -> bool:
        """LoRA that the unmerged forward merges into its kernel anyway: a tied head reads that table too, and PEFT
        itself adds a parameter's LoRA to the parameter on every forward."""
        return self.has_lora and bool(self.tied_copy or self.wrapper)

    def rank_block(self, source: FactorSource, width: int) -> slice:
        """The rank columns reserved for ``source``'s part (its ``rank`` first, then zero padding): from its
        offset up to the next part's offset, or to ``width`` (the factors' rank axis)."""
        later = [s.offset for s in self.sources if s.offset > source.offset]
        return slice(source.offset, min(later, default=width))


# The module of Flax's Scope, which reads each linen module's parameters out of its parent's dict
# (``Scope.get_variable``: ``variables[name]``). jlora.wrap hands Flax plain dicts, never an AdaptedModule, so a read
# of an AdaptedModule from there is a model run without wrap: the adapter is ignored (see AdaptedModule.__getitem__).
_FLAX_SCOPE = "flax.core.scope"
# packages whose frames the warning skips, so that it points at the caller's own line
_LIBRARIES = frozenset({"flax", "jax", "jaxlib", "transformers", "jlora", "optax", "contextlib", "functools"})
UNWRAPPED_MESSAGE = (
    "jlora: a Flax model read its parameters straight from a LoRA tree (the output of jlora.load or jlora.init), "
    "so it runs the base weights and the adapter has no effect. Run it through jlora.wrap: "
    "jax.jit(jlora.wrap(model.__call__))(ids, params=lora_params), or jlora.wrap(module.apply)("
    "{'params': lora_params}, x) for a linen module; or pass jlora.merge(lora_params), the plain tree with the "
    "adapter folded in.")


def _warn_unwrapped() -> None:
    """Warn (:data:`UNWRAPPED_MESSAGE`) at the first caller frame outside Flax, jax, transformers and jlora: Python
    shows it once per such line, not once per adapted module."""
    frame, level = sys._getframe(1), 2  # level 2: the frame that called this function
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in _LIBRARIES:
        frame, level = frame.f_back, level + 1
    warnings.warn(UNWRAPPED_MESSAGE, UnwrappedAdapterWarning, stacklevel=level)


class AdaptedModule(Mapping):
    """One module's parameters with its adapter tensors (see module docstring).

    A Flax model that reads its parameters from an AdaptedModule directly (``model(ids, params=lora_params)``
    without :func:`jlora.wrap`) runs the base weights: such a read issues an :class:`UnwrappedAdapterWarning`
    (at trace time; nothing is added to the traced program, and wrap never hands Flax an AdaptedModule).

    Example:
        >>> q = lora_params["model"]["layers"]["0"]["self_attn"]["q_proj"]
        >>> q["lora_A"].shape, q.spec.peft_name
        ((32, 4), 'model.layers.0.self_attn.q_proj')
    """

    __slots__ = ("_children", "spec", "_aux")

    def __init__(self, children: Mapping[str, Any], spec: ModuleSpec):
        self._children = {k: children[k] for k in sorted(children)}  # sorted: jax flattens them in this order
        self.spec = spec
        self._aux = (tuple(self._children), spec)  # the pytree metadata, built once (jit flattens on every call)

    def __getitem__(self, key: str) -> Any:
        value = self._children[key]
        if sys._getframe(1).f_globals.get("__name__") == _FLAX_SCOPE and self.needs_wrap:
            _warn_unwrapped()
        return value

    def __contains__(self, key: object) -> bool:
        return key in self._children

    def __iter__(self) -> Iterator[str]:
        return iter(self._children)

    def __len__(self) -> int:
        return len(self._children)

    def replace(self, **children: Any) -> "AdaptedModule":
        return AdaptedModule({**self._children, **children}, self.spec)

    @property
    def has_side_path(self) -> bool:
        """Whether running it unmerged needs a side path: LoRA factors, lookups in a replaced embedding
        table whose tied output head keeps the base table (``BASE_TABLE``), or per-adapter replaced tensors."""
        return self.spec.has_lora or BASE_TABLE in self._children or self.per_adapter_tensors

    @property
    def needs_wrap(self) -> bool:
        """Whether a model reading this module's parameters as they are (without :func:`jlora.wrap`) would leave
        part of the adapter out: LoRA factors, trainable-token rows, per-adapter tensors or a base table kept for a
        tied head. Replaced tensors alone (``modules_to_save``, biases) are read as they should be."""
        return self.has_side_path or TOKEN_DELTA in self._children

    @property
    def per_adapter_tensors(self) -> bool:
        """Whether several adapters replace this module's tensors (``by_adapter_*`` children, mixed batches)."""
        return any(k.startswith(BY_ADAPTER) for k in self._children)

    def base_children(self) -> dict[str, Any]:
        """The module's own parameters (adapter tensors left out)."""
        return {k: v for k, v in self._children.items() if not is_adapter_key(k)}

    def __repr__(self) -> str:
        shapes = {k: getattr(v, "shape", v) for k, v in self._children.items()}
        return f"AdaptedModule({self.spec.peft_name!r}, {shapes})"


def _flatten_with_keys(node: AdaptedModule):
    return [(jax.tree_util.DictKey(k), v) for k, v in node._children.items()], node._aux


def _unflatten(aux, children) -> AdaptedModule:
    keys, spec = aux
    return AdaptedModule(dict(zip(keys, children)), spec)


jax.tree_util.register_pytree_with_keys(
    AdaptedModule, _flatten_with_keys, _unflatten,
    flatten_func=lambda n: (n._children.values(), n._aux),
)


def as_param_tree(params: Any) -> Any:
    """A plain nested dict for ``params``: an ``nnx.State`` becomes its pure dict, others pass through."""
    to_pure = getattr(params, "to_pure_dict", None)
    return to_pure() if callable(to_pure) else params


def is_adapted(x: Any) -> bool:
    return isinstance(x, AdaptedModule)


def keyed(tree: Any) -> tuple[list[tuple[tuple, Any]], Any]:
    """``tree`` flattened to ``(path, leaf)`` pairs, AdaptedModules as leaves and ``path`` the tuple of keys (list
    indices) to the leaf, and its treedef."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_adapted)
    return [(tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path), leaf) for path, leaf in flat], treedef


def adapted_modules(tree: Any) -> list[tuple[tuple, AdaptedModule]]:
    """``(path, node)`` for every AdaptedModule in ``tree``; ``path`` is the tuple of keys (list indices) to it."""
    return [(path, leaf) for path, leaf in keyed(tree)[0] if is_adapted(leaf)]


def map_adapted(fn, tree: Any) -> Any:
    """Replace every AdaptedModule ``n`` in ``tree`` by ``fn(n)``; everything else is left as is."""
    return jax.tree_util.tree_map(lambda x: fn(x) if is_adapted(x) else x, tree, is_leaf=is_adapted)


def find_key(mapping: Mapping, segment: str) -> Any:
    """The key of ``mapping`` spelled ``segment`` (str keys, or int keys as in NNX trees), or None."""
    if segment in mapping:
        return segment
    if segment.isdigit() and int(segment) in mapping:
        return int(segment)
    return None


def get_path(tree: Any, path: tuple) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def set_paths(tree: Mapping, updates: dict[tuple, Any]) -> dict:
    """A new nested dict with ``updates`` (path -> value) applied; untouched subtrees are shared."""
    out = dict(tree)
    children: dict[Any, dict[tuple, Any]] = {}
    for path, value in updates.items():
        if len(path) == 1:
            out[path[0]] = value
        else:
            children.setdefault(path[0], {})[path[1:]] = value
    for key, sub in children.items():
        out[key] = set_paths(tree[key], sub)
    return out


def iter_modules(tree: Any, prefix: tuple = ()) -> Iterator[tuple[tuple, Mapping]]:
    """Every nested mapping whose values include arrays (a module's parameter dict), with its path."""
    if not isinstance(tree, Mapping):
        return
    if any(hasattr(v, "shape") for v in tree.values()):
        yield prefix, tree
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from iter_modules(v, prefix + (k,))
