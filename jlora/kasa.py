"""KaSA (PEFT's ``kasa_config``): LoRA in SVD form on a base weight without its ``r`` smallest singular components.

PEFT truncates the base weight in place when it adds the adapter (``W = U S V^T`` keeps its ``k - r`` largest
components) and learns ``s * B @ diag(lora_diag) @ A`` in the freed subspace. jlora leaves the base arrays as they
are: at load it computes the dropped components from the kernel and keeps them frozen as ``kasa_down`` (in, r) and
``kasa_up`` (r, out), so that the module computes ``x @ (W - dropped) + s * ((x @ A) * lora_diag) @ B``, exactly what
PEFT's truncated layer does. ``lora_diag`` trains with A and B.

Example:
    >>> lp = jlora.load(model.params, "kasa-adapter")          # the SVD of every targeted kernel, once
    >>> logits = jax.jit(jlora.wrap(model.__call__))(ids, params=lp).logits
"""
from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .tree import KASA_DOWN, KASA_UP, LORA_A, LORA_B, LORA_DIAG, adapted_modules


def dropped_components(kernel: np.ndarray, in_ndim: int, kernel_perm: tuple[int, ...], rank: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The negated ``rank`` smallest singular components of a kernel, as (down, up): canonical ``(inputs..., rank)``
    and ``(rank, outputs...)`` with ``inputs @ down @ up = -(dropped part of inputs @ kernel)`` (float32 SVD, as
    PEFT's)."""
    canonical = np.asarray(kernel, np.float32).transpose(np.argsort(kernel_perm))
    ins, outs = canonical.shape[:in_ndim], canonical.shape[in_ndim:]
    u, s, vt = np.linalg.svd(canonical.reshape(int(np.prod(ins)), -1), full_matrices=False)
    down = u[:, -rank:].reshape(*ins, rank)
    up = -(s[-rank:, None] * vt[-rank:]).reshape(rank, *outs)
    return np.ascontiguousarray(down), np.ascontiguousarray(up)


def truncated_output(y: jax.Array, x: jax.Array, entries: dict) -> jax.Array:
    """A Dense layer's output ``y`` for input ``x`` as its KaSA-truncated weight gives it."""
    if KASA_DOWN not in entries:
        return y
    down, up = entries[KASA_DOWN], entries[KASA_UP]
    correction = (x.astype(down.dtype) @ down.reshape(-1, down.shape[-1])) @ up.reshape(up.shape[0], -1)
    return (y + correction.reshape(*y.shape).astype(y.dtype)).astype(y.dtype)


def kasa_loss(lora_params: Any, beta: float | None = None, gamma: float | None = None) -> jax.Array:
    """KaSA's regularizers, as PEFT's ``LoraModel._get_kasa_loss``: the sum over KaSA modules of
    ``beta * sum(lora_diag ** 2) + gamma * (||B^T B - I|| + ||A A^T - I||)`` (Frobenius norms), ``beta`` and
    ``gamma`` from the adapter's ``kasa_config`` unless given. Add it to the training loss.

    Example:
        >>> loss = task_loss + jlora.kasa_loss(jlora.combine(trainable, frozen))
    """
    total = jnp.zeros((), jnp.float32)
    for _, node in adapted_modules(lora_params):
        if LORA_DIAG not in node:
            continue
        config = json.loads(node.spec.config_json).get("kasa_config") or {}
        b_coef = config.get("beta", 1e-4) if beta is None else beta
        g_coef = config.get("gamma", 1e-3) if gamma is None else gamma
        a = node[LORA_A].astype(jnp.float32).reshape(-1, node[LORA_A].shape[-1])  # (in, r)
        b = node[LORA_B].astype(jnp.float32).reshape(node[LORA_B].shape[0], -1)  # (r, out)
        eye = jnp.eye(a.shape[-1], dtype=jnp.float32)
        total = total + b_coef * jnp.sum(node[LORA_DIAG].astype(jnp.float32) ** 2) + g_coef * (
            jnp.linalg.norm(b @ b.T - eye) + jnp.linalg.norm(a.T @ a - eye))
    return total
