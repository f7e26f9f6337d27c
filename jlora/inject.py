"""Place resolved targets and their tensors onto a parameter tree (pure: nothing is mutated).

Example:
    >>> lora_params = inject(params, config, tensors, targets)
"""
from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from .config import LoraConfig
from .layout import HfLayout, torch_to_flax_factors
from .spec import Target, is_trainable_param
from .tree import LORA_A, LORA_B, LORA_BIAS, MAGNITUDE, TOKEN_DELTA, AdaptedModule, ModuleSpec, get_path, set_paths

# PEFT role -> (jlora child key, PEFT key suffix)
_LORA_CHILDREN = {
    "linear": {"lora_A": (LORA_A, "lora_A.weight"), "lora_B": (LORA_B, "lora_B.weight"),
               "magnitude": (MAGNITUDE, "lora_magnitude_vector"), "lora_bias": (LORA_BIAS, "lora_B.bias")},
    "embedding": {"lora_A": (LORA_A, "lora_embedding_A"), "lora_B": (LORA_B, "lora_embedding_B"),
                  "magnitude": (MAGNITUDE, "lora_magnitude_vector")},
}


def inject(params: Mapping, config: LoraConfig, tensors: Mapping[str, np.ndarray], targets: list[Target],
           layout: HfLayout, *, dtype=None) -> dict:
    """A new tree: ``params`` with each target's module dict replaced by an :class:`AdaptedModule`.

    LoRA factors are stored in ``dtype`` (default float32, as PEFT keeps adapters); replacement
    tensors (modules_to_save, biases, trainable-token rows) in the dtype of the leaf they replace.
    """
    adapter_dtype = jnp.dtype(dtype or jnp.float32)
    config_json = config.to_json()
    updates = {}
    for t in targets:
        module = get_path(params, t.placement.path)
        children = dict(module)
        trainable, file_keys = [], []
        kind = t.placement.kind
        if kind != "none":
            a, b = torch_to_flax_factors(tensors[t.tensors.roles["lora_A"]], tensors[t.tensors.roles["lora_B"]])
            converted = {"lora_A": a, "lora_B": b}
            for role in ("magnitude", "lora_bias"):
                if role in t.tensors.roles:
                    converted[role] = tensors[t.tensors.roles[role]]
            for role, value in converted.items():
                child, suffix = _LORA_CHILDREN[kind][role]
                children[child] = jnp.asarray(np.asarray(value, dtype=adapter_dtype))
                trainable.append(child)
                file_keys.append((child, suffix))
        for stored_as, key in t.tensors.params.items():
            mapping = layout.param_mapping(t.placement.path, stored_as.rpartition(".")[2])
            base = module[mapping.flax_key]
            children[mapping.flax_key] = jnp.asarray(mapping.to_flax(np.asarray(tensors[key], dtype=base.dtype)))
            file_keys.append((mapping.flax_key, stored_as))
            if is_trainable_param(config, t.name, stored_as):
                trainable.append(mapping.flax_key)
        if "token_delta" in t.tensors.roles:
            table = module[t.placement.kernel_key]
            children[TOKEN_DELTA] = jnp.asarray(np.asarray(tensors[t.tensors.roles["token_delta"]], dtype=table.dtype))
            trainable.append(TOKEN_DELTA)
            file_keys.append((TOKEN_DELTA, "token_adapter.trainable_tokens_delta"))
        spec = ModuleSpec(
            peft_name=t.name,
            kind=kind,
            scale=float(t.scale),
            kernel_key=t.placement.kernel_key,
            in_ndim=t.placement.in_ndim,
            kernel_perm=t.placement.kernel_perm,
            dora=MAGNITUDE in children,
            dropout=float(config.lora_dropout),
            token_indices=tuple(int(i) for i in t.token_indices),
            trainable=tuple(sorted(set(trainable))),
            file_keys=tuple(sorted(file_keys)),
            config_json=config_json,
        )
        updates[t.placement.path] = AdaptedModule(children, spec)
    return set_paths(params, updates)
