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


def invocation_tokens(source: Any) -> list[int]:
    """The invocation token ids of ``source``: a :class:`LoraConfig`, a LoRA tree (``jlora.load``'s result) or the
    ids themselves. Raises when it is not an aLoRA adapter."""
    if isinstance(source, LoraConfig):
        tokens = source.alora_invocation_tokens
    elif isinstance(source, Sequence) and not isinstance(source, str):
        tokens = list(source)
    else:
        configs = {node.spec.config_json for _, node in adapted_modules(source) if node.spec.activated}
        if len(configs) > 1:
            raise AdapterError("alora_offsets: the tree holds several aLoRA adapters; pass one's config")
        tokens = json.loads(configs.pop()).get("alora_invocation_tokens") if configs else None
    if not tokens:
        raise AdapterError("alora_offsets: not an aLoRA adapter (its config sets no alora_invocation_tokens)")
    return [int(t) for t in tokens]


def alora_offsets(source: Any, input_ids: Any) -> np.ndarray:
    """Each example's aLoRA offset (see module docstring) for ``input_ids`` ``(batch, T)`` (or ``(T,)``), as PEFT
    computes it; ``source`` as in :func:`invocation_tokens`.

    Example:
        >>> alora_offsets([7, 8], np.array([[1, 7, 8, 2, 3], [1, 2, 3, 4, 5]]))
        array([4, 0], dtype=int32)
    """
    tokens = np.asarray(invocation_tokens(source))
    ids = np.asarray(input_ids)
    ids = ids[None] if ids.ndim == 1 else ids
    n, length = len(tokens), ids.shape[1]
    out = np.zeros(ids.shape[0], np.int32)
    if n > length:
        return out
    windows = np.lib.stride_tricks.sliding_window_view(ids, n, axis=1)  # (batch, T - n + 1, n)
    for row, hits in enumerate(np.all(windows == tokens, axis=-1)):
        starts = np.flatnonzero(hits)
        if starts.size:
            out[row] = length - starts[-1]
    return out


def token_mask(offsets: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """A 0/1 mask, broadcastable to a LoRA term of ``shape`` ``(batch, T, ...)`` (or ``(batch, out)``: ``T`` = 1),
    that keeps each example's last ``min(offset, T)`` tokens."""
    tokens = shape[1] if len(shape) >= 3 else 1
    offsets = jnp.minimum(jnp.asarray(offsets, jnp.int32), tokens)
    keep = jnp.arange(tokens)[None, :] >= (tokens - offsets)[:, None]  # (batch, T)
    keep = keep if len(shape) >= 3 else keep[:, 0]
    return keep.reshape(keep.shape + (1,) * (len(shape) - keep.ndim))
