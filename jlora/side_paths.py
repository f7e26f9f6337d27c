"""The unmerged forward ``y = base(x) + s * (x @ A) @ B`` for each Flax module class that has one.

Each side path gets the module, its input, the base output ``y`` (computed by the module itself)
and the adapter entries; it never forms ``W + s * A @ B`` (DoRA's weight norm aside, as in PEFT).
PEFT's precision: x is cast to the adapter's dtype, the LoRA term is added in that dtype, and the
sum is cast back to ``y``'s dtype.

Example:
    >>> side = side_path_for(nn.Dense(4))   # a function, or None for modules without one
"""
from __future__ import annotations

import dataclasses
import string
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from .merge import dora_factor, factor_delta, part_masked_b, scaled_a, to_canonical
from .tree import LORA_A, LORA_B, LORA_BIAS, MAGNITUDE, RANK_SCALE, ModuleSpec

# side(module, args, kwargs, y, entries, spec, drop) -> output; ``drop`` is the LoRA-branch dropout
SidePath = Callable[[nn.Module, tuple, dict, jax.Array, dict, ModuleSpec, Callable], jax.Array]


def _input(args: tuple, kwargs: dict) -> jax.Array:
    return args[0] if args else kwargs["inputs"]


def _unstacked(spec: ModuleSpec, entries: dict) -> ModuleSpec:
    """Inside a scan body the adapter entries arrive sliced to one layer, like the kernel."""
    if spec.layer_axis is not None and entries[LORA_A].ndim == spec.in_ndim + 1:
        return dataclasses.replace(spec, layer_axis=None)
    return spec


def _scale_columns(xa: jax.Array, entries: dict) -> jax.Array:
    """Apply a per-rank-column ``lora_scale`` (stacked or fused kernels) to ``x @ A``."""
    if RANK_SCALE in entries:
        return xa * entries[RANK_SCALE].reshape(-1).astype(xa.dtype)
    return xa


def _finish(module: nn.Module, y: jax.Array, lora: jax.Array, entries: dict, spec: ModuleSpec) -> jax.Array:
    """Add the (already contracted and column-scaled) LoRA output to ``y``: plain, lora_bias, DoRA."""
    scale = entries.get("scale", 1.0)
    if LORA_BIAS in entries:
        lora = lora + entries[LORA_BIAS]
    if MAGNITUDE not in entries:
        return (y + scale * lora).astype(y.dtype)
    spec = _unstacked(spec, entries)
    kernel = to_canonical(module.get_variable("params", spec.kernel_key), spec)
    delta = scale * factor_delta(scaled_a(entries, dataclasses.replace(spec, scale=1.0)), _b(entries, spec))
    factor = dora_factor(kernel, delta, entries[MAGNITUDE], tuple(range(spec.in_ndim)))
    bias = module.get_variable("params", "bias") if spec.kind == "linear" else None
    base = y if bias is None else y - bias
    return (y + (factor - 1) * base + factor * scale * lora).astype(y.dtype)


def _b(entries: dict, spec: ModuleSpec) -> jax.Array:
    return part_masked_b(entries[LORA_B], spec)


def _contract(x: jax.Array, entries: dict, x_axes: tuple[int, ...], drop: Callable, spec: ModuleSpec) -> jax.Array:
    """``(drop(x) @ A) @ B`` with A's leading axes contracted against ``x_axes`` of x."""
    a = entries[LORA_A]
    xa = jax.lax.dot_general(drop(x.astype(a.dtype)), a, ((x_axes, tuple(range(len(x_axes)))), ((), ())))
    return jnp.tensordot(_scale_columns(xa, entries), _b(entries, spec), axes=1)


def dense_side(module, args, kwargs, y, entries, spec, drop):
    x = _input(args, kwargs)
    return _finish(module, y, _contract(x, entries, (x.ndim - 1,), drop, spec), entries, spec)


def dense_general_side(module, args, kwargs, y, entries, spec, drop):
    x = _input(args, kwargs)
    axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
    axes = tuple(a % x.ndim for a in axis)
    return _finish(module, y, _contract(x, entries, axes, drop, spec), entries, spec)


def einsum_side(module, args, kwargs, y, entries, spec, drop):
    x = _input(args, kwargs)
    einsum_str = args[1] if len(args) > 1 else kwargs.get("einsum_str")
    spec_str = (einsum_str or module.einsum_str).replace(" ", "")
    lhs, out = spec_str.split("->")
    x_sub, k_sub = lhs.split(",")
    ins = [c for c in k_sub if c in x_sub and c not in out]
    outs = [c for c in k_sub if c not in ins]
    r = next(c for c in string.ascii_letters if c not in spec_str)
    x_rest = "".join(c for c in x_sub if c not in ins)
    a = entries[LORA_A]
    xa = jnp.einsum(f"{x_sub},{''.join(ins)}{r}->{x_rest}{r}", drop(x.astype(a.dtype)), a)
    lora = jnp.einsum(f"{x_rest}{r},{r}{''.join(outs)}->{out}", _scale_columns(xa, entries), _b(entries, spec))
    return _finish(module, y, lora, entries, spec)


def embed_side(module, args, kwargs, y, entries, spec, drop):  # PEFT: no dropout on embeddings
    ids = _input(args, kwargs)
    rows = _scale_columns(jnp.take(entries[LORA_A], ids, axis=0), entries)
    return _finish(module, y, jnp.tensordot(rows, _b(entries, spec), axes=1), entries, spec)


def conv_side(module, args, kwargs, y, entries, spec, drop):
    x = _input(args, kwargs)
    a = entries[LORA_A]
    down = module.clone(parent=None, features=a.shape[-1], use_bias=False, dtype=a.dtype, param_dtype=a.dtype)
    xa = down.apply({"params": {"kernel": a}}, drop(x.astype(a.dtype)))
    return _finish(module, y, jnp.tensordot(_scale_columns(xa, entries), _b(entries, spec), axes=1), entries, spec)


def side_path_for(module: nn.Module) -> SidePath | None:
    """The side path for ``module``'s class, or None when it has none (the caller then merges)."""
    if isinstance(module, nn.Dense) or type(module).__name__ == "FlaxConv1D":
        return dense_side
    if isinstance(module, nn.DenseGeneral):
        return None if module.batch_dims else dense_general_side
    if isinstance(module, nn.Einsum):
        return einsum_side
    if isinstance(module, nn.Embed):
        return embed_side
    if isinstance(module, nn.Conv) and module.feature_group_count == 1:
        return conv_side
    return None
