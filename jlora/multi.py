"""Several adapters on one tree: mixed batches, picking one out, and weighted combinations.

``jlora.load(params, {"a": src_a, "b": src_b})`` stacks the adapters of every module along a
leading adapter axis (ranks zero-padded to the largest; a module an adapter does not target holds
zeros for it), so that ``jlora.wrap(fn)(..., adapter_ids=ids)`` runs each example with its own adapter
in one jitted call, gathering only (in, r) and (r, out) slices per example. A stacked kernel's
leaves keep its layer axis where the kernel has it, so that a scan slices them to one layer's
``(adapters, ...)``. A module the adapters replace (``modules_to_save``, trainable tokens) keeps its base
parameters and gets every adapter's copy as ``by_adapter_<key>`` along a leading adapter axis.

Example:
    >>> lp = jlora.load(params, {"math": "user/math-lora", "code": "user/code-lora"})
    >>> logits = jax.jit(jlora.wrap(model.__call__))(ids, params=lp, adapter_ids=jnp.array([0, 1, -1]))
    >>> code_only = jlora.select(lp, "code")
    >>> blend = jlora.add_weighted(lp, {"math": 0.7, "code": 0.3}, method="cat")
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from .config import LoraConfig
from .errors import AdapterError, UnsupportedAdapterError
from .merge import has_blocks
from .placement import is_committed, place_like, replicated_like
from .targeting import module_scale
from .tree import (
    BASE_TABLE,
    BY_ADAPTER,
    LORA_A,
    LORA_B,
    LORA_BIAS,
    LORA_DIAG,
    RANK_SCALE,
    TOKEN_DELTA,
    VARIANT_EXTRA,
    AdaptedModule,
    FactorSource,
    ModuleSpec,
    adapted_modules,
    get_path,
    is_adapter_key,
    set_paths,
)


def _replaces_base(node: AdaptedModule, base: Mapping) -> bool:
    """Whether the node changes a base tensor (PEFT also saves untouched embedding tables: those are fine)."""
    return any(child in node.spec.trainable or not np.array_equal(np.asarray(node[child]), np.asarray(base[child]))
               for child, _ in node.spec.file_keys if not is_adapter_key(child)) or TOKEN_DELTA in node


# PEFT task types whose models have no language-model head (nothing reads the embedding table but the lookups)
_TASKS_WITHOUT_LM_HEAD = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")


def _task_type(spec: ModuleSpec) -> str | None:
    return json.loads(spec.config_json).get("task_type")


def _check_single(node: AdaptedModule, name: str, base: Mapping, head_tied: bool) -> None:
    spec = node.spec
    replaces = _replaces_base(node, base)
    unsupported = {
        "DoRA (PEFT's mixed batches refuse it too)": spec.dora,
        "an embedding whose tied output head shares its adapter (ensure_weight_tying)": spec.tied_copy,
        "tensors replaced beside LoRA factors in one module (bias='all'/'lora_only': PEFT shares one bias "
        "between its adapters)": spec.has_lora and replaces,
        "trainable tokens on an embedding that the output head may read too (the tree has no lm_head of its own, "
        "or holds a copy of the table as its head): the head's columns would need each example's rows": TOKEN_DELTA in
        node and (spec.token_head or head_tied and _task_type(spec) not in _TASKS_WITHOUT_LM_HEAD),
        "the tensors of a LoRA variant (VeLoRA, MonteCLoRA)": any(k.startswith(VARIANT_EXTRA) for k in node),
        "LoRA on a parameter (target_parameters: PEFT's mixed batches refuse it too)": spec.wrapper,
        "KaSA (its base truncation is its own: PEFT refuses KaSA beside other adapters)": LORA_DIAG in node,
    }
    problems = [what for what, bad in unsupported.items() if bad]
    if problems:
        raise AdapterError(f"adapter {name!r}, module {spec.peft_name}: several adapters in one tree do not support "
                           f"{'; '.join(problems)}. Load this adapter on its own")


def _layers_first(x: Any, layer_axis: int | None) -> Any:
    """A leaf of a stacked kernel's adapter with its layer axis moved to the front (``x[None]`` when
    unstacked); numpy or jax arrays, kept as they are."""
    xp = jnp if isinstance(x, jax.Array) else np
    return xp.moveaxis(x, min(layer_axis, x.ndim - 1), 0) if layer_axis is not None else x[None]


def _layers_back(x: Any, layer_axis: int | None) -> Any:
    """Inverse of :func:`_layers_first`: the layer axis back where the kernel has it."""
    xp = jnp if isinstance(x, jax.Array) else np
    return xp.moveaxis(x, 0, min(layer_axis, x.ndim - 1)) if layer_axis is not None else x[0]


def _column_scales(node: AdaptedModule) -> np.ndarray:
    """The module's ``lora_scale`` as one value per rank column, shaped like ``lora_A`` with the layer axis
    first: ``(layers, 1..., r)``."""
    a = _layers_first(node[LORA_A], node.spec.layer_axis)
    scale = np.asarray(node[RANK_SCALE])
    scale = _layers_first(scale, node.spec.layer_axis) if scale.ndim else scale
    return np.broadcast_to(scale, (a.shape[0],) + (1,) * (a.ndim - 2) + (a.shape[-1],))


def stack_adapters(params: Mapping, singles: Mapping[str, Any], head_tied: bool = False) -> dict:
    """One tree holding every single-adapter tree of ``singles`` (name -> tree), in dict order.
    ``head_tied``: the model's output head reads the input embedding table (no head of its own in ``params``)."""
    names = list(singles)
    nodes: dict[tuple, dict[str, AdaptedModule]] = {}
    for name, tree in singles.items():
        for path, node in adapted_modules(tree):
            _check_single(node, name, get_path(params, path), head_tied)
            nodes.setdefault(path, {})[name] = node
    updates = {}
    for path, by_name in nodes.items():
        kinds = {name: "LoRA" if node.spec.has_lora else "replaced tensors" for name, node in by_name.items()}
        if len(set(kinds.values())) > 1:
            raise AdapterError(f"module {next(iter(by_name.values())).spec.peft_name}: some adapters put LoRA on it, "
                               f"others replace its tensors ({kinds}); several adapters in one tree need one kind "
                               "per module. Load them one at a time")
        stack = _stack_lora if "LoRA" in kinds.values() else _stack_replacements
        updates[path] = stack(get_path(params, path), names, by_name)
    return set_paths(params, updates)


def _stack_lora(base: Mapping, names: list[str], by_name: Mapping[str, AdaptedModule]) -> AdaptedModule:
    """One module's LoRA factors of every adapter along an adapter axis (ranks zero-padded to the largest)."""
    some = next(iter(by_name.values()))
    layer_axis = some.spec.layer_axis
    width = max(n[LORA_A].shape[-1] for n in by_name.values())
    a_shape = _layers_first(some[LORA_A], layer_axis).shape[:-1]  # (layers, in...)
    b_shape = _layers_first(some[LORA_B], layer_axis).shape  # (layers, r, out...)
    a = np.zeros((a_shape[0], len(names), *a_shape[1:], width), np.float32)
    b = np.zeros((b_shape[0], len(names), width, *b_shape[2:]), np.float32)
    scale = np.zeros((a_shape[0], len(names)) + (1,) * (len(a_shape) - 1) + (width,), np.float32)
    # lora_bias (simple modules only): zeros for adapters without one
    bias = np.zeros((len(names), *b_shape[2:]), np.float32) if any(LORA_BIAS in n for n in by_name.values()) \
        else None
    entries = []
    for i, name in enumerate(names):
        node = by_name.get(name)
        if node is None:
            entries.append((name, None, 0))
            continue
        r = node[LORA_A].shape[-1]
        a[:, i, ..., :r] = _layers_first(node[LORA_A], layer_axis)
        b[:, i, :r] = _layers_first(node[LORA_B], layer_axis)
        scale[:, i, ..., :r] = _column_scales(node)
        if LORA_BIAS in node:
            bias[i] = np.asarray(node[LORA_BIAS])
        entries.append((name, node.spec, r))
    dtype = some[LORA_A].dtype
    children = {**base, LORA_A: _placed_like(_layers_back(a, layer_axis).astype(dtype), some[LORA_A], layer_axis),
                LORA_B: _placed_like(_layers_back(b, layer_axis).astype(dtype), some[LORA_B], layer_axis),
                RANK_SCALE: _placed_like(_layers_back(scale, layer_axis), some[LORA_A], None, replicated=True)}
    if bias is not None:
        with_bias = next(n for n in by_name.values() if LORA_BIAS in n)[LORA_BIAS]
        children[LORA_BIAS] = _placed_like(bias.astype(with_bias.dtype), with_bias, None)
    spec = dataclasses.replace(some.spec, trainable=(LORA_A, LORA_B), sources=(), file_keys=(),
                               adapters=tuple(entries), activated=any(n.spec.activated for n in by_name.values()))
    return AdaptedModule(children, spec)


def _placed_like(stack: np.ndarray, leaf: Any, layer_axis: int | None, replicated: bool = False) -> jax.Array:
    """``stack`` (adapters' copies of a leaf like ``leaf``, stacked as :func:`_stack_lora` does) on ``leaf``'s
    devices: a named sharding keeps each of ``leaf``'s axes sharded as it was, the adapter axis replicated
    (everything replicated with ``replicated``); committed only where ``leaf`` is (see :mod:`jlora.placement`)."""
    sharding = getattr(leaf, "sharding", None)
    if not is_committed(leaf):
        return place_like(stack, leaf)
    if not isinstance(sharding, NamedSharding):  # one device, or replicated over the leaf's devices
        return jax.device_put(stack, replicated_like(sharding))
    axes = list(tuple(sharding.spec) + (None,) * (leaf.ndim - len(sharding.spec)))
    if layer_axis is None:  # (adapters, axes...)
        axes = [None] + axes
    else:  # the same moves as _layers_first / _layers_back, on the axis names
        axes.insert(0, axes.pop(min(layer_axis, leaf.ndim - 1)))
        axes.insert(1, None)
        axes.insert(min(layer_axis, len(axes) - 1), axes.pop(0))
    spec = PartitionSpec() if replicated else PartitionSpec(*axes)
    return jax.device_put(stack, NamedSharding(sharding.mesh, spec, memory_kind=sharding.memory_kind))


def _stack_replacements(base: Mapping, names: list[str], by_name: Mapping[str, AdaptedModule]) -> AdaptedModule:
    """One module's replaced tensors (modules_to_save, trainable-token rows) of every adapter, along a leading
    adapter axis: ``by_adapter_<key>`` for each of the module's own parameters when some adapter replaces the
    module (the base value for an adapter that keeps it) and ``by_adapter_token_delta`` (rows zero-padded to the
    most indices; the indices stay in each adapter's spec). The module's own parameters stay the base ones
    (``adapter_ids`` -1, tied heads); trainable tokens alone copy no table."""
    some = next(iter(by_name.values()))
    children: dict[str, Any] = dict(base)
    replaced = any(child != TOKEN_DELTA for n in by_name.values() for child, _ in n.spec.file_keys)
    for key, value in base.items() if replaced else ():
        children[BY_ADAPTER + key] = jnp.stack([
            jnp.asarray(by_name[n][key] if n in by_name and key in dict(by_name[n].spec.file_keys) else value,
                        value.dtype) for n in names])
    with_tokens = [n for n in by_name.values() if TOKEN_DELTA in n]
    if with_tokens:
        rows = max(n[TOKEN_DELTA].shape[0] for n in with_tokens)
        dim = with_tokens[0][TOKEN_DELTA].shape[1]
        dtype = with_tokens[0][TOKEN_DELTA].dtype
        children[BY_ADAPTER + TOKEN_DELTA] = jnp.stack([
            jnp.pad(by_name[n][TOKEN_DELTA], ((0, rows - by_name[n][TOKEN_DELTA].shape[0]), (0, 0)))
            if n in by_name and TOKEN_DELTA in by_name[n] else jnp.zeros((rows, dim), dtype) for n in names])
    if any(BASE_TABLE in n for n in by_name.values()):
        children[BASE_TABLE] = base["embedding"]
    entries = tuple((n, by_name[n].spec if n in by_name else None, 0) for n in names)
    spec = dataclasses.replace(some.spec, kind="none", token_indices=(), sources=(), file_keys=(), adapters=entries,
                               trainable=tuple(sorted(k for k in children if k.startswith(BY_ADAPTER))))
    return AdaptedModule(children, spec)


def _index(spec: ModuleSpec, name: str) -> int:
    names = [n for n, *_ in spec.adapters]
    if name not in names:
        raise AdapterError(f"no adapter named {name!r}; the tree holds {names}")
    return names.index(name)


def select(lora_params: Any, name: str) -> Any:
    """The single-adapter view of adapter ``name`` (for merge, save or training it alone).

    Example:
        >>> jlora.save(jlora.select(lp, "code"), "code-adapter")
    """
    def one(node: AdaptedModule):
        if not node.spec.adapters:
            return node
        i = _index(node.spec, name)
        _, spec, width = node.spec.adapters[i]
        if spec is None:
            return node.base_children()
        if node.per_adapter_tensors:
            return _select_replacements(node, i, spec)
        layer_axis = spec.layer_axis
        a, b, scales = (_layers_first(node[key], layer_axis)[:, i] for key in (LORA_A, LORA_B, RANK_SCALE))
        scales = scales[..., :width]
        per_column = len(spec.sources) != 1 or layer_axis is not None or spec.sources[0].placement.part_axis is not None
        children = {**node.base_children(), LORA_A: _layers_back(a[..., :width], layer_axis),
                    LORA_B: _layers_back(b[:, :width], layer_axis),
                    RANK_SCALE: _layers_back(scales, layer_axis) if per_column else scales.reshape(-1)[0]}
        if LORA_BIAS in spec.trainable:  # this adapter's lora_B bias
            children[LORA_BIAS] = node[LORA_BIAS][i]
        return AdaptedModule(children, spec)

    if not any(n.spec.adapters for _, n in adapted_modules(lora_params)):
        raise AdapterError("select: the tree holds a single adapter (load a dict of sources for several)")
    return jax.tree_util.tree_map(lambda x: one(x) if isinstance(x, AdaptedModule) else x, lora_params,
                                  is_leaf=lambda x: isinstance(x, AdaptedModule))


def _select_replacements(node: AdaptedModule, i: int, spec: ModuleSpec) -> AdaptedModule:
    """Adapter ``i``'s own node of a module whose tensors several adapters replace (see :func:`_stack_replacements`)."""
    children = node.base_children()
    for child, _ in spec.file_keys:
        children[child] = node[BY_ADAPTER + child][i] if child != TOKEN_DELTA else \
            node[BY_ADAPTER + TOKEN_DELTA][i, :len(spec.token_indices)]
    if BASE_TABLE in node and "embedding" in dict(spec.file_keys):
        children[BASE_TABLE] = node[BASE_TABLE]
    return AdaptedModule(children, spec)


def _max_rank(config: LoraConfig) -> int:
    return max([config.r, *config.rank_pattern.values()])


def _combined_config(configs: Sequence[LoraConfig], rank: int) -> LoraConfig:
    """PEFT's config for add_weighted_adapter: the first adapter's, with r = lora_alpha = rank."""
    targets = [c.target_modules for c in configs]
    if all(isinstance(t, str) for t in targets):
        merged = "|".join(f"({t})" for t in targets)
    elif all(isinstance(t, list) for t in targets):
        merged = sorted({m for t in targets for m in t})
    else:
        raise AdapterError("add_weighted: adapters mix list and regex target_modules (PEFT refuses this too)")
    return dataclasses.replace(configs[0], r=rank, lora_alpha=rank, target_modules=merged,
                               rank_pattern={}, alpha_pattern={})


def add_weighted(lora_params: Any, weights: Mapping[str, float], method: str = "cat",
                 rank: int | None = None) -> Any:
    """One adapter combining several, as PEFT's ``add_weighted_adapter``.

    ``method``: ``"cat"`` (exact: factors scaled by weight * scale and concatenated, rank = sum of ranks),
    ``"linear"`` (factors averaged with sqrt(|weight * scale|); equal ranks needed) or ``"svd"``
    (the weighted sum of deltas re-factored by SVD to ``rank``, default the largest rank).

    Example:
        >>> blend = jlora.add_weighted(lp, {"a": 0.7, "b": 0.3}, method="svd", rank=8)
    """
    if method not in ("cat", "linear", "svd"):
        raise AdapterError(f"add_weighted: method must be 'cat', 'linear' or 'svd', found {method!r}")
    multi = [n for _, n in adapted_modules(lora_params) if n.spec.adapters]
    if not multi:
        raise AdapterError("add_weighted: the tree holds a single adapter (load a dict of sources)")
    fused = sorted(n.spec.peft_name for n in multi if any(src.placement.fused for _, spec, _ in n.spec.adapters
                                                          if spec is not None for src in spec.sources))
    if fused:
        raise AdapterError("add_weighted does not support fused kernels (several PEFT modules in one kernel); "
                           "these modules are fused", fused)
    blocked = sorted(n.spec.peft_name for n in multi if has_blocks(n.spec))
    if blocked:
        raise UnsupportedAdapterError("add_weighted does not support block-diagonal factors (LoRA on grouped "
                                      "convolutions, BD-LoRA): the combined factors would not keep the diagonal "
                                      "blocks", blocked)
    chosen = list(weights)
    replaced = sorted(n.spec.peft_name for n in multi if n.per_adapter_tensors and
                      any(spec is not None and name in chosen for name, spec, _ in n.spec.adapters))
    if replaced:
        raise AdapterError("add_weighted combines LoRA factors only; in these modules the chosen adapters replace "
                           "tensors (modules_to_save, trainable tokens), which cannot be weighted", replaced)
    configs = {}
    for node in multi:
        for name, spec, _ in node.spec.adapters:
            if spec is not None:
                configs.setdefault(name, LoraConfig.from_dict(json.loads(spec.config_json), quiet=True))
    missing = [n for n in chosen if n not in configs]
    if missing:
        raise AdapterError(f"add_weighted: unknown adapters {missing}; the tree holds {sorted(configs)}")
    method = "linear" if len(chosen) == 1 else method
    ranks = [_max_rank(configs[n]) for n in chosen]
    if method == "linear" and len(set(ranks)) != 1:
        raise AdapterError(f"add_weighted: method 'linear' needs equal ranks, found {dict(zip(chosen, ranks))}")
    new_rank = {"cat": sum(ranks), "linear": ranks[0], "svd": rank or max(ranks)}[method]
    config = _combined_config([configs[n] for n in chosen], new_rank)
    config_json = config.to_json()

    def combine(node: AdaptedModule):
        """One module, layer by layer for a stacked kernel (as PEFT combines each layer's module)."""
        if not node.spec.adapters:
            return node
        if node.per_adapter_tensors:  # replaced by adapters that are not combined
            return node.base_children()
        layer_axis = node.spec.layer_axis
        a_all, b_all, s_all = (np.asarray(_layers_first(node[k], layer_axis), np.float32)
                               for k in (LORA_A, LORA_B, RANK_SCALE))
        a_new = np.zeros((a_all.shape[0], *a_all.shape[2:-1], new_rank), np.float32)
        b_new = np.zeros((b_all.shape[0], new_rank, *b_all.shape[3:]), np.float32)
        scale = np.zeros((a_all.shape[0],) + (1,) * (a_new.ndim - 2) + (new_rank,), np.float32)
        sources = []
        for layer in range(a_all.shape[0]):
            parts = []
            for name in chosen:
                i = _index(node.spec, name)
                _, spec, width = node.spec.adapters[i]
                source = _source_at(spec, layer)
                if source is not None:  # PEFT skips an adapter on a module it does not have
                    parts.append((weights[name], a_all[layer, i, ..., :width], b_all[layer, i, :width],
                                  s_all[layer, i, ..., :width], spec))
            if method == "linear" and len({a.shape[-1] for _, a, _, _, _ in parts}) > 1:
                unequal.append(f"{_source_at(parts[0][4], layer).peft_name}: ranks "
                               f"{[a.shape[-1] for _, a, _, _, _ in parts]}")
                continue
            if parts:
                a_new[layer], b_new[layer] = _COMBINE[method](parts, new_rank)
                source = dataclasses.replace(_source_at(parts[0][4], layer), rank=new_rank, offset=0)
                scale[layer] = module_scale(config, source.peft_name)
                sources.append(source)
        if not sources:
            return node.base_children()
        spec = dataclasses.replace(next(s for _, s, _ in node.spec.adapters if s is not None), sources=tuple(sources),
                                   config_json=config_json)
        dtype = node[LORA_A].dtype
        new_scale = _layers_back(scale, layer_axis) if layer_axis is not None else scale.reshape(-1)[0]
        new = {LORA_A: _layers_back(a_new, layer_axis).astype(dtype), LORA_B: _layers_back(b_new, layer_axis).astype(
            dtype), RANK_SCALE: np.asarray(new_scale, np.float32)}
        return AdaptedModule({**node.base_children(), **{k: _placed_as_one(v, node[k], layer_axis)
                                                         for k, v in new.items()}}, spec)

    unequal: list[str] = []
    combined = jax.tree_util.tree_map(lambda x: combine(x) if isinstance(x, AdaptedModule) else x, lora_params,
                                      is_leaf=lambda x: isinstance(x, AdaptedModule))
    if unequal:
        raise AdapterError("add_weighted: method 'linear' needs equal ranks in every module (PEFT's too)", unequal)
    return combined


def _placed_as_one(value: np.ndarray, stacked: Any, layer_axis: int | None) -> jax.Array:
    """``value``, one adapter's leaf, placed as the several-adapter leaf ``stacked`` it comes from (see
    :func:`_placed_like`): its axes sharded as there, without the adapter axis; committed only where ``stacked`` is.

    Example:
        >>> _placed_as_one(np.zeros((32, 8), np.float32), node["lora_A"], None).shape   # node["lora_A"]: (2, 32, 4)
        (32, 8)
    """
    sharding = getattr(stacked, "sharding", None)
    if is_committed(stacked) and isinstance(sharding, NamedSharding):
        axes = list(tuple(sharding.spec) + (None,) * (stacked.ndim - len(sharding.spec)))
        if layer_axis is None:
            del axes[0]
        else:  # the moves of _layers_first, the adapter axis dropped, then _layers_back's, on the axis names
            axes.insert(0, axes.pop(min(layer_axis, len(axes) - 1)))
            del axes[1]
            axes.insert(min(layer_axis, len(axes) - 1), axes.pop(0))
        sharding = NamedSharding(sharding.mesh, PartitionSpec(*axes[:value.ndim]), memory_kind=sharding.memory_kind)
    elif is_committed(stacked):
        sharding = replicated_like(sharding)
    return place_like(value, stacked, sharding)


def _source_at(spec: ModuleSpec | None, layer: int) -> FactorSource | None:
    """The adapter's factors at ``layer`` of a stacked kernel (any layer when unstacked), or None."""
    if spec is None:
        return None
    return next((src for src in spec.sources if spec.layer_axis is None or src.placement.layer == layer), None)


def _cat(parts, new_rank):
    a = np.concatenate([p_a * w * s for w, p_a, _, s, _ in parts], axis=-1)
    b = np.concatenate([p_b for _, _, p_b, _, _ in parts], axis=0)
    pad = new_rank - a.shape[-1]
    return (np.concatenate([a, np.zeros(a.shape[:-1] + (pad,), a.dtype)], axis=-1),
            np.concatenate([b, np.zeros((pad,) + b.shape[1:], b.dtype)], axis=0))


def _linear(parts, new_rank):
    a = sum(math.copysign(math.sqrt(abs(w * s.reshape(-1)[0])), w * s.reshape(-1)[0]) * p_a
            for w, p_a, _, s, _ in parts)
    b = sum(math.sqrt(abs(w * s.reshape(-1)[0])) * p_b for w, _, p_b, s, _ in parts)
    return a, b


def _svd(parts, new_rank):
    delta = sum(w * np.tensordot(p_a * s, p_b, axes=1) for w, p_a, p_b, s, _ in parts)
    in_shape = parts[0][1].shape[:-1]
    out_shape = parts[0][2].shape[1:]
    matrix = delta.reshape(int(np.prod(in_shape)), int(np.prod(out_shape))).T  # PEFT's (out, in)
    u, sv, vh = np.linalg.svd(matrix.astype(np.float64), full_matrices=False)
    k = min(new_rank, sv.shape[0])
    b_t = np.zeros((matrix.shape[0], new_rank))
    a_t = np.zeros((new_rank, matrix.shape[1]))
    b_t[:, :k], a_t[:k] = u[:, :k] * sv[:k], vh[:k]
    return a_t.T.reshape(*in_shape, new_rank), b_t.T.reshape(new_rank, *out_shape)


_COMBINE = {"cat": _cat, "linear": _linear, "svd": _svd}
