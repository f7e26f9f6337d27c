"""Fold an adapter into plain parameters: ``merge(lora_params)`` has the base tree's structure.

Also the LoRA math shared with the wrapped forward: the low-rank delta in the kernel's layout and
DoRA's weight norm. Deltas are computed in float32 and results cast to each kernel's dtype.

Example:
    >>> merged = jlora.merge(lora_params)
    >>> logits = model(input_ids, params=merged).logits
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .tree import LORA_A, LORA_B, LORA_BIAS, MAGNITUDE, TOKEN_DELTA, AdaptedModule, ModuleSpec, is_adapted


def canonical_delta(node: AdaptedModule) -> jax.Array:
    """``scale * A @ B`` in float32, shaped (inputs..., outputs...)."""
    a = node[LORA_A].astype(jnp.float32)
    b = node[LORA_B].astype(jnp.float32)
    return node.spec.scale * jnp.tensordot(a, b, axes=1)


def to_canonical(kernel: jax.Array, spec: ModuleSpec) -> jax.Array:
    return jnp.transpose(kernel, np.argsort(spec.kernel_perm))


def from_canonical(canonical: jax.Array, spec: ModuleSpec) -> jax.Array:
    return jnp.transpose(canonical, spec.kernel_perm)


def dora_factor(weight: jax.Array, delta: jax.Array, magnitude: jax.Array, spec: ModuleSpec) -> jax.Array:
    """DoRA's ``m / ||W + dW||`` (norm over the input axes; no gradient through the norm, as PEFT)."""
    adapted = weight.astype(jnp.float32) + delta
    norm = jnp.sqrt(jnp.sum(jnp.square(adapted), axis=tuple(range(spec.in_ndim))))
    return magnitude.astype(jnp.float32) / jax.lax.stop_gradient(norm)


def with_token_rows(node: AdaptedModule, children: dict) -> dict:
    """Trainable tokens: the delta rows replace the embedding rows at the token indices."""
    if TOKEN_DELTA in node:
        key = node.spec.kernel_key  # the embedding table
        table = jnp.asarray(children[key])  # numpy tables too (wrap runs this outside jit)
        idx = jnp.asarray(node.spec.token_indices, dtype=jnp.int32)
        children[key] = table.at[idx].set(node[TOKEN_DELTA].astype(table.dtype))
    return children


def plain_module(node: AdaptedModule) -> dict[str, Any]:
    """The module's parameters with replacement tensors applied but LoRA factors left out."""
    return with_token_rows(node, node.base_children())


def merged_module(node: AdaptedModule) -> dict[str, Any]:
    """The module's parameters with everything folded in, as PEFT's ``merge_and_unload``."""
    spec = node.spec
    children = plain_module(node)
    if not spec.has_lora:
        return children
    kernel = children[spec.kernel_key]
    weight = to_canonical(kernel, spec).astype(jnp.float32)
    delta = canonical_delta(node)
    merged = weight + delta
    if spec.dora:
        merged = dora_factor(weight, delta, node[MAGNITUDE], spec) * merged
    children[spec.kernel_key] = from_canonical(merged, spec).astype(kernel.dtype)
    if LORA_BIAS in node:
        bias = children["bias"]
        children["bias"] = (bias.astype(jnp.float32) + spec.scale * node[LORA_BIAS].astype(jnp.float32)).astype(bias.dtype)
    return children


@jax.jit
def _merge_modules(nodes: list[AdaptedModule]) -> list[dict]:
    return [merged_module(n) for n in nodes]


def merge(lora_params: Any) -> Any:
    """The plain parameter tree with every adapter folded in (one jitted pass over the adapted
    modules; every other leaf is passed through untouched, not copied).

    Example:
        >>> merged = jlora.merge(jlora.load(params, "adapter_dir"))
    """
    leaves, treedef = jax.tree_util.tree_flatten(lora_params, is_leaf=is_adapted)
    where = [i for i, leaf in enumerate(leaves) if is_adapted(leaf)]
    for i, merged in zip(where, _merge_modules([leaves[i] for i in where])):
        leaves[i] = merged
    return jax.tree_util.tree_unflatten(treedef, leaves)
