"""Arrow routing (PEFT's ``create_arrow_model`` / ``ArrowConfig``): a library of task LoRAs as a per-token mixture.

Every adapted Linear holds its task adapters' factors and one prototype per adapter: the top right singular vector
of ``B @ A`` (the input direction the adapter responds to most). A token's input ``x`` scores each adapter
``|x . prototype|``; the ``top_k`` best are weighted by a softmax of their scores over ``router_temperature``, and
the token gets ``sum_e w_e s_e (x @ A_e) @ B_e``. GenKnowSub (``general=``): the mean of some general adapters'
A and of their B is subtracted from each task adapter's A and B first, and the general adapters are not routed to.

PEFT finds the prototypes by 15 steps of power iteration from a random start; jlora computes them exactly (from a
QR of A and the eigenvectors of an r x r matrix), so the two agree as far as PEFT's iteration has converged.

Example:
    >>> lp = jlora.load(model.params, {"task_0": "user/math-lora", "task_1": "user/code-lora"})
    >>> routed = jlora.arrow(lp, top_k=1)
    >>> logits = jax.jit(jlora.wrap(model.__call__))(input_ids, params=routed).logits   # no adapter_ids
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from .errors import AdapterError, UnsupportedAdapterError
from .tree import ARROW_PROTOTYPES, LORA_A, LORA_B, RANK_SCALE, AdaptedModule, adapted_modules, map_adapted


def arrow(lora_params: Any, *, top_k: int = 3, router_temperature: float = 1.0,
          general: Sequence[str] | None = None) -> Any:
    """``lora_params`` (several adapters, from ``jlora.load(params, {name: source, ...})``) with every adapted
    module routing each token through its ``top_k`` closest adapters (see module docstring), as PEFT's Arrow.
    ``general``: the names of the general adapters for GenKnowSub (PEFT's ``use_gks``); the others are the task
    adapters, routed in the tree's adapter order. Run it with :func:`jlora.wrap` (no ``adapter_ids``).

    As PEFT requires: every adapter targets the same modules with the same rank, on Linear layers.

    Example:
        >>> routed = jlora.arrow(lp, top_k=2, router_temperature=0.5, general=["general_0", "general_1"])
    """
    nodes = [node for _, node in adapted_modules(lora_params)]
    names = next((tuple(name for name, *_ in n.spec.adapters) for n in nodes if n.spec.adapters), ())
    if not names:
        raise AdapterError("arrow: the tree holds a single adapter; load several (a dict of sources) to route "
                           "between them")
    general = list(general or [])
    unknown = [g for g in general if g not in names]
    tasks = [i for i, name in enumerate(names) if name not in general]
    if unknown or not tasks:
        raise AdapterError(f"arrow: general adapters {general} must be some (not all) of the tree's {list(names)}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= len(tasks):
        raise AdapterError(f"arrow: top_k must be an int from 1 to the {len(tasks)} task adapters, found {top_k!r}")
    if not router_temperature > 0:
        raise AdapterError(f"arrow: router_temperature must be positive, found {router_temperature!r}")
    problems = [p for n in nodes for p in _refusals(n)]
    if problems:
        raise UnsupportedAdapterError("arrow: these modules cannot be routed (PEFT's Arrow needs every adapter on "
                                      "the same Linear layers with the same rank)", problems)
    chosen = [names.index(g) for g in general]
    return map_adapted(lambda node: _routed(node, tasks, chosen, (top_k, float(router_temperature))), lora_params)


def _refusals(node: AdaptedModule) -> list[str]:
    """Why Arrow cannot route this module (empty: it can)."""
    spec = node.spec
    if not spec.adapters:
        return [f"{spec.peft_name}: holds one adapter only"]
    if not spec.has_lora:
        return [f"{spec.peft_name}: replaced tensors (modules_to_save, trainable tokens)"]
    ranks = {name: (own.sources[0].rank if own is not None and own.sources else None) for name, own, _ in spec.adapters}
    why = []
    if len(set(ranks.values())) > 1:
        why.append(f"{spec.peft_name}: ranks {ranks} (None: not targeted by that adapter)")
    if spec.kind != "linear" or node[LORA_A].ndim != 3 or node[LORA_B].ndim != 3 or spec.layer_axis is not None:
        why.append(f"{spec.peft_name}: not a plain Linear kernel (an embedding, a convolution, a multi-axis, fused "
                   "or stacked kernel)")
    owns = [own for _, own, _ in spec.adapters if own is not None]
    if any(own.dora or own.activated for own in owns):
        why.append(f"{spec.peft_name}: DoRA or aLoRA adapters")
    if "lora_bias" in node:
        why.append(f"{spec.peft_name}: lora_bias")
    return why


def _routed(node: AdaptedModule, tasks: list[int], general: list[int], arrow_spec: tuple) -> AdaptedModule:
    """The module's task adapters (GenKnowSub applied) with their prototypes, routing per token."""
    a, b = node[LORA_A], node[LORA_B]  # (adapters, in, r), (adapters, r, out)
    if general:
        a = a - jnp.mean(a[jnp.asarray(general)], axis=0)
        b = b - jnp.mean(b[jnp.asarray(general)], axis=0)
    task = jnp.asarray(tasks)
    a, b = a[task], b[task]
    children = {**node.base_children(), LORA_A: a, LORA_B: b, RANK_SCALE: node[RANK_SCALE][task],
                ARROW_PROTOTYPES: _prototypes(a, b).astype(a.dtype)}
    entries = tuple(node.spec.adapters[i] for i in tasks)
    return AdaptedModule(children, dataclasses.replace(node.spec, adapters=entries, arrow=arrow_spec, trainable=()))


@jax.jit
def _prototypes(a: jax.Array, b: jax.Array) -> jax.Array:
    """Each adapter's top right singular vector of ``B @ A`` (PEFT's orientation; here ``a`` (E, in, r) and ``b``
    (E, r, out)): with ``A = Q R``, the top eigenvector ``u`` of ``R (B B^T) R^T`` gives ``Q u``. Signs are free
    (routing uses ``|x . p|``)."""
    def one(a, b):
        q, r = jnp.linalg.qr(a.astype(jnp.float32))
        bb = b.astype(jnp.float32)
        _, vectors = jnp.linalg.eigh(r @ (bb @ bb.T) @ r.T)
        return q @ vectors[:, -1]

    return jax.vmap(one)(a, b)


def arrow_delta(x: jax.Array, entries: dict, spec) -> jax.Array:
    """The routed LoRA term of a Linear's input ``x`` (..., in), in the adapters' dtype (see module docstring)."""
    top_k, temperature = spec.arrow
    a, b = entries[LORA_A], entries[LORA_B]
    tokens = x.reshape(-1, x.shape[-1])
    score = jnp.abs(tokens @ entries[ARROW_PROTOTYPES].T)  # (t, E)
    best, index = jax.lax.top_k(score, top_k)
    kept = jnp.full_like(score, -jnp.inf).at[jnp.arange(score.shape[0])[:, None], index].set(best)
    weight = jax.nn.softmax(kept / temperature, axis=-1)  # (t, E)
    scale = entries[RANK_SCALE].reshape(a.shape[0], -1)  # (E, r)
    xa = jnp.einsum("ti,eir->ter", tokens, a) * (weight[:, :, None] * scale[None]).astype(tokens.dtype)
    delta = jnp.einsum("ter,ero->to", xa, b)
    return delta.reshape(*x.shape[:-1], b.shape[-1])
