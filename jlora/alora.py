"""Activated LoRA (aLoRA, PEFT's ``alora_invocation_tokens``): the adapter runs only from its invocation on.

PEFT finds the last occurrence of the adapter's invocation token sequence in each example's input ids; the
example's offset is the number of tokens from that occurrence's start to the end of the input (0 when the
sequence is absent: that example runs the base model). Every adapted Linear then adds its LoRA term to each
example's last ``min(offset, T)`` tokens only, in a call of ``T`` tokens, so during generation with a KV cache
the prompt's tokens before the invocation stay the base model's and each new token gets the adapter.

Example:
    >>> offsets = jlora.alora_offsets(lora_params, input_ids)          # (batch,) int32
    >>> logits = jax.jit(jlora.wrap(model.__call__))(input_ids, params=lora_params, alora_offsets=offsets).logits
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .config import LoraConfig
from .errors import AdapterError
from .tree import adapted_modules

# the offset of an example whose adapter is not an aLoRA (several adapters): every token, in any call
EVERY_TOKEN = 2**30


def invocation_tokens(source: Any) -> list[int]:
    """The invocation token ids of ``source``: a :class:`LoraConfig`, a LoRA tree (``jlora.load``'s result) or the
    ids themselves. Raises when it is not an aLoRA adapter."""
    if isinstance(source, LoraConfig):
        tokens = source.alora_invocation_tokens
    elif isinstance(source, Sequence) and not isinstance(source, str):
        tokens = list(source)
    else:
        by_adapter = _adapter_tokens(source)
        if by_adapter:
            raise AdapterError("alora_offsets: the tree holds several adapters; pass adapter_ids=... (each example's "
                               "adapter index, -1 for the base model)")
        configs = {node.spec.config_json for _, node in adapted_modules(source) if node.spec.activated}
        tokens = json.loads(configs.pop()).get("alora_invocation_tokens") if configs else None
    if not tokens:
        raise AdapterError("alora_offsets: not an aLoRA adapter (its config sets no alora_invocation_tokens)")
    return [int(t) for t in tokens]


def _adapter_tokens(lora_params: Any) -> list[list[int] | None]:
    """A several-adapter tree's adapters, in index order: each one's invocation tokens (None: not an aLoRA)."""
    tokens: dict[str, list[int] | None] = {}
    for _, node in adapted_modules(lora_params):
        for name, own, _ in node.spec.adapters:
            if own is not None and tokens.get(name) is None:
                tokens[name] = json.loads(own.config_json).get("alora_invocation_tokens") if own.activated else None
            tokens.setdefault(name, None)
    return list(tokens.values())


def _last_invocation(tokens: np.ndarray, row: np.ndarray) -> int:
    """How many of ``row``'s tokens there are from the start of the last occurrence of ``tokens`` on (0: none)."""
    if len(tokens) > len(row):
        return 0
    windows = np.lib.stride_tricks.sliding_window_view(row, len(tokens))
    starts = np.flatnonzero(np.all(windows == tokens, axis=-1))
    return int(len(row) - starts[-1]) if starts.size else 0


def alora_offsets(source: Any, input_ids: Any, adapter_ids: Any = None) -> np.ndarray:
    """Each example's aLoRA offset (see module docstring) for ``input_ids`` ``(batch, T)`` (or ``(T,)``), as PEFT
    computes it; ``source`` as in :func:`invocation_tokens`. A tree of several adapters needs each example's
    ``adapter_ids`` (as the wrapped call's): an example whose adapter is not an aLoRA gets its adapter on every
    token, one of the base model (-1) on none.

    Example:
        >>> alora_offsets([7, 8], np.array([[1, 7, 8, 2, 3], [1, 2, 3, 4, 5]]))
        array([4, 0], dtype=int32)
    """
    ids = np.asarray(input_ids)
    ids = ids[None] if ids.ndim == 1 else ids
    if adapter_ids is None:
        tokens = np.asarray(invocation_tokens(source))
        return np.array([_last_invocation(tokens, row) for row in ids], np.int32)
    by_adapter = _adapter_tokens(source)
    chosen = np.asarray(adapter_ids).reshape(-1)
    if not by_adapter or len(chosen) != len(ids) or chosen.max(initial=-1) >= len(by_adapter):
        raise AdapterError(f"alora_offsets: adapter_ids {chosen.tolist()} must index the tree's "
                           f"{len(by_adapter)} adapters, one per example ({len(ids)})")
    out = np.zeros(len(ids), np.int32)
    for i, (row, index) in enumerate(zip(ids, chosen)):
        if index >= 0:
            tokens = by_adapter[index]
            out[i] = EVERY_TOKEN if tokens is None else _last_invocation(np.asarray(tokens), row)
    return out


def token_mask(offsets: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """A 0/1 mask, broadcastable to a LoRA term of ``shape`` ``(batch, T, ...)`` (or ``(batch, out)``: ``T`` = 1),
    that keeps each example's last ``min(offset, T)`` tokens."""
    tokens = shape[1] if len(shape) >= 3 else 1
    offsets = jnp.minimum(jnp.asarray(offsets, jnp.int32), tokens)
    keep = jnp.arange(tokens)[None, :] >= (tokens - offsets)[:, None]  # (batch, T)
    keep = keep if len(shape) >= 3 else keep[:, 0]
    return keep.reshape(keep.shape + (1,) * (len(shape) - keep.ndim))
