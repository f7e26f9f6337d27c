"""The unmerged forward ``y = base(x) + s * (x @ A) @ B`` for each Flax module class that has one.

Each side path gets the module, its input, the base output ``y`` (computed by the module itself)
and the adapter entries; it never forms ``W + s * A @ B`` (DoRA's weight norm aside, as in PEFT).
PEFT's precision: x is cast to the adapter's dtype, the scaled LoRA term is rounded to that dtype
and added to ``y`` (in the wider of the two dtypes), and the sum is cast back to ``y``'s dtype (in
mixed batches the term is rounded to ``y``'s dtype before the add, as PEFT's ``adapter_names`` forward
does). Mixed batches over modules that several adapters replace (``modules_to_save``, trainable
tokens) run :func:`per_adapter_side` for any module class.

Example:
    >>> side = side_path_for(nn.Dense(4))   # a function, or None for modules without one
"""
from __future__ import annotations

import dataclasses
import math
import string
import warnings
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.linen.dtypes import promote_dtype

from .alora import token_mask
from .arrow import arrow_delta
from .errors import AdapterError
from .fused_matmul import block_sizes, lora_matmul, lora_matmul_grouped
from .kasa import truncated_output
from .merge import (
    adapters_masked,
    dora_factor,
    factor_delta,
    is_grouped,
    part_masked_a,
    part_masked_b,
    scaled_a,
    to_canonical,
)
from .tree import (
    BY_ADAPTER,
    KASA_DOWN,
    LORA_A,
    LORA_B,
    LORA_BIAS,
    LORA_DIAG,
    MAGNITUDE,
    RANK_SCALE,
    TOKEN_DELTA,
    ModuleSpec,
)


@dataclasses.dataclass(frozen=True)
class CallContext:
    """Per-call inputs of a side path: LoRA-branch dropout (None: none), each example's adapter
    index (multi-adapter trees; -1 = base model only) and, for aLoRA adapters, each example's offset."""

    drop: Callable[[jax.Array], jax.Array] | None = None
    adapter_ids: jax.Array | None = None
    alora_offsets: jax.Array | None = None  # aLoRA: each example's number of final tokens that get the adapter

    def lora_input(self, x: jax.Array, entries: dict) -> jax.Array:
        """``x`` as the LoRA branch sees it: in the adapter's dtype (PEFT's precision), dropped out."""
        x = x.astype(entries[LORA_A].dtype)
        return x if self.drop is None else self.drop(x)


# The side-path entry holding an Embed module's replaced table, when the model's tied head keeps the base one
INPUT_TABLE = "input_table"

# Mixed batches over replaced modules: per-example copies of more bytes than this (all examples together) run one
# example at a time. On this CPU the two forms break even at 8-16 MB (8 MB: 1.5 vs 2.0 ms, the gathered copies
# faster; 64 MB: 47 vs 14 ms, one at a time faster and 8x less temporary memory).
PER_EXAMPLE_COPY_LIMIT = 16 * 2**20

# fused_dense's kernel in Pallas' interpreter wherever it runs (tests set this to check the kernel itself on the
# CPU; otherwise the kernel runs on GPUs and its formula as plain XLA matmuls elsewhere)
FUSED_IN_INTERPRETER = False

# side(module, args, kwargs, y, entries, spec, ctx) -> output
SidePath = Callable[[nn.Module, tuple, dict, jax.Array, dict, ModuleSpec, CallContext], jax.Array]


def _input(args: tuple, kwargs: dict) -> jax.Array:
    return args[0] if args else kwargs["inputs"]


def _unstacked(spec: ModuleSpec, entries: dict) -> ModuleSpec:
    """Inside a scan body the adapter entries arrive sliced to one layer, like the kernel."""
    if spec.layer_axis is not None and entries[LORA_A].ndim == spec.in_ndim + 1:
        return dataclasses.replace(spec, layer_axis=None)
    return spec


def _scale_columns(xa: jax.Array, entries: dict) -> jax.Array:
    """Apply a per-rank-column ``lora_scale`` (stacked or fused kernels) and KaSA's singular values to ``x @ A``. A
    scalar scale is applied by :func:`_finish` instead, inside the elementwise add (one kernel fewer per module)."""
    scale = entries[RANK_SCALE]
    xa = xa if scale.ndim == 0 else xa * scale.reshape(-1).astype(xa.dtype)
    return xa * entries[LORA_DIAG].astype(xa.dtype) if LORA_DIAG in entries else xa


def _dropped_base(module: nn.Module, spec: ModuleSpec, entries: dict, ctx: CallContext, x: jax.Array,
                  **fields) -> jax.Array | None:
    """DoRA's base term when the LoRA input ``x`` is dropped out (PEFT in train mode runs the base
    weight on the dropped input): the module's own output for ``x`` without bias, in x's dtype.
    None when there is no dropout or no DoRA (the base output ``y`` serves). ``fields``: module
    fields to override (an Einsum's equation given at call time)."""
    if ctx.drop is None or MAGNITUDE not in entries:
        return None
    plain = module.clone(parent=None, use_bias=False, dtype=x.dtype, **fields)
    return plain.apply({"params": {spec.kernel_key: module.get_variable("params", spec.kernel_key)}}, x)


def _finish(module: nn.Module, y: jax.Array, lora: jax.Array, entries: dict, spec: ModuleSpec,
            dropped_base: jax.Array | None = None, ctx: CallContext | None = None) -> jax.Array:
    """Add the (already contracted, column-scaled) LoRA output to ``y``: plain, lora_bias, DoRA
    (whose base term is ``dropped_base`` when given, see :func:`_dropped_base`, else ``y`` less its bias); an aLoRA
    term only on each example's last ``ctx.alora_offsets`` tokens."""
    scale = entries[RANK_SCALE] if entries[RANK_SCALE].ndim == 0 else 1.0
    if LORA_BIAS in entries and not spec.adapters:  # simple modules only: a scalar scale (several adapters:
        lora = lora + entries[LORA_BIAS]               # added per example by _contract)
    if spec.activated:
        if ctx is None or ctx.alora_offsets is None:
            raise AdapterError(f"{spec.peft_name}: an aLoRA adapter needs alora_offsets=jlora.alora_offsets("
                               "lora_params, input_ids) in the call")
        lora = lora * token_mask(ctx.alora_offsets, lora.shape).astype(lora.dtype)
    if spec.adapters and spec.kind != "embedding":  # PEFT's mixed batches round each adapter's (scaled) term to
        lora = lora.astype(y.dtype)                   # y's dtype before adding it (its embeddings do not)
    if MAGNITUDE not in entries:  # PEFT: lora * scale rounded to the adapter's dtype, then added to y
        return (y + (scale * lora).astype(lora.dtype)).astype(y.dtype)
    spec = _unstacked(spec, entries)
    kernel = to_canonical(module.get_variable("params", spec.kernel_key), spec)
    delta = factor_delta(scaled_a(entries), _b(entries, spec))
    factor = dora_factor(kernel, delta, entries[MAGNITUDE], tuple(range(spec.in_ndim)))
    base = dropped_base
    if base is None:
        bias = module.get_variable("params", "bias") if spec.kind == "linear" else None
        base = y if bias is None else y - bias
    return (y + (factor - 1) * base + factor * scale * lora).astype(y.dtype)


def _dense_only(entries: dict) -> None:
    """KaSA's base correction is added by :func:`dense_side` only: elsewhere raise, and the module is merged in the
    call instead (see jlora.wrap), where the correction is part of the merged kernel."""
    if KASA_DOWN in entries:
        raise ValueError("KaSA runs unmerged on Dense / Linear layers only")


def _a(entries: dict, spec: ModuleSpec) -> jax.Array:
    return part_masked_a(entries[LORA_A], spec)


def _b(entries: dict, spec: ModuleSpec) -> jax.Array:
    return part_masked_b(entries[LORA_B], spec)


def _by_example(entries: dict, spec: ModuleSpec, key: str, idx: jax.Array) -> jax.Array:
    """Several adapters: each example's slice of the ``lora_A`` or ``lora_B`` stack (block-diagonal ones masked)."""
    return adapters_masked(entries[key], spec, "a" if key == LORA_A else "b")[idx]


def _contract(x: jax.Array, entries: dict, x_axes: tuple[int, ...], ctx: CallContext, spec: ModuleSpec) -> jax.Array:
    """``(x @ A) @ B`` with A's leading axes contracted against ``x_axes`` of x (the LoRA input)."""
    in_axes = tuple(range(len(x_axes)))
    if spec.arrow:  # every token routed through its closest adapters (jlora.arrow: plain Linear kernels only)
        return arrow_delta(x, entries, spec)
    if spec.adapters:  # one adapter per example: gather (in, r) and (r, out) slices, never (in, out)
        if entries[LORA_A].ndim != len(x_axes) + 2:
            raise AdapterError(f"{spec.peft_name}: a stacked kernel's adapters reach the module unsliced; mixed "
                               "batches need the layers sliced (nn.scan), one adapter can run with jlora.select")
        idx, scale = _example_adapters(entries, ctx, spec)
        a = _by_example(entries, spec, LORA_A, idx)
        xa = jax.lax.dot_general(x, a, ((x_axes, tuple(1 + i for i in in_axes)), ((0,), (0,))))
        return _example_up(xa, entries, idx, scale, spec)
    a, b = _a(entries, spec), _b(entries, spec)
    n_in = len(x_axes)
    if x_axes == tuple(range(x.ndim - n_in, x.ndim)):  # trailing axes: plain 2-D matmuls (faster on XLA:CPU,
        lead = x.shape[:x.ndim - n_in]                  # above all for the gradients, which contract over tokens)
        xa = x.reshape(-1, math.prod(x.shape[x.ndim - n_in:])) @ a.reshape(-1, a.shape[-1])
        lora = _scale_columns(xa, entries) @ b.reshape(b.shape[0], -1).astype(xa.dtype)
        return lora.reshape(*lead, *b.shape[1:])
    xa = jax.lax.dot_general(x, a, ((x_axes, in_axes), ((), ())))
    return jnp.tensordot(_scale_columns(xa, entries), b, axes=1)


def _example_up(xa: jax.Array, entries: dict, idx: jax.Array, scale: jax.Array, spec: ModuleSpec) -> jax.Array:
    """Mixed batches: each example's ``x @ A`` (batch, ..., r) contracted with its adapter's ``lora_B`` (gathered
    (r, out) slices), plus its ``lora_B`` bias, times its adapter's scale in the adapter's dtype, as PEFT's
    ``lora_B(lora_A(x)) * scaling`` (fused kernels, whose parts have their own scales: applied to ``x @ A``)."""
    per_column = any(s.placement.fused for _, own, _ in spec.adapters if own is not None for s in own.sources)
    if per_column:
        xa = xa * scale.reshape(scale.shape[0], *([1] * (xa.ndim - 2)), scale.shape[-1])
    lora = jax.lax.dot_general(xa, _by_example(entries, spec, LORA_B, idx), (((xa.ndim - 1,), (1,)), ((0,), (0,))))
    by_example = lambda v: v.reshape(v.shape[0], *([1] * (lora.ndim - v.ndim)), *v.shape[1:])  # noqa: E731
    if LORA_BIAS in entries:  # (simple modules only)
        lora = lora + by_example(entries[LORA_BIAS][idx]).astype(lora.dtype)
    if per_column:
        return lora
    return (lora * by_example(scale[:, 0])).astype(lora.dtype)  # (column 0: a real column of every adapter)


def _adapter_ids(ctx: CallContext, spec: ModuleSpec) -> jax.Array:
    """Each example's adapter index, as int32 (-1 = base model)."""
    if ctx.adapter_ids is None:
        raise AdapterError(f"{spec.peft_name}: the tree holds several adapters "
                           f"({[name for name, *_ in spec.adapters]}); pass adapter_ids=... (one index per example, "
                           "-1 for the base model) to the wrapped function, or jlora.select one adapter")
    return jnp.asarray(ctx.adapter_ids, jnp.int32)


def _example_adapters(entries: dict, ctx: CallContext, spec: ModuleSpec) -> tuple[jax.Array, jax.Array]:
    """Each example's adapter index (clipped) and its (batch, r) column scales (zero for -1 = base)."""
    ids = _adapter_ids(ctx, spec)
    idx = jnp.clip(ids, 0, len(spec.adapters) - 1)
    scale = entries[RANK_SCALE][idx].reshape(ids.shape[0], -1) * (ids >= 0)[:, None]
    return idx, scale


def dense_side(module, args, kwargs, y, entries, spec, ctx):
    y = truncated_output(y, _input(args, kwargs), entries)  # (KaSA: the base weight's dropped components)
    x = ctx.lora_input(_input(args, kwargs), entries)
    lora = _contract(x, entries, (x.ndim - 1,), ctx, spec)
    return _finish(module, y, lora, entries, spec, _dropped_base(module, spec, entries, ctx, x), ctx)


def _fits_fused(entries: dict, spec: ModuleSpec, ctx: CallContext) -> bool:
    """Whether an adapter can run inside :func:`~jlora.fused_matmul.lora_matmul` (or, one adapter per example,
    :func:`~jlora.fused_matmul.lora_matmul_grouped`): plain LoRA (no DoRA, ``lora_bias``, dropout, KaSA, aLoRA or
    Arrow routing) on a 2-D kernel (a stacked one sliced to its layer); not several adapters' replaced tensors."""
    return spec.has_lora and not (ctx.drop is not None or MAGNITUDE in entries or LORA_BIAS in entries
                                  or LORA_DIAG in entries or spec.activated or spec.arrow
                                  or entries[LORA_A].ndim != 2 + bool(spec.adapters))


def _fused_linear(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, entries: dict, spec: ModuleSpec,
                  ctx: CallContext) -> jax.Array | None:
    """``x @ kernel + bias`` (``x`` ``(..., in)``, dtypes already promoted) with the adapter (or each example's:
    mixed batches) added inside the matmul's kernel, or None when the kernel's blocks do not divide the shape."""
    lead, (n_in, n_out) = x.shape[:-1], kernel.shape
    group_rows = math.prod(lead[1:]) if spec.adapters else None  # (mixed batches: one example's tokens)
    if (spec.adapters and not lead) or block_sizes(math.prod(lead), n_out, n_in, group_rows) is None:
        return None
    if entries[LORA_A].dtype != x.dtype:
        warnings.warn(f"fused=True: an adapter in {entries[LORA_A].dtype} on modules computing in {x.dtype} is cast "
                      f"on every call (one more kernel each for A and B); load it with dtype=jnp.{x.dtype}",
                      stacklevel=2)
    rows = x.reshape(-1, n_in)
    if spec.adapters:  # each example's (in, r) and (r, out) slices, and its scales (zero for the base model)
        idx, scale = _example_adapters(entries, ctx, spec)
        a, b = (_by_example(entries, spec, key, idx).astype(x.dtype) for key in (LORA_A, LORA_B))
        y = lora_matmul_grouped(rows, kernel, a, b, scale, group_rows, FUSED_IN_INTERPRETER)
    else:
        scale = entries[RANK_SCALE]  # (a stacked or fused kernel's: one per rank column)
        y = lora_matmul(rows, kernel, _a(entries, spec).astype(x.dtype), _b(entries, spec).astype(x.dtype),
                        scale if scale.ndim == 0 else scale.reshape(-1), FUSED_IN_INTERPRETER)
    y = y.reshape(*lead, n_out)
    return y if bias is None else y + bias


def fused_dense(module, args, kwargs, entries, spec, ctx) -> jax.Array | None:
    """An ``nn.Dense``'s output with its adapter added inside the matmul's own kernel
    (:func:`~jlora.fused_matmul.lora_matmul`, in the module's dtype), or None when this call does not fit it
    (several adapters, DoRA, ``lora_bias``, dropout, a custom dot or precision, or shapes the kernel's blocks do
    not divide): the caller then runs the module and :func:`dense_side`."""
    if (type(module) is not nn.Dense or module.dot_general is not None or module.dot_general_cls is not None
            or module.precision is not None or not _fits_fused(entries, spec, ctx)):
        return None
    kernel = module.get_variable("params", "kernel")
    bias = module.get_variable("params", "bias") if module.use_bias else None
    promote = getattr(module, "promote_dtype", promote_dtype)
    x, kernel, bias = promote(_input(args, kwargs), kernel, bias, dtype=module.dtype)
    return _fused_linear(x, kernel, bias, entries, spec, ctx)


def fused_nnx_linear(module: nnx.Linear, args, kwargs, entries, spec, ctx) -> jax.Array | None:
    """:func:`fused_dense` for an ``nnx.Linear`` (its caller checks the class): None when the call does not fit
    the kernel (also a custom ``dot_general``, ``precision``, ``preferred_element_type`` or ``out_sharding``)."""
    if (module.dot_general is not jax.lax.dot_general or module.precision is not None
            or module.preferred_element_type is not None or len(args) > 1 or kwargs.get("out_sharding") is not None
            or not _fits_fused(entries, spec, ctx)):
        return None
    bias = module.bias[...] if module.bias is not None else None
    x, kernel, bias = module.promote_dtype((_input(args, kwargs), module.kernel[...], bias), dtype=module.dtype)
    return _fused_linear(x, kernel, bias, entries, spec, ctx)


def dense_general_side(module, args, kwargs, y, entries, spec, ctx):
    _dense_only(entries)
    x = ctx.lora_input(_input(args, kwargs), entries)
    axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
    axes = tuple(a % x.ndim for a in axis)
    lora = _contract(x, entries, axes, ctx, spec)
    bounds = kwargs.get("slice_bounds")  # (MaxText's DenseGeneral: the output's last axis sliced in the call)
    lora = lora if bounds is None else lora[..., bounds[0]:bounds[1]]
    return _finish(module, y, lora, entries, spec, _dropped_base(module, spec, entries, ctx, x), ctx)


def einsum_side(module, args, kwargs, y, entries, spec, ctx):
    _dense_only(entries)
    x = ctx.lora_input(_input(args, kwargs), entries)
    einsum_str = args[1] if len(args) > 1 else kwargs.get("einsum_str")
    spec_str = (einsum_str or module.einsum_str).replace(" ", "")
    lhs, out = spec_str.split("->")
    x_sub, k_sub = lhs.split(",")
    ins = [c for c in k_sub if c in x_sub and c not in out]
    outs = [c for c in k_sub if c not in ins]
    r = next(c for c in string.ascii_letters if c not in spec_str)
    x_rest = "".join(c for c in x_sub if c not in ins)
    if spec.adapters:  # each example's (ins..., r) and (r, outs...) slices; the batch is x's first axis
        batch = x_sub[0]
        if not batch.isalpha() or batch in k_sub or batch not in out or LORA_BIAS in entries:
            raise AdapterError(f"{spec.peft_name}: mixed-adapter batches on an Einsum need the batch as x's first "
                               f"axis, kept in the output and not in the kernel ({spec_str!r}), and no lora_bias; "
                               "jlora.select one adapter")
        idx, scale = _example_adapters(entries, ctx, spec)
        xa = jnp.einsum(f"{x_sub},{batch}{''.join(ins)}{r}->{x_rest}{r}", x, _by_example(entries, spec, LORA_A, idx))
        at = x_rest.index(batch)
        xa = xa * scale.reshape(*[1] * at, -1, *[1] * (len(x_rest) - at - 1), scale.shape[-1])
        lora = jnp.einsum(f"{x_rest}{r},{batch}{r}{''.join(outs)}->{out}", xa, _by_example(entries, spec, LORA_B, idx))
        return _finish(module, y, lora, entries, spec)
    xa = jnp.einsum(f"{x_sub},{''.join(ins)}{r}->{x_rest}{r}", x, _a(entries, spec))
    dropped = _dropped_base(module, spec, entries, ctx, x, einsum_str=spec_str)
    moved = "".join(c for c in out if c not in outs) + "".join(outs)
    if moved == out or "." in out:
        lora = jnp.einsum(f"{x_rest}{r},{r}{''.join(outs)}->{out}", _scale_columns(xa, entries), _b(entries, spec))
        return _finish(module, y, lora, entries, spec, dropped, ctx)
    # the kernel's output axes are not the output's last ones in their kernel order (a fused kernel's part axis
    # first, as tunix's 'BTD,SNDH->SBTNH'): _finish's per-output terms (DoRA, lora_bias) and aLoRA's per-token
    # mask broadcast over trailing axes, so it runs with those axes moved last, and the sum is moved back
    if dropped is None and MAGNITUDE in entries:  # (the base term, bias subtracted in the output's own layout)
        bias = module.get_variable("params", "bias")
        dropped = y if bias is None else y - bias
    to_moved = lambda v: None if v is None else jnp.einsum(f"{out}->{moved}", v)  # noqa: E731
    lora = jnp.einsum(f"{x_rest}{r},{r}{''.join(outs)}->{moved}", _scale_columns(xa, entries), _b(entries, spec))
    return jnp.einsum(f"{moved}->{out}", _finish(module, to_moved(y), lora, entries, spec, to_moved(dropped), ctx))


def embed_side(module, args, kwargs, y, entries, spec, ctx):  # PEFT: no dropout on embeddings
    _dense_only(entries)
    ids = _input(args, kwargs)
    if INPUT_TABLE in entries:  # a replaced table (modules_to_save) whose tied output head keeps the base one
        return jnp.take(entries[INPUT_TABLE].astype(y.dtype), ids, axis=0)
    if spec.adapters:
        idx, scale = _example_adapters(entries, ctx, spec)
        expand = (slice(None),) + (None,) * (ids.ndim - 1)
        rows = entries[LORA_A][idx[expand], ids] * scale.reshape(scale.shape[0], *([1] * (ids.ndim - 1)), -1)
        lora = jax.lax.dot_general(rows, entries[LORA_B][idx], (((rows.ndim - 1,), (1,)), ((0,), (0,))))
        return _finish(module, y, lora, entries, spec)
    rows = _scale_columns(jnp.take(entries[LORA_A], ids, axis=0), entries)
    return _finish(module, y, jnp.tensordot(rows, _b(entries, spec), axes=1), entries, spec)


def conv_side(module, args, kwargs, y, entries, spec, ctx):
    _dense_only(entries)
    x = ctx.lora_input(_input(args, kwargs), entries)
    a = entries[LORA_A]
    down = module.clone(parent=None, features=a.shape[-1], use_bias=False, dtype=a.dtype, param_dtype=a.dtype,
                        feature_group_count=1)  # (a grouped conv's lora_A reads every input channel, as PEFT's)
    if spec.adapters:  # each example convolved with its adapter's (kernel..., in, r) slice
        idx, scale = _example_adapters(entries, ctx, spec)
        xa = jax.vmap(lambda kernel, xb: down.apply({"params": {"kernel": kernel}}, xb[None])[0])(a[idx], x)
        return _finish(module, y, _example_up(xa, entries, idx, scale, spec), entries, spec)
    xa = down.apply({"params": {"kernel": a}}, x)
    lora = jnp.tensordot(_scale_columns(xa, entries), _b(entries, spec), axes=1)
    return _finish(module, y, lora, entries, spec, _dropped_base(module, spec, entries, ctx, x))


def per_adapter_side(module, args, kwargs, y, entries, spec, ctx):
    """Several adapters replacing a module's tensors (modules_to_save, trainable tokens), as PEFT's mixed batches:
    each example runs the module with its own adapter's tensors (an embedding looks its rows up in its adapter's
    table; other modules run on per-example parameters, so each example holds a copy of them: meant for heads and
    small modules); ``adapter_ids`` -1 keeps the base output ``y``."""
    ids = _adapter_ids(ctx, spec)
    idx = jnp.clip(ids, 0, len(spec.adapters) - 1)
    x = _input(args, kwargs)
    stacks = {k[len(BY_ADAPTER):]: v for k, v in entries.items()
              if k.startswith(BY_ADAPTER) and k != BY_ADAPTER + TOKEN_DELTA}
    for key, stack in stacks.items():
        own = module.get_variable("params", key)
        if own is None or tuple(stack.shape[1:]) != tuple(own.shape):
            raise AdapterError(f"{spec.peft_name}: its adapters' {key!r} {list(stack.shape[1:])} does not fit the "
                               f"module's {None if own is None else list(own.shape)} (inside a scan?); jlora.select "
                               "one adapter")
    out = y
    if "embedding" in stacks:  # one table per adapter: a lookup of (adapter, token)
        out = stacks["embedding"][idx.reshape(-1, *[1] * (x.ndim - 1)), x]
    elif stacks:
        out = _per_example_apply(module, stacks, idx, x)
    if BY_ADAPTER + TOKEN_DELTA in entries:
        out = _token_rows(out, x, idx, entries[BY_ADAPTER + TOKEN_DELTA], spec)
    keep = (ids >= 0).reshape(-1, *[1] * (out.ndim - 1))
    return jnp.where(keep, out.astype(y.dtype), y)


def _per_example_apply(module, stacks: dict, idx: jax.Array, x: jax.Array) -> jax.Array:
    """``module`` on each example of ``x`` with its adapter's tensors (``stacks[key][idx[i]]``): all examples at once
    on gathered copies, or, when those copies would exceed ``PER_EXAMPLE_COPY_LIMIT`` bytes, one example after the
    other (``lax.map``: one adapter's copy live at a time)."""
    run = lambda params, xb: _apply_with(module, params, xb[None])[0]  # noqa: E731
    copies = x.shape[0] * sum(math.prod(v.shape[1:]) * v.dtype.itemsize for v in stacks.values())
    if copies <= PER_EXAMPLE_COPY_LIMIT:
        return jax.vmap(run)({k: v[idx] for k, v in stacks.items()}, x)
    return jax.lax.map(lambda item: run({k: v[item[0]] for k, v in stacks.items()}, item[1]), (idx, x))


def _apply_with(module, params: dict, x: jax.Array) -> jax.Array:
    """``module`` run on ``x`` with ``params`` in place of its own (linen, or NNX through its view)."""
    if isinstance(module, nn.Module):
        return module.clone(parent=None).apply({"params": params}, x)
    return module.apply_with(params, x)


def _token_rows(out: jax.Array, ids: jax.Array, idx: jax.Array, deltas: jax.Array, spec: ModuleSpec) -> jax.Array:
    """Trainable tokens per example: the rows of ``out`` (embedding lookups of ``ids``) whose token is one of the
    example's adapter's indices take that adapter's delta row (PEFT: the rows replace the table's)."""
    indices = np.full((len(spec.adapters), deltas.shape[1]), -1, np.int32)  # -1: padding, matches no token
    for i, (_, own, _) in enumerate(spec.adapters):
        if own is not None:
            indices[i, :len(own.token_indices)] = own.token_indices
    mine = jnp.asarray(indices)[idx].reshape(-1, *[1] * (ids.ndim - 1), deltas.shape[1])  # (batch, 1.., K)
    match = ids[..., None] == mine
    row = jnp.argmax(match, axis=-1)  # (batch, tokens...)
    rows = jnp.take_along_axis(deltas[idx], row.reshape(row.shape[0], -1, 1), axis=1).reshape(*row.shape, -1)
    return jnp.where(match.any(-1)[..., None], rows.astype(out.dtype), out)


def side_for(module: nn.Module | nnx.Module, spec: ModuleSpec) -> SidePath | None:
    """The side path of an adapted module: :func:`per_adapter_side` for several adapters' replaced tensors (any
    module class), else the module class's (:func:`side_path_for`)."""
    if spec.adapters and not spec.has_lora:
        return per_adapter_side
    if isinstance(module, (nn.Conv, nnx.Conv)) and module.feature_group_count > 1 and is_grouped(spec):
        return conv_side  # PEFT's LoRA on a grouped conv: a full conv to rank r, then a grouped 1x1 (block-diagonal B)
    return side_path_for(module)


def is_param_einsum(module: object) -> bool:
    """Whether ``module`` is an NNX einsum of its input with its one parameter, by its structure: a string
    ``einsum_str`` attribute of two operands and one output, and exactly one ``nnx.Param`` with as many axes as the
    equation's second operand (the ``Einsum`` classes of model zoos such as google-tunix's, parameter ``w``,
    called as ``module(x)``). Such a module runs :func:`einsum_side` like ``nnx.Einsum``.

    Args:
        module: any object (linen modules and non-modules answer False).

    Returns:
        True for such a module.

    Example:
        >>> is_param_einsum(tunix_llama.layers[0].attn.q_proj)   # einsum_str "BTD,DNH->BTNH", w (D, N, H)
        True
    """
    equation = getattr(module, "einsum_str", None) if isinstance(module, nnx.Module) else None
    if not isinstance(equation, str) or equation.count("->") != 1 or equation.split("->")[0].count(",") != 1:
        return False
    params = jax.tree_util.tree_leaves(nnx.state(module, nnx.Param))
    kernel_axes = equation.replace(" ", "").split("->")[0].split(",")[1]
    return len(params) == 1 and "." not in kernel_axes and getattr(params[0], "ndim", -1) == len(kernel_axes)


def is_axis_dense(module: object) -> bool:
    """Whether ``module`` is an NNX dense layer over the input axes its fields name, by its structure: tuple fields
    ``axis``, ``in_features_shape`` (as long as ``axis``) and ``out_features_shape``, and an ``nnx.Param``
    ``kernel`` of shape ``in_features_shape + out_features_shape`` (or that with one more axis anywhere: layers
    stacked for a scan), called as ``module(x, ...)`` and adding a trailing-axes bias if any (MaxText's
    ``DenseGeneral``). Such a module runs :func:`dense_general_side` like ``nnx.LinearGeneral``.

    Args:
        module: any object (linen modules, ``nnx.LinearGeneral`` and non-modules answer False).

    Returns:
        True for such a module.

    Example:
        >>> is_axis_dense(maxtext_model.decoder.layers.self_attention.query)  # axis (-1,), kernel (D, L, N, H)
        True
    """
    if not isinstance(module, nnx.Module) or isinstance(module, (nnx.Linear, nnx.LinearGeneral)):
        return False
    axis, ins, outs = (getattr(module, name, None) for name in ("axis", "in_features_shape", "out_features_shape"))
    kernel = getattr(module, "kernel", None)
    if not (all(isinstance(v, tuple) for v in (axis, ins, outs)) and len(axis) == len(ins)
            and isinstance(kernel, nnx.Param)):
        return False
    shape = tuple(getattr(kernel, "shape", ()))
    return shape == ins + outs or (len(shape) == len(ins + outs) + 1
                                   and any(shape[:i] + shape[i + 1:] == ins + outs for i in range(len(shape))))


def is_matrix_linear(module: object) -> bool:
    """Whether ``module`` is an NNX linear layer outside flax, by its structure: int fields ``in_features`` and
    ``out_features`` and an ``nnx.Param`` ``kernel`` of shape ``(in_features, out_features)``, called as
    ``module(x)`` for ``x @ kernel (+ bias)`` (EasyDeL's ``ColumnParallelLinear`` / ``RowParallelLinear``). Such a
    module runs :func:`dense_side` like ``nnx.Linear``.

    Args:
        module: any object (linen modules, ``nnx.Linear`` and non-modules answer False).

    Returns:
        True for such a module.

    Example:
        >>> is_matrix_linear(easydel_llama.model.layers[0].self_attn.q_proj)   # kernel (D, N * H)
        True
    """
    if not isinstance(module, nnx.Module) or isinstance(module, (nnx.Linear, nnx.LinearGeneral)):
        return False
    n_in, n_out, kernel = (getattr(module, name, None) for name in ("in_features", "out_features", "kernel"))
    return (isinstance(n_in, int) and isinstance(n_out, int) and isinstance(kernel, nnx.Param)
            and tuple(getattr(kernel, "shape", ())) == (n_in, n_out))


def side_path_for(module: nn.Module | nnx.Module) -> SidePath | None:
    """The side path for ``module``'s class (linen, or NNX through :func:`jlora.nnx_model`), or None when it
    has none (the caller then merges)."""
    if isinstance(module, (nn.Dense, nnx.Linear)) or type(module).__name__ == "FlaxConv1D" or is_matrix_linear(module):
        return dense_side
    if isinstance(module, nn.DenseGeneral):
        return None if module.batch_dims else dense_general_side
    if isinstance(module, nnx.LinearGeneral):
        return None if module.batch_axis else dense_general_side
    if is_axis_dense(module):
        return dense_general_side
    if isinstance(module, (nn.Einsum, nnx.Einsum)) or is_param_einsum(module):
        return einsum_side
    if isinstance(module, (nn.Embed, nnx.Embed)):
        return embed_side
    if isinstance(module, (nn.Conv, nnx.Conv)) and module.feature_group_count == 1:
        return conv_side
    return None
