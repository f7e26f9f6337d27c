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

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .config import LoraConfig
from .errors import AdapterError, ConfigError, UnsupportedAdapterError
from .layout_registry import get_layout
from .load import place
from .spec import PREFIX
from .targeting import is_module_to_save, is_targeted, module_rank, module_scale
from .tree import as_param_tree, iter_modules


def _module_names(params: Mapping) -> dict[str, Mapping]:
    """PyTorch-style module names of the tree's modules. A Flax variables dict (``{"params": ..., "batch_stats":
    ...}``, as a model with batch norm holds) names the modules of its ``params`` collection, without that prefix."""
    if isinstance(params.get("params"), Mapping):
        params = params["params"]
    return {".".join(map(str, path)): module for path, module in iter_modules(params) if path}


# task types whose PEFT model class adds the classification head to modules_to_save
_HEADS_TO_SAVE = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score")}


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


def _block_factors(key, blocks: tuple[int, int], a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """BD-LoRA (``blocks``: lora_A's and lora_B's, see ``LoraConfig.block_diagonal``): PEFT replaces the
    block-diagonal factor with its stacked diagonal blocks, A kaiming-uniform (gain sqrt(2)), B zero."""
    a_blocks, b_blocks = blocks
    if a_blocks > 1:
        shape = (a.shape[0], a.shape[1] // a_blocks)
        bound = math.sqrt(6.0 / shape[1])
        a = jax.random.uniform(jax.random.fold_in(key, 1), shape, jnp.float32, -bound, bound)
    if b_blocks > 1:
        b = jnp.zeros((b.shape[0], b.shape[1] // b_blocks))
    return a, b


def _canonical_weight(placement, weight: np.ndarray) -> np.ndarray:
    """The float32 weight of the PEFT module at ``placement``, in canonical (inputs..., outputs...) order (its layer
    of a stacked kernel, its part of a fused one)."""
    w = np.asarray(weight, np.float32)
    if placement.stacked:
        w = np.take(w, placement.layer, axis=placement.layer_axis)
    w = w.transpose(np.argsort(placement.kernel_perm))
    if placement.fused:
        w = np.take(w, placement.part, axis=placement.part_axis)
    return w


def _mica_factors(placement, weight: np.ndarray, r: int, a_shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's MiCA init (torch layout): lora_B the ``r`` left singular vectors of the (out, in) weight with the
    smallest singular values (each up to its sign, which SVD implementations choose freely), lora_A zero."""
    w = _canonical_weight(placement, weight)
    n_in = int(np.prod(w.shape[:placement.in_ndim]))
    u, _, _ = np.linalg.svd(w.reshape(n_in, -1).T, full_matrices=False)
    b = placement.b_to_torch(np.ascontiguousarray(u[:, -r:].T).reshape(r, *w.shape[placement.in_ndim:]))
    return np.zeros(a_shape, np.float32), b


def _magnitude(placement, weight: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """DoRA's initial magnitude: ``||W + s * B @ A||`` over the input axes, in PEFT's shape (see
    ``Placement.magnitude_shape``)."""
    w = _canonical_weight(placement, weight)
    delta = scale * np.tensordot(placement.a_to_canonical(a), placement.b_to_canonical(b), axes=1)
    norm = np.linalg.norm((w + delta).reshape(int(np.prod(w.shape[:placement.in_ndim])), -1), axis=0)
    return placement.magnitude_to_torch(norm.reshape(w.shape[placement.in_ndim:])).astype(np.float32)


def init(params: Mapping, config: LoraConfig, *, key: jax.Array, layout: Any = "auto", dtype: Any = None,
         module_names: Sequence[str] | None = None) -> dict:
    """A fresh adapter described by ``config`` on ``params`` (see module docstring).

    ``module_names``: the PyTorch module names to consider for targeting. Default: the tree's own
    module paths (right for the "hf" layout); custom layouts pass the names of the model they mirror.

    Example:
        >>> lp = jlora.init(params, jlora.LoraConfig(r=4, target_modules="all-linear"), key=jax.random.key(0))
    """
    if not isinstance(config, LoraConfig):
        raise ConfigError(f"config must be a jlora.LoraConfig, found {type(config).__name__}")
    if config.init_lora_weights not in (True, False, "gaussian", "mica"):
        raise AdapterError(f"init_lora_weights={config.init_lora_weights!r} is not implemented by jlora.init "
                           "(supported: true, false, 'gaussian', 'mica')")
    if config.target_parameters:
        raise UnsupportedAdapterError("jlora.init: target_parameters (LoRA on parameters) is not supported: the "
                                      "file's key names depend on the order the PyTorch module registers its "
                                      "parameters. Start from an adapter made by PEFT (jlora.load)")
    params = as_param_tree(params)
    tree_names = _module_names(params)
    names = list(module_names) if module_names is not None else list(tree_names)
    heads = [h for h in _HEADS_TO_SAVE.get(config.task_type, ()) if h not in (config.modules_to_save or [])]
    if heads:  # PEFT's PeftModelForSequenceClassification / ...TokenClassification train their head
        config = dataclasses.replace(config, modules_to_save=list(config.modules_to_save or []) + heads)
    if isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear":
        config = dataclasses.replace(config, target_modules=_all_linear(tree_names))
    bound = get_layout(layout).bind(params, names)
    tensors: dict[str, np.ndarray] = {}
    problems = []
    keys = iter(jax.random.split(key, max(len(names), 1)))
    for name in names:
        k = next(keys)
        path = bound._module_path(name)
        module = bound._module(path) if path is not None else {}
        if is_targeted(config, name):
            kind = "embedding" if "embedding" in module else "linear"
            placement = bound.place(name, kind)
            if placement is None:
                problems.append(f"{name}: targeted, but no layout rule places it on a kernel or embedding "
                                f"(PEFT supports Linear, Conv1D, Embedding and Conv layers)")
                continue
            r = module_rank(config, name)
            out_total = int(np.prod(placement.out_sizes))
            a_shape, b_shape = (r, *placement.a_tail), (out_total, r, *placement.b_tail)
            weight = bound._module(placement.path)[placement.kernel_key]
            if config.init_lora_weights == "mica":
                if placement.b_tail or r > min(int(np.prod(placement.a_tail)), out_total):
                    problems.append(f"{name}: MiCA needs a Linear or Embedding (PEFT has no MiCA for convolutions) "
                                    f"and r <= min(in, out) ({list(placement.a_tail)} -> {out_total}, r={r})")
                    continue
                a, b = _mica_factors(placement, weight, r, a_shape)
            else:
                a, b = _factors(k, kind, config.init_lora_weights, r, int(np.prod(placement.a_tail)), a_shape, b_shape)
                a, b = _block_factors(k, config.block_diagonal(name), a, b)
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            prefix, suffix = ("lora_embedding_", "") if kind == "embedding" else ("lora_", ".weight")
            tensors[f"{PREFIX}{name}.{prefix}A{suffix}"] = a
            tensors[f"{PREFIX}{name}.{prefix}B{suffix}"] = b
            if config.use_dora:
                tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = _magnitude(
                    placement, weight, a, b, module_scale(config, name))
            if config.kasa_config:  # KaSA: its singular values start normal (B is zero, so the update is too)
                tensors[f"{PREFIX}{name}.lora_diag"] = np.asarray(jax.random.normal(jax.random.fold_in(k, 2), (r,)))
            if config.lora_bias:  # (on a module without a bias too, as PEFT: it then runs unmerged only)
                tensors[f"{PREFIX}{name}.lora_B.bias"] = np.zeros(out_total, np.float32)
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
            found = [n for n, m in tree_names.items() if (n == target or n.endswith("." + target)) and "embedding" in m]
            if not found:
                problems.append(f"trainable_token_indices: no embedding module named {target!r}")
            for n in found:
                table = np.asarray(tree_names[n]["embedding"])
                tensors[f"{PREFIX}{n}.token_adapter.trainable_tokens_delta"] = table[list(indices)]
    if problems:
        raise AdapterError("cannot initialise this adapter on this tree", problems)
    if not tensors:
        raise AdapterError(f"target_modules {config.target_modules!r} matched no module; module names "
                           f"look like {names[:5]}")
    return place(params, config, tensors, layout=layout, dtype=dtype, source="jlora.init")
