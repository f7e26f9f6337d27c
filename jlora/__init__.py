"""jlora: Hugging Face PEFT LoRA adapters on JAX/Flax parameter trees.

Example:
    >>> import jax, jlora
    >>> lora_params = jlora.load(model.params, "adapter_dir")        # or "user/repo"
    >>> logits = jax.jit(jlora.wrap(model.__call__))(ids, params=lora_params).logits
    >>> merged = jlora.merge(lora_params)                             # plain params, adapter folded in
"""
from .config import LoraConfig
from .errors import (AdapterError, CheckpointError, ConfigError, SourceError, TargetMismatchError,
                     UnsupportedAdapterError)
from .layout import HfLayout
from .load import load, place
from .merge import merge
from .tree import AdaptedModule, ModuleSpec
from .wrap import wrap

__all__ = [
    "AdaptedModule", "AdapterError", "CheckpointError", "ConfigError", "HfLayout", "LoraConfig", "ModuleSpec",
    "SourceError", "TargetMismatchError", "UnsupportedAdapterError", "load", "merge", "place", "wrap",
]
__version__ = "0.1.0"
