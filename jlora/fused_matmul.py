"""``lora_matmul``: ``x @ W + ((x @ A) * s) @ B`` as one Pallas kernel, for GPUs.

On a GPU the unmerged side path costs two extra kernels per adapted matmul (``x @ A``, then ``(x @ A) @ B``
with the add), and at small batches those launches, not their work, are most of its cost (see
``benchmarks/DIAGNOSIS.md``, "GPU"). This kernel computes each ``(block_m, block_n)`` output tile's
``x @ W`` and, in the same pass over ``x``, the rows' ``x @ A`` (``A`` has few columns: recomputing it per
tile costs ``r / block_n`` of the tile's work), then adds ``((x @ A) * s) @ B_tile`` before writing the tile:
one kernel in place of the base matmul's own. ``s`` is a scalar or one scale per rank column (stacked and
fused kernels). Both products accumulate in float32 and the sum is rounded once to ``x``'s dtype, so it is the
base dtype's precision, not PEFT's float32 LoRA branch (see :func:`jlora.wrap`'s ``fused``). Block sizes
follow the number of rows. Lowered for another platform than a GPU, the same formula runs as plain XLA matmuls
(``interpret=True`` runs the kernel in Pallas' interpreter instead: for tests, slow).

:func:`lora_matmul_grouped` is the mixed-batch form (Punica's SGMV for equal segments): consecutive groups of rows
(one example's tokens) each with their own adapter's ``A``, ``B`` and scale, gathered as ``(K, r)`` / ``(r, N)``
slices per example; each row block reads its group's slices, so a mixed batch runs in one kernel too. Groups of one
row (decoding, one token per example: Punica's BGMV) read each row's own slices, with broadcast multiplies and sums in
place of the two LoRA dots.

Example:
    >>> y = lora_matmul(x, kernel, lora_a.astype(x.dtype), lora_b.astype(x.dtype), scale)   # (M, N)
    >>> y = lora_matmul_grouped(x, kernel, a_per_example, b_per_example, scale_per_example, rows_per_group=16)
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# ranks are padded to a power of two of at least this (Triton's smallest dot dimension; its loads take power-of-two
# shapes); zero columns of A, rows of B and scales change no output
MIN_RANK = 16


def block_sizes(m: int, n: int, k: int, group_rows: int | None = None) -> tuple[int, int, int] | None:
    """``(block_m, block_n, block_k)`` for an ``(m, k) @ (k, n)`` product, or None when the shape does not fit
    the kernel (``n`` and ``k`` must be multiples of the blocks; rows may be ragged, unless they come in groups of
    ``group_rows``, which the row blocks must then divide). Few rows: narrow column blocks, so that enough programs
    run to fill the GPU."""
    block_m = min(max(16, pl.next_power_of_2(m)), 64)
    block_n = 32 if m <= 16 else 64 if m <= 64 else 128
    block_k = 128 if m <= 64 else 64
    if group_rows == 1:  # every row its own adapter (decoding: one token per example): per-row slices, small blocks
        block_m, block_n, block_k = 16, 32, 32
    elif group_rows is not None:
        while block_m >= 16 and group_rows % block_m:
            block_m //= 2
        if block_m < 16:
            return None
    while block_n > 16 and n % block_n:
        block_n //= 2
    while block_k > 16 and k % block_k:
        block_k //= 2
    if n % block_n or k % block_k:
        return None
    return block_m, block_n, block_k


def _kernel(x_ref, w_ref, a_ref, b_ref, s_ref, o_ref, *, rows: int, block_k: int, per_row: bool):
    """One output tile. ``per_row``: every row has its own ``A`` (block_m, K, r), ``B`` (block_m, r, block_n) and
    scales (block_m, r); their products are broadcast multiplies summed over K and r (no dot: a row's own matrix)."""
    block_m, block_n = o_ref.shape
    r = a_ref.shape[-1]
    # the last row block may pass the array's end: its extra rows are neither read nor written (masks)
    in_rows = (pl.program_id(0) * block_m + jnp.arange(block_m) < rows)[:, None]

    def step(i, carry):
        acc, xa = carry
        ks = pl.ds(i * block_k, block_k)
        x = plgpu.load(x_ref.at[:, ks], mask=in_rows, other=0)
        acc = acc + jnp.dot(x, w_ref[ks, :], preferred_element_type=jnp.float32)
        if per_row:
            a = plgpu.load(a_ref.at[:, ks, :], mask=jnp.broadcast_to(in_rows[:, :, None], (block_m, block_k, r)),
                           other=0)
            xa = xa + jnp.sum(x.astype(jnp.float32)[:, :, None] * a.astype(jnp.float32), axis=1)
        else:
            xa = xa + jnp.dot(x, a_ref[ks, :], preferred_element_type=jnp.float32)
        return acc, xa

    start = (jnp.zeros((block_m, block_n), jnp.float32), jnp.zeros((block_m, r), jnp.float32))
    acc, xa = jax.lax.fori_loop(0, x_ref.shape[1] // block_k, step, start)
    if per_row:
        scale = plgpu.load(s_ref, mask=jnp.broadcast_to(in_rows, s_ref.shape), other=0)
        b = plgpu.load(b_ref, mask=jnp.broadcast_to(in_rows[:, :, None], b_ref.shape), other=0)
        xa = (xa * scale).astype(b_ref.dtype).astype(jnp.float32)
        out = acc + jnp.sum(xa[:, :, None] * b.astype(jnp.float32), axis=1)
    else:
        xa = (xa * s_ref[...][None, :]).astype(b_ref.dtype)
        out = acc + jnp.dot(xa, b_ref[...], preferred_element_type=jnp.float32)
    plgpu.store(o_ref, out.astype(o_ref.dtype), mask=in_rows)


def _pad_rank(a: jax.Array, b: jax.Array, scale: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``a`` (..., K, r), ``b`` (..., r, N) and ``scale`` (as (..., 1) for one scale, else (..., r)) with the rank
    padded to a power of two of at least ``MIN_RANK`` (ranks 16, 32, 64, ... need no padding: no extra kernels)."""
    lead, r = a.shape[:-2], a.shape[-1]
    width = max(MIN_RANK, pl.next_power_of_2(r))
    scale = jnp.reshape(scale.astype(jnp.float32), (*lead, -1))
    if width == r:
        return a, b, scale
    none = [(0, 0)] * len(lead)
    if scale.shape[-1] == r:
        scale = jnp.pad(scale, (*none, (0, width - r)))
    return (jnp.pad(a, (*none, (0, 0), (0, width - r))), jnp.pad(b, (*none, (0, width - r), (0, 0))), scale)


def _pallas_call(x, w, a, b, scale, blocks: tuple[int, int, int], per_group: int | None, interpret: bool):
    """The kernel over an ``(M/block_m, N/block_n)`` grid. ``per_group``: row blocks per group, when ``a``, ``b`` and
    ``scale`` have a leading group axis (row block ``i`` reads group ``i // per_group``'s slices); 0: one group per
    row (row block ``i`` reads its rows' slices)."""
    (m, k), n, r = x.shape, w.shape[1], a.shape[-1]
    block_m, block_n, block_k = blocks
    if per_group is None:
        factor_specs = [pl.BlockSpec((k, r), lambda i, j: (0, 0)), pl.BlockSpec((r, block_n), lambda i, j: (0, j)),
                        pl.BlockSpec(scale.shape, lambda i, j: (0,))]
    elif per_group == 0:
        factor_specs = [pl.BlockSpec((block_m, k, r), lambda i, j: (i, 0, 0)),
                        pl.BlockSpec((block_m, r, block_n), lambda i, j: (i, 0, j)),
                        pl.BlockSpec((block_m, scale.shape[-1]), lambda i, j: (i, 0))]
    else:
        factor_specs = [pl.BlockSpec((None, k, r), lambda i, j: (i // per_group, 0, 0)),
                        pl.BlockSpec((None, r, block_n), lambda i, j: (i // per_group, 0, j)),
                        pl.BlockSpec((None, scale.shape[-1]), lambda i, j: (i // per_group, 0))]
    return pl.pallas_call(
        functools.partial(_kernel, rows=m, block_k=block_k, per_row=per_group == 0),
        out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
        grid=(pl.cdiv(m, block_m), n // block_n),
        in_specs=[pl.BlockSpec((block_m, k), lambda i, j: (i, 0)), pl.BlockSpec((k, block_n), lambda i, j: (0, j)),
                  *factor_specs],
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),  # the Triton backend
        name="jlora_lora_matmul",
    )(x, w, a, b, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def lora_matmul(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array,
                interpret: bool = False) -> jax.Array:
    """``x @ w + ((x @ a) * scale) @ b`` in one kernel: ``x`` ``(M, K)``, ``w`` ``(K, N)``, ``a`` ``(K, r)``, ``b``
    ``(r, N)`` (all of one dtype), ``scale`` a scalar or one per rank column ``(r,)``; the result ``(M, N)`` in
    ``x``'s dtype. The shape must fit :func:`block_sizes`. The Triton kernel runs where the computation is lowered
    for a GPU (CUDA or ROCm); elsewhere the same formula runs as plain XLA matmuls, or, with ``interpret=True``,
    the kernel itself in Pallas' interpreter (for tests: slow). Differentiable: the backward pass is plain XLA.

    Example:
        >>> lora_matmul(x, w, a, b, jnp.float32(2.0)).shape
        (1, 4096)
    """
    (m, k), n = x.shape, w.shape[1]
    blocks = block_sizes(m, n, k)
    if blocks is None:
        raise ValueError(f"lora_matmul: ({m}, {k}) @ ({k}, {n}) does not fit the kernel's blocks")
    a, b, scale = _pad_rank(a, b, scale)
    return _run(functools.partial(_pallas_call, blocks=blocks, per_group=None), _plain, (x, w, a, b, scale), interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def lora_matmul_grouped(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array,
                        rows_per_group: int, interpret: bool = False) -> jax.Array:
    """:func:`lora_matmul` with an adapter per group of ``rows_per_group`` consecutive rows (a mixed batch's
    examples): ``x`` ``(G * rows_per_group, K)``, ``a`` ``(G, K, r)``, ``b`` ``(G, r, N)``, ``scale`` ``(G,)`` or one
    per rank column ``(G, r)`` (zero: the base model only). The row blocks must divide the groups
    (:func:`block_sizes` with ``group_rows``), or the groups are single rows. Differentiable: the backward pass is
    plain XLA.

    Example:
        >>> lora_matmul_grouped(x, w, a[ids], b[ids], scale[ids], rows_per_group=16).shape
        (128, 4096)
    """
    (m, k), n = x.shape, w.shape[1]
    blocks = block_sizes(m, n, k, group_rows=rows_per_group)
    if blocks is None or m != a.shape[0] * rows_per_group:
        raise ValueError(f"lora_matmul_grouped: ({m}, {k}) @ ({k}, {n}) in {a.shape[0]} groups of {rows_per_group} "
                         "rows does not fit the kernel's blocks")
    a, b, scale = _pad_rank(a, b, scale)
    kernel = functools.partial(_pallas_call, blocks=blocks, per_group=rows_per_group // blocks[0])  # (0: per row)
    return _run(kernel, _plain_grouped, (x, w, a, b, scale), interpret)


def _run(kernel: Callable, plain: Callable, operands: tuple, interpret: bool) -> jax.Array:
    """``kernel`` where the computation is lowered for a GPU (CUDA or ROCm), ``plain`` (its formula as XLA matmuls)
    elsewhere; ``interpret``: the kernel in Pallas' interpreter, on any platform."""
    if interpret:
        return kernel(*operands, interpret=True)
    gpu = functools.partial(kernel, interpret=False)
    return jax.lax.platform_dependent(*operands, cuda=gpu, rocm=gpu, default=plain)


def _plain(x, w, a, b, scale):
    """The kernel's formula and rounding as XLA matmuls (float32 accumulation, one rounding to ``x``'s dtype)."""
    xa = (jnp.dot(x, a, preferred_element_type=jnp.float32) * scale).astype(b.dtype)
    y = jnp.dot(x, w, preferred_element_type=jnp.float32) + jnp.dot(xa, b, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def _plain_grouped(x, w, a, b, scale):
    """:func:`_plain` per group of rows (``scale`` (G, 1) or (G, r) after :func:`_pad_rank`)."""
    groups = x.reshape(a.shape[0], -1, x.shape[-1])
    xa = jnp.einsum("gmk,gkr->gmr", groups, a, preferred_element_type=jnp.float32) * scale[:, None, :]
    lora = jnp.einsum("gmr,grn->gmn", xa.astype(b.dtype), b, preferred_element_type=jnp.float32)
    y = jnp.dot(x, w, preferred_element_type=jnp.float32) + lora.reshape(x.shape[0], -1)
    return y.astype(x.dtype)


def _grouped_forward(x, w, a, b, scale, rows_per_group, interpret):
    return lora_matmul_grouped(x, w, a, b, scale, rows_per_group, interpret), (x, w, a, b, scale)


def _grouped_backward(rows_per_group, interpret, saved, dy):
    """The plain formula's gradients (the rank padding is the forward's own: taken again here, then dropped)."""
    x, w, a, b, scale = saved
    padded = lambda x, w, a, b, scale: _plain_grouped(x, w, *_pad_rank(a, b, scale))  # noqa: E731
    return jax.vjp(padded, x, w, a, b, scale)[1](dy)


lora_matmul_grouped.defvjp(_grouped_forward, _grouped_backward)


def _forward(x, w, a, b, scale, interpret):
    return lora_matmul(x, w, a, b, scale, interpret), (x, w, a, b, scale)


def _backward(interpret, saved, dy):
    x, w, a, b, scale = saved
    f32 = lambda v: v.astype(jnp.float32)  # noqa: E731
    dy, xa, s = f32(dy), f32(x) @ f32(a), f32(scale)
    dy_b = dy @ f32(b).T  # (M, r)
    d_scale = jnp.sum(dy_b * xa, axis=0)
    grads = (dy @ f32(w).T + (dy_b * s) @ f32(a).T, f32(x).T @ dy, f32(x).T @ (dy_b * s), (xa * s).T @ dy,
             d_scale.sum() if scale.ndim == 0 else d_scale)
    return tuple(g.astype(v.dtype) for g, v in zip(grads, saved))


lora_matmul.defvjp(_forward, _backward)
