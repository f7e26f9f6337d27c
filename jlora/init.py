"""``init(params, config, key=...)``: a fresh adapter on a Flax tree, targeted and initialised as PEFT.

Targets are chosen by PEFT's matching rules over the tree's modules (named the PyTorch way, e.g.
``model.layers.0.self_attn.q_proj``). Init: ``init_lora_weights=True`` -> A kaiming-uniform like
``nn.Linear``, B zero (embeddings: A zero, B normal); ``"gaussian"`` -> A ~ N(0, 1/r); ``False`` ->
random A and B (testing). DoRA magnitudes start at the weight norm; trainable-token rows and
modules_to_save copies start at the base values.

Example:
    >>> cfg = jlora.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    >>> lora_params = jlora.init(model.params, cfg, key=jax.random.key(0))
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .config import LoraConfig
from .errors import AdapterError, ConfigError
from .layout import get_layout, kernel_to_torch_weight
from .load import place
from .spec import PREFIX
from .targeting import is_module_to_save, is_targeted, module_rank, module_scale
from .tree import iter_modules


def _module_names(params: Mapping) -> dict[str, Mapping]:
    return {".".join(map(str, path)): module for path, module in iter_modules(params) if path}


def _all_linear(names: dict[str, Mapping]) -> list[str]:
    """PEFT's "all-linear": every 2-D kernel (Linear / Conv1D) except the output head."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in names.items()
                   if getattr(m.get("kernel"), "ndim", 0) == 2 and n.rsplit(".", 1)[-1] != "lm_head"})


def _kaiming_uniform(key, shape, fan_in):
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _factors(key, kind: str, mode, r: int, fan_in: int, a_shape: tuple, b_shape: tuple):
    """PEFT-shaped (torch layout) A and B for one module."""
    ka, kb = jax.random.split(key)
    if kind == "embedding":
        if mode is False:
            return jax.random.normal(ka, a_shape), jax.random.normal(kb, b_shape)
        return jnp.zeros(a_shape), jax.random.normal(kb, b_shape)
    if mode is False:
        return _kaiming_uniform(ka, a_shape, fan_in), _kaiming_uniform(kb, b_shape, r)
    a = jax.random.normal(ka, a_shape) / r if mode == "gaussian" else _kaiming_uniform(ka, a_shape, fan_in)
    return a, jnp.zeros(b_shape)


def init(params: Mapping, config: LoraConfig, *, key: jax.Array, layout: Any = "hf", dtype: Any = None) -> dict:
    """A fresh adapter described by ``config`` on ``params`` (see module docstring).

    Example:
        >>> lp = jlora.init(params, jlora.LoraConfig(r=4, target_modules="all-linear"), key=jax.random.key(0))
    """
    if not isinstance(config, LoraConfig):
        raise ConfigError(f"config must be a jlora.LoraConfig, found {type(config).__name__}")
    if config.init_lora_weights not in (True, False, "gaussian"):
        raise AdapterError(f"init_lora_weights={config.init_lora_weights!r} is not implemented by jlora.init "
                           "(supported: true, false, 'gaussian')")
    names = _module_names(params)
    if config.target_modules == "all-linear":
        config = LoraConfig(**{**config.to_dict(), "target_modules": _all_linear(names)})
    bound = get_layout(layout).bind(params, list(names))
    tensors: dict[str, np.ndarray] = {}
    problems = []
    keys = iter(jax.random.split(key, max(len(names), 1)))
    for name, module in names.items():
        k = next(keys)
        if is_targeted(config, name):
            kind = "embedding" if "embedding" in module else "linear"
            placement = bound.place(name, kind)
            if placement is None:
                problems.append(f"{name}: targeted, but its module has no kernel or embedding (PEFT supports "
                                f"Linear, Conv1D, Embedding and Conv layers); parameters: {sorted(map(str, module))}")
                continue
            weight = np.asarray(module[placement.kernel_key])
            r = module_rank(config, name)
            if kind == "embedding":
                torch_w = weight  # (V, D)
                a_shape, b_shape, fan_in = (r, weight.shape[0]), (weight.shape[1], r), weight.shape[0]
                prefix = "lora_embedding_"
                suffix = ""
            else:
                torch_w = kernel_to_torch_weight(np.transpose(weight, np.argsort(placement.kernel_perm)))
                a_shape = (r, *torch_w.shape[1:])
                b_shape = (torch_w.shape[0], r, *([1] * (torch_w.ndim - 2)))
                fan_in = int(np.prod(torch_w.shape[1:]))
                prefix, suffix = "lora_", ".weight"
            a, b = _factors(k, kind, config.init_lora_weights, r, fan_in, a_shape, b_shape)
            tensors[f"{PREFIX}{name}.{prefix}A{suffix}"] = np.asarray(a, np.float32)
            tensors[f"{PREFIX}{name}.{prefix}B{suffix}"] = np.asarray(b, np.float32)
            if config.use_dora:
                w = torch_w.astype(np.float32)
                if kind == "embedding":
                    w = w.T  # PEFT: norm of W.T + s * B @ A over the vocabulary
                delta = module_scale(config, name) * (np.asarray(b).reshape(b_shape[0], r) @ np.asarray(a).reshape(r, -1))
                adapted = w.reshape(w.shape[0], -1) + delta
                tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = np.linalg.norm(adapted, axis=1).astype(np.float32)
            if config.lora_bias:
                if "bias" not in module:
                    problems.append(f"{name}: lora_bias=True needs a bias, the module has none")
                else:
                    tensors[f"{PREFIX}{name}.lora_B.bias"] = np.zeros(b_shape[0], np.float32)
        trained_bias = config.bias == "all" or (config.bias == "lora_only" and is_targeted(config, name))
        if trained_bias and "bias" in module:
            stored = "base_layer.bias" if is_targeted(config, name) else "bias"
            tensors[f"{PREFIX}{name}.{stored}"] = np.asarray(module["bias"])
        if is_module_to_save(config, name):
            for param, leaf in module.items():
                if hasattr(leaf, "shape"):
                    torch_name, to_torch = bound.torch_param(param)
                    tensors[f"{PREFIX}{name}.{torch_name}"] = to_torch(leaf)
    tti = config.trainable_token_indices
    if tti is not None:
        wanted = tti if isinstance(tti, dict) else {"embed_tokens": tti}
        for target, indices in wanted.items():
            found = [n for n, m in names.items() if (n == target or n.endswith("." + target)) and "embedding" in m]
            if not found:
                problems.append(f"trainable_token_indices: no embedding module named {target!r}")
            for n in found:
                table = np.asarray(names[n]["embedding"])
                tensors[f"{PREFIX}{n}.token_adapter.trainable_tokens_delta"] = table[list(indices)]
    if problems:
        raise AdapterError("cannot initialise this adapter on this tree", problems)
    if not tensors:
        raise AdapterError(f"target_modules {config.target_modules!r} matched no module of the tree; module "
                           f"names look like {list(names)[:5]}")
    return place(params, config, tensors, layout=layout, dtype=dtype, source="jlora.init")
