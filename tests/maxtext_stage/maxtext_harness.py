"""MaxText's side of the MaxText parity stage: tiny MaxText models, and Hugging Face checkpoints converted into them
with MaxText's own converter functions (``maxtext.checkpoint_conversion.to_maxtext``). Needs maxtext; no torch."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors.numpy import load_file

# MaxText's model names whose converter hooks this stage uses (the sizes come from the checkpoint's config)
MODEL_NAMES = {"llama3.1": "llama3.1-8b", "qwen3": "qwen3-0.6b"}


def maxtext_config(family: str, hf_config: dict, scan_layers: bool) -> Any:
    """A MaxText pyconfig for ``family`` with ``hf_config``'s sizes, float32 on the CPU."""
    import maxtext
    from maxtext.configs import pyconfig

    base = os.path.join(os.path.dirname(maxtext.__file__), "configs", "base.yml")
    argv = ["", base, f"model_name={MODEL_NAMES[family]}", "override_model_config=true",
            f"base_emb_dim={hf_config['hidden_size']}", f"base_num_query_heads={hf_config['num_attention_heads']}",
            f"base_num_kv_heads={hf_config['num_key_value_heads']}", f"head_dim={hf_config['head_dim']}",
            f"base_mlp_dim={hf_config['intermediate_size']}",
            f"base_num_decoder_layers={hf_config['num_hidden_layers']}", f"vocab_size={hf_config['vocab_size']}",
            f"scan_layers={str(scan_layers).lower()}", "dtype=float32", "weight_dtype=float32",
            "matmul_precision=highest", "attention=dot_product", "skip_jax_distributed_system=true",
            "hardware=cpu", "per_device_batch_size=1", "max_target_length=32", "run_name=jlora",
            "enable_checkpointing=false", "base_output_directory=/tmp/jlora-maxtext"]
    return pyconfig.initialize(argv)


def build(config: Any):
    """The MaxText model (linen-wrapped) and its abstract parameter table, as ``to_maxtext.main`` builds them."""
    from maxtext.checkpoint_conversion import to_maxtext
    from maxtext.common.common_types import MODEL_MODE_TRAIN
    from maxtext.layers import quantizations
    from maxtext.models import models
    from maxtext.utils import maxtext_utils

    mesh = jax.sharding.Mesh(maxtext_utils.create_device_mesh(config), config.mesh_axes)
    model = models.transformer_as_linen(config, mesh, quant=quantizations.configure_quantization(config),
                                        model_mode=MODEL_MODE_TRAIN)
    abstract, treedef = to_maxtext.get_maxtext_model_info(config)
    return model, abstract, treedef


def build_nnx(config: Any, params: dict) -> tuple[Any, Any]:
    """MaxText's NNX ``Transformer`` (the module ``transformer_as_linen`` wraps) holding ``params`` (the converted
    tree's ``params`` collection), split: ``(graphdef, state)``, ``state`` an ``nnx.State`` (parameters and rng
    state) whose parameter paths are those of the linen tree."""
    from flax import nnx
    from maxtext.common.common_types import MODEL_MODE_TRAIN
    from maxtext.layers import quantizations
    from maxtext.models import models
    from maxtext.utils import maxtext_utils, maxtext_utils_nnx

    mesh = jax.sharding.Mesh(maxtext_utils.create_device_mesh(config), config.mesh_axes)
    model = models.Transformer(config, mesh, quantizations.configure_quantization(config), model_mode=MODEL_MODE_TRAIN,
                               rngs=maxtext_utils_nnx.create_nnx_rngs(config, MODEL_MODE_TRAIN))
    graphdef, state = nnx.split(model)
    own = {path for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    given = {tuple(str(getattr(k, "key", k)) for k in path)
             for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert {tuple(map(str, path)) for path in own} == given, "the NNX model's parameter paths differ from the linen's"
    nnx.replace_by_pure_dict(state, params)
    return graphdef, state


def convert(config: Any, hf_dir: Path, abstract: dict, treedef) -> dict:
    """The Hugging Face checkpoint in ``hf_dir`` as a MaxText tree, through ``to_maxtext.main``'s steps (eager)."""
    from maxtext.checkpoint_conversion import to_maxtext
    from maxtext.checkpoint_conversion.utils.param_mapping import HOOK_FNS, PARAM_MAPPING
    from maxtext.checkpoint_conversion.utils.utils import validate_and_filter_param_map_keys

    hf_config = json.loads((hf_dir / "config.json").read_text())
    tensors = load_file(str(hf_dir / "model.safetensors"))
    mapping = PARAM_MAPPING[config.model_name](hf_config, config, config.scan_layers)
    hooks = HOOK_FNS[config.model_name](hf_config, config, config.scan_layers, saving_to_hf=False)
    weights = [None] * len(abstract)
    for mt_key in validate_and_filter_param_map_keys(mapping.keys(), abstract.keys()):
        load_fn = to_maxtext._get_hf_loading_function(mapping[mt_key], tensors.__getitem__, hooks.get(mt_key),
                                                      abstract[mt_key][1], config, mt_key)
        index, shape = abstract[mt_key]
        to_maxtext._get_maxtext_weight(load_fn, index, shape, mt_key, weights, "float32", False)
    return jax.tree_util.tree_unflatten(treedef, [np.asarray(w) for w in weights])
