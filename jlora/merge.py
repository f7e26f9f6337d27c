"""Fold an adapter into plain parameters: ``merge(lora_params)`` has the base tree's structure.

Also the LoRA math shared with the wrapped forward: the low-rank delta in the kernel's layout and
DoRA's weight norm. Deltas are computed in float32 and results cast to each kernel's dtype.

Example:
    >>> merged = jlora.merge(lora_params)
    >>> logits = model(input_ids, params=merged).logits
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .errors import AdapterError, UnsupportedAdapterError
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
    ModuleSpec,
    is_adapted,
    keyed,
)


def scaled_a(children: Mapping[str, jax.Array]) -> jax.Array:
    """``lora_A`` in float32 with the ``lora_scale`` (a scalar, or per rank column) folded in."""
    a = children[LORA_A].astype(jnp.float32) * children[RANK_SCALE]
    return a * children[LORA_DIAG].astype(jnp.float32) if LORA_DIAG in children else a  # (KaSA's singular values)


def _block_mask(spec: ModuleSpec, shape: tuple[int, ...], factor: str) -> np.ndarray | None:
    """Where one layer's ``lora_A`` (``factor`` "a": (inputs..., r)) or ``lora_B`` ("b": (r, outputs...)) may be
    nonzero when a source's factor is block-diagonal (a grouped conv's lora_B, BD-LoRA), else None."""
    blocked = [s for s in spec.sources if getattr(s.placement, f"{factor}_blocks") > 1]
    if not blocked:
        return None
    (source,) = blocked  # (block-diagonal factors are refused on stacked and fused kernels)
    rank_axis = len(shape) - 1 if factor == "a" else 0
    mask = np.zeros(shape, np.float32)
    rows = [slice(None)] * len(shape)
    rows[rank_axis] = slice(source.offset, source.offset + source.rank)
    blocks = getattr(source.placement, f"{factor}_block_mask")(source.rank)
    mask[tuple(rows)] = blocks.reshape(mask[tuple(rows)].shape)
    return mask


def part_masked_a(a: jax.Array, spec: ModuleSpec) -> jax.Array:
    """One layer's ``lora_A`` (inputs..., r) with the entries off a block-diagonal A's blocks (BD-LoRA) zeroed, so
    that training never grows them (identity otherwise)."""
    mask = _block_mask(spec, a.shape, "a")
    return a if mask is None else a * jnp.asarray(mask, a.dtype)


def adapters_masked(stack: jax.Array, spec: ModuleSpec, factor: str) -> jax.Array:
    """A several-adapter tree's ``lora_A`` (``factor`` "a") or ``lora_B`` ("b") stack (adapters, one layer's
    factor...) with each adapter's block-diagonal factor masked as :func:`part_masked_a` / :func:`part_masked_b`."""
    masks = [None if own is None else _block_mask(own, stack.shape[1:], factor) for _, own, _ in spec.adapters]
    if all(m is None for m in masks):
        return stack
    full = np.stack([np.ones(stack.shape[1:], np.float32) if m is None else m for m in masks])
    return stack * jnp.asarray(full, stack.dtype)


def part_masked_b(b: jax.Array, spec: ModuleSpec) -> jax.Array:
    """One layer's ``lora_B`` (r, outputs...) of a fused kernel with everything outside each part's
    own block of rank rows zeroed, so training never grows cross-part terms; a block-diagonal one's (grouped
    convolution, BD-LoRA) with everything outside its diagonal blocks zeroed (identity otherwise)."""
    mask = _block_mask(spec, b.shape, "b")
    if mask is not None:
        return b * jnp.asarray(mask, b.dtype)
    fused = [s for s in spec.sources if s.placement.part_axis is not None]
    if not fused:
        return b
    pl = fused[0].placement
    out_axis = 1 + pl.part_axis - pl.in_ndim
    mask = np.zeros((b.shape[0], b.shape[out_axis]), np.float32)
    for source in fused:
        mask[spec.rank_block(source, b.shape[0]), source.placement.part] = 1.0
    shape = [1] * b.ndim
    shape[0], shape[out_axis] = mask.shape
    return b * jnp.asarray(mask.reshape(shape), b.dtype)


def factor_delta(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` over the rank axis: (inputs..., r) x (r, outputs...) -> (inputs..., outputs...)."""
    return jnp.tensordot(a, b.astype(jnp.float32), axes=1)


def to_canonical(kernel: jax.Array, spec: ModuleSpec) -> jax.Array:
    """The kernel in canonical (inputs..., outputs...) order (a layer axis, if any, first)."""
    if spec.layer_axis is None:
        return jnp.transpose(kernel, np.argsort(spec.kernel_perm))
    moved = jnp.moveaxis(kernel, spec.layer_axis, 0)
    return jnp.transpose(moved, (0, *(1 + i for i in np.argsort(spec.kernel_perm))))


def from_canonical(canonical: jax.Array, spec: ModuleSpec) -> jax.Array:
    if spec.layer_axis is None:
        return jnp.transpose(canonical, spec.kernel_perm)
    kernel = jnp.transpose(canonical, (0, *(1 + i for i in spec.kernel_perm)))
    return jnp.moveaxis(kernel, 0, spec.layer_axis)


def dora_factor(weight: jax.Array, delta: jax.Array, magnitude: jax.Array, in_axes: tuple[int, ...]) -> jax.Array:
    """DoRA's ``m / ||W + dW||`` (norm over the input axes; no gradient through the norm, as PEFT)."""
    adapted = weight.astype(jnp.float32) + delta
    norm = jnp.sqrt(jnp.sum(jnp.square(adapted), axis=in_axes))
    return magnitude.astype(jnp.float32) / jax.lax.stop_gradient(norm)


def _layer_first(children: dict, spec: ModuleSpec) -> dict:
    keys = (LORA_A, LORA_B, MAGNITUDE, RANK_SCALE)
    return {k: jnp.moveaxis(v, min(spec.layer_axis, v.ndim - 1), 0) for k, v in children.items() if k in keys}


def with_token_rows(node: AdaptedModule, children: dict) -> dict:
    """Trainable tokens: the delta rows replace the embedding rows at the token indices."""
    if TOKEN_DELTA in node:
        key = node.spec.kernel_key  # the embedding table
        table = jnp.asarray(children[key])  # numpy tables too (wrap runs this outside jit)
        idx = jnp.asarray(node.spec.token_indices, dtype=jnp.int32)
        children[key] = table.at[idx].set(node[TOKEN_DELTA].astype(table.dtype))
    return children


def tied_head_columns(keyed_leaves: list[tuple[tuple, Any]]) -> dict[int, jax.Array]:
    """Trainable tokens that PEFT ties to the output head, when this tree holds the head as a separate copy of
    the table (``ModuleSpec.token_head``): ``{leaf index of that head kernel: kernel with the token columns
    replaced}``. ``keyed_leaves``: ``(key path, leaf)`` pairs, AdaptedModules as leaves."""
    index = {path: i for i, (path, _) in enumerate(keyed_leaves)}
    out = {}
    for path, node in keyed_leaves:
        if is_adapted(node) and node.spec.token_head:
            depth, head = node.spec.token_head
            i = index.get(path[:len(path) - depth] + head)
            if i is None:
                raise AdapterError(f"{node.spec.peft_name}: its trainable tokens are tied to the output head at "
                                   f"{'/'.join(map(str, head))}, which is not in the parameters passed")
            kernel = jnp.asarray(keyed_leaves[i][1])
            columns = jnp.asarray(node.spec.token_indices, jnp.int32)
            out[i] = kernel.at[:, columns].set(node[TOKEN_DELTA].T.astype(kernel.dtype))
    return out


def plain_module(node: AdaptedModule) -> dict[str, Any] | jax.Array:
    """The module's parameters as the rest of the model sees them when the adapter runs unmerged:
    replacement tensors applied, LoRA factors left out, and a replaced embedding table with a tied output
    head kept as the base table (the module's own lookups get the replacement through its side path). A LoRA on
    a parameter: the parameter itself."""
    if node.spec.wrapper:
        return node[node.spec.kernel_key]
    children = with_token_rows(node, node.base_children())
    if BASE_TABLE in node:
        children["embedding"] = node[BASE_TABLE]
    return children


_NO_MERGE = "these modules' adapters cannot be merged (PEFT refuses them too); run them unmerged with jlora.wrap"


def merge_refusals(node: AdaptedModule) -> list[str]:
    """Why the module's adapter cannot be folded into its parameters (empty: it can)."""
    why = []
    if is_grouped(node.spec):
        why.append("LoRA on a grouped convolution (its lora_A reads every input channel, the kernel only its group's)")
    if LORA_BIAS in node and "bias" not in node:
        why.append("lora_bias on a module without a bias")
    if node.spec.activated:
        why.append("aLoRA (the adapter runs on each example's tokens from its invocation on)")
    return why


def _own_sources(spec: ModuleSpec):
    """The factor sources of the module's LoRA and of each of its adapters'."""
    own = [spec] + [s for _, s, _ in spec.adapters if s is not None]
    return [source for s in own for source in s.sources]


def is_grouped(spec: ModuleSpec) -> bool:
    """Whether the module's LoRA (any of its adapters') sits on a grouped convolution (``layout.Placement.groups``)."""
    return any(source.placement.groups > 1 for source in _own_sources(spec))


def has_blocks(spec: ModuleSpec) -> bool:
    """Whether the module's LoRA (any of its adapters') has a block-diagonal factor (grouped conv, BD-LoRA)."""
    return any(source.placement.a_blocks > 1 or source.placement.b_blocks > 1 for source in _own_sources(spec))


def merged_module(node: AdaptedModule) -> dict[str, Any] | jax.Array:
    """The module's parameters with everything folded in, as PEFT's ``merge_and_unload``. A replaced
    embedding table goes into the one leaf, which a tied output head reads too (see :func:`merge`). A LoRA on a
    parameter: the merged parameter."""
    spec = node.spec
    if spec.arrow:
        raise UnsupportedAdapterError(f"{spec.peft_name}: {_NO_MERGE}", ["Arrow routing (each token chooses its "
                                                                          "adapters)"])
    if spec.adapters:
        raise AdapterError(f"{spec.peft_name}: the tree holds several adapters; jlora.select one (or "
                           "jlora.add_weighted them) before merging")
    children = with_token_rows(node, node.base_children())
    if not spec.has_lora:
        return children
    refused = merge_refusals(node)
    if refused:
        raise UnsupportedAdapterError(f"{spec.peft_name}: {_NO_MERGE}", refused)
    kernel = children[spec.kernel_key]
    weight = to_canonical(kernel, spec).astype(jnp.float32)
    one_layer = lambda a, b: factor_delta(part_masked_a(a, spec), part_masked_b(b, spec))  # noqa: E731
    if spec.layer_axis is None:
        factors, in_axes = node, tuple(range(spec.in_ndim))
        delta = one_layer(scaled_a(factors), factors[LORA_B])
    else:
        factors, in_axes = _layer_first(dict(node), spec), tuple(range(1, spec.in_ndim + 1))
        delta = jax.vmap(one_layer)(scaled_a(factors), factors[LORA_B])
    delta = _as_peft_rounds(delta, node[LORA_A].dtype)
    if KASA_DOWN in node:  # KaSA: the base weight without its dropped components (unstacked kernels only)
        delta = delta + factor_delta(node[KASA_DOWN], node[KASA_UP])
    merged = weight + delta
    if spec.dora:
        factor = dora_factor(weight, delta, factors[MAGNITUDE], in_axes)
        merged = jnp.expand_dims(factor, in_axes) * merged
    children[spec.kernel_key] = from_canonical(merged, spec).astype(kernel.dtype)
    if LORA_BIAS in node:
        bias = children["bias"]
        lora_bias = node[RANK_SCALE] * node[LORA_BIAS].astype(jnp.float32)  # lora_bias: simple modules only
        lora_bias = _as_peft_rounds(lora_bias, node[LORA_BIAS].dtype)
        children["bias"] = (bias.astype(jnp.float32) + lora_bias).astype(bias.dtype)
    return children[spec.kernel_key] if spec.wrapper else children


def _as_peft_rounds(delta: jax.Array, adapter_dtype: Any) -> jax.Array:
    """A float32 delta (``s * A @ B`` or a scaled lora_bias) rounded to the adapter's dtype first, as PEFT's merge
    of a bf16/fp16 adapter computes it, then added to the base weight (identity for float32 adapters)."""
    return delta.astype(adapter_dtype).astype(jnp.float32)


@jax.jit
def _merge_modules(nodes: list[AdaptedModule]) -> list[dict]:
    return [merged_module(n) for n in nodes]


def merge(lora_params: Any) -> Any:
    """The plain parameter tree with every adapter folded in (one jitted pass over the adapted
    modules; every other leaf is passed through untouched, not copied).

    An NNX module from ``jlora.load(model, source)`` gives a new plain module (the original classes, kernels merged).

    Example:
        >>> merged = jlora.merge(jlora.load(params, "adapter_dir"))
        >>> merged_model = jlora.merge(jlora.load(nnx_model, "adapter_dir"))
    """
    if isinstance(lora_params, nnx.Module):
        from .nnx_module import plain_model  # (nnx_module builds on this module)
        return plain_model(lora_params)
    pairs, treedef = keyed(lora_params)
    leaves = [leaf for _, leaf in pairs]
    where = [i for i, leaf in enumerate(leaves) if is_adapted(leaf)]
    refused = [f"{leaves[i].spec.peft_name}: {why}" for i in where for why in merge_refusals(leaves[i])]
    if refused:
        raise UnsupportedAdapterError(f"jlora.merge: {_NO_MERGE}", refused)
    tied = sorted(leaves[i].spec.peft_name for i in where if BASE_TABLE in leaves[i])
    if tied:
        warnings.warn(f"jlora.merge: {tied} replace an embedding table (modules_to_save) that this model's output "
                      "head appears to share (the tree has no lm_head). The merged tree has one table, so such a head "
                      "now reads the replacement too, while PEFT's head keeps the old table (its merge_and_unload "
                      "unties them). jlora.wrap runs the adapter as PEFT does.", stacklevel=2)
    for i, kernel in tied_head_columns(pairs).items():
        leaves[i] = kernel
    for i, merged in zip(where, _merge_modules([leaves[i] for i in where])):
        leaves[i] = merged
    return jax.tree_util.tree_unflatten(treedef, leaves)
