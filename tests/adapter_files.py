"""Test helpers: tiny Flax models and adapter folders written directly (no torch needed; transformers
only for tiny_llama)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save, save_file

PREFIX = "base_model.model."


def tiny_llama(seed: int = 0, **overrides):
    import transformers as tf  # imported here so that torch-free tests can use the other helpers

    kwargs = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    cfg = tf.LlamaConfig(**{**kwargs, **overrides})
    return tf.FlaxLlamaForCausalLM(cfg, seed=seed)


def llama_lora_tensors(r: int = 4, hidden: int = 32, kv: int = 16, layers: int = 2, seed: int = 0,
                       modules=("q_proj", "v_proj")) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out_dims = {"q_proj": hidden, "k_proj": kv, "v_proj": kv, "o_proj": hidden}
    tensors = {}
    for i in range(layers):
        for m in modules:
            name = f"{PREFIX}model.layers.{i}.self_attn.{m}"
            tensors[f"{name}.lora_A.weight"] = rng.standard_normal((r, hidden)).astype(np.float32)
            tensors[f"{name}.lora_B.weight"] = rng.standard_normal((out_dims[m], r)).astype(np.float32)
    return tensors


def llama_like_params(hidden: int = 32, kv: int = 16, layers: int = 2) -> dict:
    """A Flax-layout parameter tree shaped like tiny_llama's attention (numpy zeros; no transformers)."""
    attn = lambda: {"q_proj": {"kernel": np.zeros((hidden, hidden), np.float32)},  # noqa: E731
                    "k_proj": {"kernel": np.zeros((hidden, kv), np.float32)},
                    "v_proj": {"kernel": np.zeros((hidden, kv), np.float32)},
                    "o_proj": {"kernel": np.zeros((hidden, hidden), np.float32)}}
    return {"model": {"layers": {str(i): {"self_attn": attn()} for i in range(layers)}}}


def llama_like_checkpoint(hidden: int = 32, kv: int = 16, layers: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """A PyTorch-format state dict shaped like tiny_llama's attention (random values; no torch)."""
    rng = np.random.default_rng(seed)
    out = {"model.embed_tokens.weight": rng.standard_normal((64, hidden)).astype(np.float32)}
    for i in range(layers):
        for m, (o, n) in {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden),
                          "o_proj": (hidden, hidden)}.items():
            out[f"model.layers.{i}.self_attn.{m}.weight"] = rng.standard_normal((o, n)).astype(np.float32)
    return out


def write_adapter(folder: Path, config: dict | str | None = None, tensors: dict | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if config is None:
        config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    if config is not False:
        (folder / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if tensors is None:
        tensors = llama_lora_tensors()
    if tensors is not False:
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def adapter_bytes(config: dict | None = None, tensors: dict | None = None) -> dict[str, bytes]:
    """``{file name: content}`` of an adapter (for serving from a fake Hub)."""
    config = config or {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    tensors = llama_lora_tensors() if tensors is None else tensors
    return {"adapter_config.json": json.dumps(config).encode(),
            "adapter_model.safetensors": save(tensors, metadata={"format": "pt"})}
