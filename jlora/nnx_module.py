"""NNX models as objects: ``jlora.load(model, source)`` on an ``nnx.Module`` returns a new module with the adapter.

The new module is the caller's model rebuilt (``nnx.split`` / ``nnx.merge``: the base arrays are shared, the caller's
module is left as it was) with every adapted ``nnx.Linear`` / ``LinearGeneral`` / ``Einsum`` / ``Embed`` / ``Conv`` (and
model zoos' einsum-of-one-parameter modules, such as google-tunix's ``Einsum``) turned, in the new graph only, into a
subclass whose call adds the LoRA side path of :func:`jlora.nnx_model` to the module's own output. The adapter
tensors are attributes of that module, named ``jlora_<key>`` (``jlora_lora_A``, ``jlora_lora_B``, ...): what PEFT
trains is an ``nnx.LoRAParam``, everything else (``lora_scale``, KaSA's frozen parts, ...) an
:class:`AdapterConstant`. So the module is called exactly as the original, and ``nnx.Optimizer(model, tx,
wrt=nnx.LoRAParam)``, ``nnx.DiffState(0, nnx.LoRAParam)`` and tunix's ``PeftTrainer`` train the adapter alone.
Stacked layers (built with ``nnx.vmap``, run with ``nnx.scan``) hold their adapter with the kernel's layer axis, so
the scan slices it with the kernel.

:func:`lora_tree` is the way back to jlora's tree (for :func:`jlora.merge` and :func:`jlora.save`, which accept the
module), :func:`plain_model` the model with the adapter folded in.

Example:
    >>> model = llama3_params.create_model_from_safe_tensors(ckpt, config)       # any nnx.Module
    >>> lora_model = jlora.load(model, "adapter_dir")                            # a new module; `model` unchanged
    >>> logits = lora_model(ids, positions, None, mask)                          # called like the original
    >>> optimizer = nnx.Optimizer(lora_model, optax.adam(1e-3), wrt=nnx.LoRAParam)
    >>> merged_model = jlora.merge(lora_model)                                  # the original classes, kernels merged
"""
from __future__ import annotations

import functools
from typing import Any

from flax import nnx

from .errors import UnsupportedAdapterError
from .merge import merge
from .nnx_model import ENTRY_PREFIX, _at, _NnxModuleView
from .side_paths import CallContext, side_for
from .tree import (
    BASE_TABLE,
    KASA_DOWN,
    KASA_UP,
    LORA_A,
    LORA_B,
    LORA_BIAS,
    LORA_DIAG,
    MAGNITUDE,
    RANK_SCALE,
    TOKEN_DELTA,
    AdaptedModule,
    adapted_modules,
    set_paths,
)

SPEC = ENTRY_PREFIX + "spec"  # (static attribute of an adapted module: its ModuleSpec)
SIDE_KEYS = (LORA_A, LORA_B, MAGNITUDE, LORA_BIAS, RANK_SCALE, LORA_DIAG, KASA_DOWN, KASA_UP)  # what side paths read
STATIC = ("jlora_side", "jlora_entries", "jlora_retyped", "jlora_keys", SPEC)  # an adapted module's other attributes


class AdapterConstant(nnx.Variable):
    """An adapter tensor that PEFT does not train (``lora_scale``, KaSA's frozen components, variant buffers): state
    of the module, never an ``nnx.Param`` nor an ``nnx.LoRAParam``.

    Example:
        >>> nnx.state(lora_model, jlora.nnx_module.AdapterConstant)   # every lora_scale
    """


def _adapted_call(self, *args: Any, **kwargs: Any) -> Any:
    """The call of an adapted module (a :func:`_adapted_class`): the module's own call, plus its side path over the
    adapter attributes (sliced with the kernel inside ``nnx.scan`` for stacked layers)."""
    entries = {key: getattr(self, ENTRY_PREFIX + key)[...] for key in self.jlora_entries}
    y = super(type(self), self).__call__(*args, **kwargs)
    return self.jlora_side(_NnxModuleView(self), args, kwargs, y, entries, getattr(self, SPEC), CallContext())


@functools.cache
def _adapted_class(cls: type) -> type:
    """``cls`` with :func:`_adapted_call` as its call (one class per base class, so that two adapted models of one
    base share graph definitions and jitted functions)."""
    return type(f"LoRA{cls.__name__}", (cls,), {"__call__": _adapted_call, "__module__": __name__})


def _refusals(node: AdaptedModule) -> list[str]:
    """Why ``node`` cannot run as attributes of an NNX module (empty: it can)."""
    spec, why = node.spec, []
    if spec.adapters:
        why.append("several adapters (load them onto nnx.split(model)[1] and run jlora.nnx_model(..., adapter_ids=))")
    if spec.merged_in_call or spec.arrow or spec.activated or TOKEN_DELTA in node or BASE_TABLE in node:
        why.append("LoRA on parameters, tied heads, Arrow, aLoRA and trainable tokens run through jlora.nnx_model")
    return why


def _retype(module: nnx.Module, key: str, kind: type) -> None:
    """Hold ``module``'s variable ``key`` as a ``kind`` variable (value and metadata kept)."""
    variable = getattr(module, key)
    setattr(module, key, kind(variable[...], **variable.get_metadata()))


def _adapt(module: nnx.Module, node: AdaptedModule) -> None:
    """Give ``module`` (in the new graph) ``node``'s adapter: its adapter tensors as ``jlora_<key>`` variables
    (LoRAParam where PEFT trains them), its trained own tensors (modules_to_save, biases) as LoRAParams, and, for
    LoRA, the adapted class. Raises UnsupportedAdapterError for a module class without a side path."""
    spec, base = node.spec, node.base_children()
    side = side_for(module, spec) if spec.has_lora else None
    if spec.has_lora and side is None:
        raise UnsupportedAdapterError(f"{spec.peft_name}: {type(module).__name__} has no unmerged side path; load "
                                      "the adapter onto nnx.split(model)[1] and run jlora.nnx_model, which merges it "
                                      "in the call")
    for key, value in node.items():
        if key not in base:
            kind = nnx.LoRAParam if key in spec.trainable else AdapterConstant
            setattr(module, ENTRY_PREFIX + key, kind(value))
    retyped = tuple((key, type(getattr(module, key))) for key in sorted(base) if key in spec.trainable)
    for key, _ in retyped:
        _retype(module, key, nnx.LoRAParam)
    module.jlora_retyped, module.jlora_keys = retyped, tuple(k for k in node if k not in base)
    setattr(module, SPEC, spec)
    if side is not None:
        module.jlora_side, module.jlora_entries = side, tuple(k for k in SIDE_KEYS if k in node)
        object.__setattr__(module, "__class__", _adapted_class(type(module)))  # (not an attribute NNX records)


def lora_module(graphdef: Any, lora_params: Any) -> nnx.Module:
    """The module of ``graphdef`` with the adapter of ``lora_params`` (``jlora.load(nnx.split(model)[1], ...)``) held
    as its own variables and run unmerged when it is called (see the module docstring). ``jlora.load(model, source)``
    on an ``nnx.Module`` returns this.

    Args:
        graphdef: ``nnx.split(model)[0]``.
        lora_params: the LoRA tree of that model's state (a pure dict with ``AdaptedModule`` nodes); its arrays are
            shared, not copied.

    Returns:
        A new module of the original classes, whose adapted modules run their LoRA beside their own call.

    Raises:
        UnsupportedAdapterError: the tree holds several adapters, or adapters that only :func:`jlora.nnx_model` runs
            (LoRA on parameters, tied heads, Arrow, aLoRA, trainable tokens), or a LoRA on a module class without a
            side path.

    Example:
        >>> graphdef, state = nnx.split(model)
        >>> lora_model = lora_module(graphdef, jlora.load(state, "adapter_dir"))
        >>> nnx.state(lora_model, nnx.LoRAParam)      # the trainable adapter
    """
    sites = adapted_modules(lora_params)
    refused = sorted(f"{node.spec.peft_name}: {why}" for _, node in sites for why in _refusals(node))
    if refused:
        raise UnsupportedAdapterError("jlora.load: these adapters cannot be held by an NNX module object", refused)
    plain = set_paths(lora_params, {path: node.base_children() for path, node in sites})
    model = nnx.merge(graphdef, plain)  # new graph objects; the base arrays are the caller's
    for path, node in sites:
        _adapt(_at(model, path), node)
    return model


def _sites(model: nnx.Module) -> list[tuple[tuple, nnx.Module]]:
    """``(path, module)`` of every module of ``model`` that holds an adapter (by its ``jlora_spec`` attribute)."""
    return [(tuple(path), node) for path, node in nnx.iter_graph(model)
            if isinstance(node, nnx.Module) and SPEC in vars(node)]


def lora_tree(model: nnx.Module) -> dict:
    """jlora's LoRA tree of a module from :func:`lora_module`: the pure dict of its state with an ``AdaptedModule`` at
    each adapted module (what ``jlora.load(nnx.split(model)[1], ...)`` returns), the module's current values.

    Args:
        model: an adapted module (``jlora.load(model, source)``), trained or not.

    Returns:
        The LoRA tree, for :func:`jlora.merge`, :func:`jlora.save`, :func:`jlora.nnx_model`, ...

    Raises:
        UnsupportedAdapterError: ``model`` holds no adapter.

    Example:
        >>> jlora.to_peft_tensors(lora_tree(lora_model))
    """
    sites = _sites(model)
    if not sites:
        raise UnsupportedAdapterError("this NNX module holds no jlora adapter (jlora.load(model, source) makes one)")
    pure = nnx.to_pure_dict(nnx.state(model))
    nodes = {}
    for path, module in sites:
        children = dict(_get(pure, path))
        entries = {key: children.pop(ENTRY_PREFIX + key) for key in module.jlora_keys}
        nodes[path] = AdaptedModule({**children, **entries}, getattr(module, SPEC))
    return set_paths(pure, nodes)


def _get(tree: dict, path: tuple) -> dict:
    for key in path:
        tree = tree[key]
    return tree


def plain_model(model: nnx.Module) -> nnx.Module:
    """The model of :func:`lora_module` with its adapter folded into the kernels, as PEFT's ``merge_and_unload``: a
    new module of the original classes and variable types, without adapter attributes (``jlora.merge(model)``).

    Args:
        model: an adapted module (``jlora.load(model, source)``).

    Returns:
        A new plain module; ``model`` is left as it is.

    Raises:
        UnsupportedAdapterError: an adapter that cannot be merged (see :func:`jlora.merge`).

    Example:
        >>> merged_model = jlora.merge(lora_model)
    """
    merged = merge(lora_tree(model))
    out = nnx.merge(*nnx.split(model))  # a copy of the graph, whose adapted modules are then undone
    for _, module in _sites(out):
        for key in module.jlora_keys:
            delattr(module, ENTRY_PREFIX + key)
        for key, kind in module.jlora_retyped:
            _retype(module, key, kind)
        for name in STATIC:
            if name in vars(module):
                delattr(module, name)
        if type(module).__module__ == __name__:
            object.__setattr__(module, "__class__", type(module).__mro__[1])
    graphdef, state = nnx.split(out)
    nnx.replace_by_pure_dict(state, merged)
    return nnx.merge(graphdef, state)


__all__ = ["AdapterConstant", "lora_module", "lora_tree", "plain_model"]
