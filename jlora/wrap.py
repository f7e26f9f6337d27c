"""``wrap(fn)``: the same function, now running every adapter it finds in its arguments, unmerged.

The adapter travels inside the parameters Flax sees: each adapted module's dict gets a hidden
entry with its LoRA factors, and a Flax method interceptor adds ``s * (x @ A) @ B`` to the output of
every module that has a side path (Dense, DenseGeneral, Einsum, FlaxConv1D, Embed, Conv). Lifted
transforms (``nn.scan``, ``nn.remat``) slice the hidden entries exactly like the kernel. Modules
without a side path get their kernel merged inside the call, with a one-time warning. NNX modules
have no interceptors: :func:`jlora.nnx_model` runs NNX models unmerged.

Example:
    >>> forward = jax.jit(jlora.wrap(model.__call__))
    >>> logits = forward(input_ids, params=lora_params).logits
"""
from __future__ import annotations

import functools
import warnings
import zlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from .errors import AdapterError
from .merge import merged_module, plain_module, tied_head_columns
from .side_paths import INPUT_TABLE, CallContext, fused_dense, side_for
from .tree import (
    ARROW_PROTOTYPES,
    BASE_TABLE,
    BY_ADAPTER,
    KASA_DOWN,
    KASA_UP,
    LORA_A,
    LORA_B,
    LORA_BIAS,
    LORA_DIAG,
    MAGNITUDE,
    RANK_SCALE,
    AdaptedModule,
    ModuleSpec,
    is_adapted,
    keyed,
)

SITE_PREFIX = "__jlora_site_"
# a stacked kernel's layer numbers, shaped to be sliced with it by a scan (per-layer dropout masks)
LAYER_INDEX = "layer_index"


def side_entries(node: AdaptedModule) -> dict[str, jax.Array]:
    """What the module's side path reads: its adapter tensors (or a replaced table, see ``BASE_TABLE``)."""
    if node.per_adapter_tensors:
        return {k: v for k, v in node.items() if k.startswith(BY_ADAPTER)}
    if BASE_TABLE in node:
        return {INPUT_TABLE: node["embedding"]}
    entries = {k: node[k] for k in (LORA_A, LORA_B, MAGNITUDE, LORA_BIAS, RANK_SCALE, ARROW_PROTOTYPES, LORA_DIAG,
                                    KASA_DOWN, KASA_UP) if k in node}
    spec = node.spec
    if spec.layer_axis is not None and spec.dropout > 0:  # sliced with the kernel: each layer's own dropout mask
        layers = node[spec.kernel_key].shape[spec.layer_axis]
        entries[LAYER_INDEX] = jnp.arange(layers, dtype=jnp.uint32).reshape((1,) * spec.layer_axis + (layers,))
    return entries


def _site_of(module: nn.Module) -> tuple[int, dict] | None:
    """The (site index, entries) hidden in ``module``'s params, if any."""
    if module.scope is None:
        return None
    params = module.scope.variables().get("params", {})
    for key in params:
        if isinstance(key, str) and key.startswith(SITE_PREFIX):
            return int(key[len(SITE_PREFIX):]), params[key]
    return None


def lora_dropout(key: jax.Array | None, rate: float, site: int, name: str,
                 layer: jax.Array | None = None) -> Callable | None:
    """LoRA-branch dropout for one module call (None without a key or with rate 0); ``name``: the
    module's path, folded into the key with the site index and, inside a scan over stacked layers, the
    layer's index (``layer``: the ``LAYER_INDEX`` entry as the scan sliced it)."""
    if key is None or rate == 0.0:
        return None
    key = jax.random.fold_in(jax.random.fold_in(key, site), zlib.crc32(name.encode()))
    if layer is not None and layer.size == 1:
        key = jax.random.fold_in(key, layer.reshape(()))

    def drop(x):
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
        return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)

    return drop


class _Probe:
    """What the abstract trace of one argument structure found: the sites whose side path ran, and the error of
    each side path that raised."""

    def __init__(self):
        self.handled: set[int] = set()
        self.failed: dict[int, str] = {}
        self.error = ""  # what the function itself raised in the trace (then no site runs a side path)


def _interceptor(specs: dict[int, ModuleSpec], probe: _Probe | None, dropout_key: jax.Array | None = None,
                 adapter_ids: jax.Array | None = None, fused: bool = False, alora_offsets: jax.Array | None = None):
    """Adds each adapted module's side path to its output. ``probe``: an abstract trace that records which
    sites ran their side path and which side paths raised (those are merged in the call instead). ``fused``:
    an ``nn.Dense`` that fits :func:`fused_dense` computes its output and adapter in one kernel instead."""
    def intercept(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        site = _site_of(context.module)
        side = side_for(context.module, specs[site[0]]) if site is not None else None
        if side is None:
            return next_fun(*args, **kwargs)
        index, entries = site
        drop = lora_dropout(dropout_key, specs[index].dropout, index, "/".join(context.module.path),
                            entries.get(LAYER_INDEX))
        ctx = CallContext(drop, adapter_ids, alora_offsets)
        out = fused_dense(context.module, args, kwargs, entries, specs[index], ctx) if fused else None
        if out is not None:  # (real calls only: the probe runs dense_side, which handles the same modules)
            return out
        y = next_fun(*args, **kwargs)
        if probe is None:
            return side(context.module, args, kwargs, y, entries, specs[index], ctx)
        try:
            out = side(context.module, args, kwargs, y, entries, specs[index], ctx)
        except AdapterError:
            raise
        except Exception as err:  # noqa: BLE001 - this module is merged in the call; the warning says why
            probe.failed[index] = f"{type(err).__name__}: {err}"
            return y
        probe.handled.add(index)
        return out

    return intercept


def require_adapter_ids(nodes, adapter_ids: jax.Array | None) -> list[str]:
    """The adapter names of a multi-adapter tree (empty for one adapter); raises when ``adapter_ids`` is missing."""
    multi = sorted({name for n in nodes if not n.spec.arrow for name, *_ in n.spec.adapters})  # (Arrow: per token)
    if multi and adapter_ids is None:
        raise AdapterError(f"the parameters hold several adapters {multi}: pass adapter_ids=... (one index per "
                           "example into that list, -1 for the base model), or use jlora.select(params, name)")
    return multi


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) or hasattr(x, "__array__") and hasattr(x, "dtype")


def wrap(fn: Callable, *, fused: bool = False) -> Callable:
    """``fn`` with every adapter in its arguments applied unmerged (``x@W + s*(x@A)@B``).

    Arguments holding LoRA params may be positional, keyword or nested (``{"params": lp}``); all
    other arguments pass through unchanged. jit-compatible: new adapter values with the same
    shapes reuse the compiled function.

    Several adapters in one tree (``jlora.load(params, {"a": ..., "b": ...})``): pass
    ``adapter_ids=ids``, an int array (batch,) with each example's adapter index (dict order) or -1
    for the base model.

    Training: pass ``lora_dropout_key=key`` to the wrapped function to apply the adapter's
    ``lora_dropout`` to the LoRA branch input (as PEFT in train mode); without it, no dropout.

    aLoRA adapters (``alora_invocation_tokens``): pass ``alora_offsets=jlora.alora_offsets(lora_params, input_ids)``
    (computed once from the prompt, also for ``generate``); see :mod:`jlora.alora`.

    ``fused=True`` (experimental, for GPUs): each plain ``nn.Dense`` computes ``x@W`` and its LoRA term in one
    Pallas kernel (:func:`jlora.fused_matmul.lora_matmul`; mixed batches: ``lora_matmul_grouped``) instead of three,
    in the module's dtype with float32 accumulation (not PEFT's float32 LoRA branch and rounding); other modules
    run as usual.
    Lowered for another platform, the same formula runs as plain XLA matmuls.

    Example:
        >>> fwd = jax.jit(jlora.wrap(model.__call__))
        >>> fwd(input_ids, params=jlora.load(model.params, "adapter_dir")).logits
    """
    probed: dict[Any, _Probe] = {}
    warned: set[str] = set()

    def rebuild(paths, leaves, treedef, sites, fallback):
        new = list(leaves)
        for i, kernel in tied_head_columns(list(zip(paths, leaves))).items():
            new[i] = kernel
        for i, node in sites.items():
            if i in fallback:
                new[i] = merged_module(node)
            else:
                new[i] = plain_module(node)
                if node.has_side_path and not node.spec.wrapper:  # (a parameter's LoRA: merged, never a site)
                    new[i][f"{SITE_PREFIX}{i}"] = side_entries(node)
        return jax.tree_util.tree_unflatten(treedef, new)

    def handled_sites(paths, leaves, treedef, sites, adapter_ids, alora_offsets) -> _Probe:
        """Which sites a side path consumes: found once per argument structure by an abstract trace."""
        if treedef in probed:
            return probed[treedef]
        probe = _Probe()
        arrays = [i for i, leaf in enumerate(leaves) if i not in sites and _is_array(leaf)]

        def run(array_leaves, nodes):
            full = list(leaves)
            for i, value in zip(arrays, array_leaves):
                full[i] = value
            for i, node in zip(sites, nodes):
                full[i] = node
            args, kwargs = rebuild(paths, full, treedef, dict(zip(sites, nodes)), frozenset())
            specs = {i: n.spec for i, n in zip(sites, nodes)}
            with nn.intercept_methods(_interceptor(specs, probe, None, adapter_ids, alora_offsets=alora_offsets)):
                return fn(*args, **kwargs)

        try:
            jax.eval_shape(run, [leaves[i] for i in arrays], list(sites.values()))
        except AdapterError:
            raise
        except Exception as err:  # noqa: BLE001 - fn refuses the hidden entries (NNX's merge): no side paths
            probe.handled.clear()
            probe.error = f"{type(err).__name__}: {err}"
        probed[treedef] = probe
        return probe

    @functools.wraps(fn)
    def wrapped(*args, lora_dropout_key: jax.Array | None = None, adapter_ids: jax.Array | None = None,
                alora_offsets: jax.Array | None = None, **kwargs):
        pairs, treedef = keyed((args, kwargs))
        paths, leaves = [path for path, _ in pairs], [leaf for _, leaf in pairs]
        sites = {i: leaf for i, leaf in enumerate(leaves) if is_adapted(leaf)}
        if not sites:
            return fn(*args, **kwargs)
        multi = require_adapter_ids(sites.values(), adapter_ids)
        lora_sites = {i for i, n in sites.items() if n.has_side_path}
        tied = {i for i in lora_sites if sites[i].spec.merged_in_call}
        probe = handled_sites(paths, leaves, treedef, sites, adapter_ids, alora_offsets) if lora_sites else _Probe()
        fallback = frozenset(lora_sites - (probe.handled - set(probe.failed)))  # (a site called twice may do both)
        names = sorted(sites[i].spec.peft_name for i in fallback - tied - set(probe.failed))
        failed = {sites[i].spec.peft_name: err for i, err in probe.failed.items() if i in fallback - tied}
        fallback |= tied
        if multi and (names or failed):
            raise AdapterError(f"mixed-adapter batches need a side path for every adapted module; {names} have none"
                               + "".join(f"; {name}'s failed: {err}" for name, err in sorted(failed.items())))
        if names and tuple(names) not in warned:
            warned.add(tuple(names))
            why = (f"the function raised when traced with side paths ({probe.error})" if probe.error
                   else "module class without one")
            warnings.warn(f"jlora.wrap: no unmerged side path for {names} ({why}); their kernels are merged inside "
                          "the call (for NNX models, jlora.nnx_model runs them unmerged)", stacklevel=2)
        if failed and ("failed",) + tuple(failed) not in warned:
            warned.add(("failed",) + tuple(failed))
            warnings.warn("jlora.wrap: the unmerged side path raised for " + "; ".join(
                f"{name} ({err})" for name, err in sorted(failed.items())) + "; those kernels are merged inside the "
                "call instead", stacklevel=2)
        dropped = sorted(sites[i].spec.peft_name for i in fallback - tied
                         if sites[i].spec.has_lora and sites[i].spec.dropout > 0)
        if lora_dropout_key is not None and dropped and ("dropout",) + tuple(dropped) not in warned:
            warned.add(("dropout",) + tuple(dropped))
            warnings.warn(f"jlora.wrap: lora_dropout is not applied to {dropped}: their kernels are merged inside "
                          "the call, where the LoRA branch has no input of its own to drop", stacklevel=2)
        new_args, new_kwargs = rebuild(paths, leaves, treedef, sites, fallback)
        specs = {i: n.spec for i, n in sites.items()}
        with nn.intercept_methods(_interceptor(specs, None, lora_dropout_key, adapter_ids, fused, alora_offsets)):
            return fn(*new_args, **new_kwargs)

    return wrapped
