"""Training is which leaves the optimizer may move: masks, an optax partition, and split/combine.

Example:
    >>> tx = jlora.optimizer(optax.adamw(1e-3), lora_params)      # frozen leaves: set_to_zero, no state
    >>> trainable, frozen = jlora.split(lora_params)
    >>> grads = jax.grad(loss)(trainable, frozen, batch)          # gradients only for trainable leaves
    >>> lora_params = jlora.combine(optax.apply_updates(trainable, updates), frozen)
"""
from __future__ import annotations

import warnings
from typing import Any

import jax
import optax

from .spec import variant_of
from .tree import VARIANT_EXTRA, AdaptedModule, adapted_modules, map_adapted


def _module_mask(node: AdaptedModule) -> AdaptedModule:
    return AdaptedModule({k: None if v is None else k in node.spec.trainable for k, v in node.items()}, node.spec)


def _warn_variants(lora_params: Any) -> None:
    """A LoRA variant that changes only PEFT's training pass is trained by jlora as plain LoRA: say so."""
    found = sorted({variant_of(k[len(VARIANT_EXTRA):])[1] for _, node in adapted_modules(lora_params) for k in node
                    if k.startswith(VARIANT_EXTRA)})
    if found:
        warnings.warn(f"this adapter is a {'/'.join(found)} LoRA: jlora trains it as plain LoRA (exact gradients "
                      "of lora_A and lora_B; PEFT's training pass differs), its variant tensors stay as loaded "
                      "and save writes them back", stacklevel=3)


def trainable_mask(lora_params: Any) -> Any:
    """A bool tree shaped like ``lora_params``: True exactly on the leaves PEFT would train
    (lora_A, lora_B, DoRA magnitude, lora_bias, modules_to_save copies, trained biases, token rows).

    Example:
        >>> mask = jlora.trainable_mask(lora_params)
    """
    _warn_variants(lora_params)
    marked = map_adapted(_module_mask, lora_params)
    return jax.tree_util.tree_map(lambda x: x if isinstance(x, bool) else False, marked)


def optimizer(tx: optax.GradientTransformation, lora_params: Any) -> optax.GradientTransformation:
    """``tx`` on the trainable leaves, ``optax.set_to_zero()`` (and no state) on all others.

    Example:
        >>> tx = jlora.optimizer(optax.adamw(1e-4), lora_params)
        >>> opt_state = tx.init(lora_params)
    """
    labels = jax.tree_util.tree_map(lambda t: "train" if t else "freeze", trainable_mask(lora_params))
    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


def split(lora_params: Any) -> tuple[Any, Any]:
    """``(trainable, frozen)``: two trees shaped like ``lora_params`` with ``None`` where the other
    holds the leaf. Differentiate only ``trainable``; :func:`combine` puts them back together.

    Example:
        >>> trainable, frozen = jlora.split(lora_params)
    """
    mask = trainable_mask(lora_params)
    trainable = jax.tree_util.tree_map(lambda x, m: x if m else None, lora_params, mask)
    frozen = jax.tree_util.tree_map(lambda x, m: None if m else x, lora_params, mask)
    return trainable, frozen


def combine(trainable: Any, frozen: Any) -> Any:
    """Inverse of :func:`split`. The module metadata (config text included) is taken from ``frozen``, so
    a ``trainable`` tree returned by a jitted step compiled for another adapter cannot bring in stale text.

    Example:
        >>> lora_params = jlora.combine(trainable, frozen)
    """
    is_none = lambda x: x is None  # noqa: E731
    return jax.tree_util.tree_map(lambda f, t: f if t is None else t, frozen, trainable, is_leaf=is_none)


def count_trainable(lora_params: Any) -> int:
    """Number of trainable scalars (the leaves :func:`trainable_mask` lets move).

    Example:
        >>> jlora.count_trainable(lora_params)  # r * (in + out) per module: r=4 on q (32->32), v (32->16), 2 layers
        896
    """
    mask = trainable_mask(lora_params)
    return sum(int(x.size) for x, m in zip(jax.tree_util.tree_leaves(lora_params), jax.tree_util.tree_leaves(mask))
               if m)

