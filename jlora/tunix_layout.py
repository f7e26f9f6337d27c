"""Layout ``"tunix"``: google-tunix's NNX models (Llama 3, Qwen 2, Qwen 3, Gemma 3), as their own safetensors
converters (``tunix/models/<arch>/params*.py``) build them from a Hugging Face checkpoint.

What those converters do to each PyTorch weight, and so what the adapter's factors go through (``lora_B``'s rows
and ``lora_A``'s columns get exactly the same treatment as the weight's rows and columns):

- Llama 3, Qwen 2, Qwen 3 (``layers/{i}/attn/...``, tunix's own ``Einsum`` modules, parameter ``w``):
  ``q_proj`` ``(N*H, D)`` -> transposed and split: ``q_proj/w`` ``(D, N, H)``; ``k_proj`` / ``v_proj`` -> ``(D, K, H)``;
  ``o_proj`` ``(D, N*H)`` -> ``o_proj/w`` ``(N, H, D)``; ``lm_head`` ``(V, D)`` -> ``lm_head/w`` ``(D, V)`` (absent when
  the embedding is tied). No RoPE row permutation (tunix rotates the two halves of each head, as transformers
  does) and no scaling folded into any kernel (the ``1/sqrt(H)`` query scale is applied at run time).
- MLP ``gate_proj`` / ``up_proj`` / ``down_proj``: ``nnx.Linear`` ``kernel`` ``(in, out)``, the weight transposed.
- Gemma 3 (``layers/{i}/attn/...``): ``q_proj`` -> ``q_einsum/w`` ``(N, D, H)``; ``k_proj`` and ``v_proj`` stacked as
  parts 0 and 1 of ``kv_einsum/w`` ``(2, K, D, H)``; when ``N == K`` all three are parts 0, 1, 2 of ``qkv_einsum/w``
  ``(3, N, D, H)``; ``o_proj`` -> ``attn_vec_einsum/w`` ``(N, H, D)``. The head is tied to the embedding (the
  converter drops ``lm_head``). The ``1/sqrt(query_pre_attn_scalar)`` query scale and the embedding's ``sqrt(D)``
  are applied at run time, the norms' ``1 + w`` in both libraries: none is folded into a weight.
- ``embed_tokens`` -> ``embedder/input_embedding`` ``(V, D)`` as is.

Example:
    >>> graphdef, state = nnx.split(tunix_model)
    >>> lora_params = jlora.load(state, "adapter_dir", layout="tunix")
    >>> logits, _ = jax.jit(lambda lp, ids: jlora.nnx_model(graphdef, lp)(ids, pos, None, mask))(lora_params, ids)
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable

import numpy as np

from .errors import AdapterError
from .layout import Layout, ParamMapping, Placement, Rule, w_leaf_to_torch_weight

# the decoder's PEFT prefix: a causal LM (``model.``) or Gemma 3's multimodal classes' text model
_DECODER = r"(?:model\.|model\.language_model\.|language_model\.model\.)layers\.(?P<l>\d+)\."
_ATTN = _DECODER + r"self_attn\."
_MLP = _DECODER + r"mlp\.(?P<proj>gate_proj|up_proj|down_proj)"
_EMBED = r"(?:model\.|model\.language_model\.|language_model\.model\.)embed_tokens"

TUNIX_RULES = (
    # Llama 3 / Qwen 2 / Qwen 3: one Einsum per projection
    Rule(_ATTN + "q_proj", "layers/{l}/attn/q_proj/w", "(n h) d -> d n h"),
    Rule(_ATTN + "k_proj", "layers/{l}/attn/k_proj/w", "(k h) d -> d k h"),
    Rule(_ATTN + "v_proj", "layers/{l}/attn/v_proj/w", "(k h) d -> d k h"),
    Rule(_ATTN + "o_proj", "layers/{l}/attn/o_proj/w", "d (n h) -> n h d"),
    # Gemma 3: heads first, q/k/v fused into qkv_einsum when N == K, else k/v into kv_einsum
    Rule(_ATTN + "q_proj", "layers/{l}/attn/qkv_einsum/w", "(n h) d -> part n d h", part=0),
    Rule(_ATTN + "k_proj", "layers/{l}/attn/qkv_einsum/w", "(n h) d -> part n d h", part=1),
    Rule(_ATTN + "v_proj", "layers/{l}/attn/qkv_einsum/w", "(n h) d -> part n d h", part=2),
    Rule(_ATTN + "q_proj", "layers/{l}/attn/q_einsum/w", "(n h) d -> n d h"),
    Rule(_ATTN + "k_proj", "layers/{l}/attn/kv_einsum/w", "(k h) d -> part k d h", part=0),
    Rule(_ATTN + "v_proj", "layers/{l}/attn/kv_einsum/w", "(k h) d -> part k d h", part=1),
    Rule(_ATTN + "o_proj", "layers/{l}/attn/attn_vec_einsum/w", "d (n h) -> n h d"),
    # every architecture: nnx.Linear MLPs, the untied head, the embedding table
    Rule(_MLP, "layers/{l}/mlp/{proj}/kernel", "o i -> i o"),
    Rule(r"lm_head", "lm_head/w", "v d -> d v"),
    Rule(_EMBED, "embedder/input_embedding", "v d -> v d"),
)

_TABLE = "input_embedding"


def _transposed(a: Any) -> np.ndarray:
    return np.asarray(a).T


class TunixLayout(Layout):
    """tunix's NNX model trees (see the module docstring). Use :meth:`bind` on a tree first.

    Args:
        rules: the rules to try, in order (default :data:`TUNIX_RULES`).
        name: the layout's name in messages.
        params: the tree this layout is bound to (``bind`` sets it).

    Example:
        >>> bound = TunixLayout().bind(nnx.to_pure_dict(nnx.split(model)[1]))   # what layout="tunix" uses
        >>> bound.place("model.layers.0.self_attn.q_proj", "linear").path
        ('layers', 0, 'attn', 'q_proj')
    """

    def __init__(self, rules: Sequence[Rule] = TUNIX_RULES, *, name: str | None = "tunix",
                 params: Mapping | None = None):
        super().__init__(rules, name=name or "tunix", params=params)

    def place(self, name: str, lora_kind: str | None = None,
              fits: Callable[[Placement], bool] | None = None) -> Placement | None:
        """The placement of PEFT module ``name`` (see :meth:`Layout.place`).

        Raises:
            AdapterError: for a LoRA on, or a replacement of, the embedding of a model whose head reads the same
                table (tunix's tied ``Embedder``): PEFT leaves that head on the base table, which one tunix table
                cannot express.
        """
        placement = super().place(name, lora_kind, fits)
        if placement is not None and placement.path == ("embedder",) and self.head_tied_to_embedding():
            raise AdapterError(f"module {name!r}: this tunix model decodes with its input embedding table (tied "
                               "head), while PEFT's adapter changes the lookups only; drop the embedding from the "
                               "adapter or untie the head")
        return placement

    def embedding_key(self, path: tuple) -> str | None:
        """The embedding table's key in tunix's ``Embedder`` (``input_embedding``), or None."""
        return _TABLE if _TABLE in self._module(path) else None

    def param_mapping(self, path: tuple, torch_param: str) -> ParamMapping | None:
        """How PyTorch parameter ``torch_param`` of the module at ``path`` maps: a Linear's ``kernel`` and the
        head's 2-D ``w`` transposed, the embedding table and the norms' 1-D ``w`` / ``scale`` as they are; None
        for anything else (an attention ``Einsum``'s reshaped ``w``, tunix's separate Qwen 2 biases)."""
        module = self._module(path)
        if torch_param != "weight":
            return None
        if "kernel" in module and np.ndim(module["kernel"]) == 2:
            return ParamMapping("kernel", _transposed, _transposed)
        if _TABLE in module:
            return ParamMapping(_TABLE, np.asarray, np.asarray)
        # (jlora.save converts back through Layout.torch_param, which knows these leaves)
        if len(module) == 1 and "w" in module and np.ndim(module["w"]) in (1, 2):
            return ParamMapping("w", w_leaf_to_torch_weight, w_leaf_to_torch_weight)
        if len(module) == 1 and "scale" in module and np.ndim(module["scale"]) == 1:
            return ParamMapping("scale", np.asarray, np.asarray)
        return None

    def head_copying(self, table: Any) -> tuple | None:
        """tunix keeps a tied head as the embedding itself, never as a copy: None."""
        return None
