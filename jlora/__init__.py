"""jlora: Hugging Face PEFT LoRA adapters on JAX/Flax parameter trees.

Example:
    >>> import jax, jlora
    >>> lora_params = jlora.load(model.params, "adapter_dir")        # or "user/repo"
    >>> logits = jax.jit(jlora.wrap(model.__call__))(ids, params=lora_params).logits
    >>> merged = jlora.merge(lora_params)                             # plain params, adapter folded in
"""
from .alora import alora_offsets
from .arrow import arrow
from .config import LoraConfig
from .errors import (
    AdapterError,
    CheckpointError,
    ConfigError,
    SourceError,
    TargetMismatchError,
    UnsupportedAdapterError,
    UnwrappedAdapterWarning,
)
from .init import init
from .kasa import kasa_loss
from .layout import HfLayout, Layout, Rule
from .load import load, place
from .merge import merge
from .multi import add_weighted, select
from .nnx_model import nnx_model
from .qwix_bridge import from_qwix, to_qwix
from .replication import replicate_layers
from .save import save, to_peft_tensors
from .train import combine, count_trainable, optimizer, split, trainable_mask
from .tree import AdaptedModule, ModuleSpec
from .wrap import wrap

__all__ = [
    "AdaptedModule", "AdapterError", "CheckpointError", "ConfigError", "HfLayout", "Layout", "LoraConfig", "ModuleSpec",
    "Rule", "SourceError", "TargetMismatchError", "UnsupportedAdapterError", "UnwrappedAdapterWarning", "add_weighted",
    "alora_offsets", "arrow", "combine", "count_trainable", "from_qwix", "init", "kasa_loss", "load", "merge",
    "nnx_model", "optimizer", "place", "replicate_layers", "save", "select", "split", "to_peft_tensors", "to_qwix",
    "trainable_mask", "wrap",
]
__version__ = "0.1.0"
