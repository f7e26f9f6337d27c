"""PEFT's side of the EasyDeL parity stage (``tests/easydel_stage``): run in the main env (torch, transformers 4.x,
peft); EasyDeL's venv has transformers 5 and no peft.

For each model family (Llama with Llama 3.1's RoPE, Qwen2 with q/k/v biases, Qwen3 with q/k norms and tied
embeddings) and each adapter case, writes under ``OUT_DIR``: ``<family>/hf`` (a tiny random Hugging Face checkpoint,
safetensors, float32), ``<family>/ids.npy``, ``<family>/base_logits.npy`` (the adapter disabled),
``<family>/<case>/adapter`` (a PEFT adapter whose every tensor is random: PEFT starts lora_B at zero) and
``<family>/<case>/logits.npy`` (PEFT's unmerged forward), and a ``manifest.json``.

Usage: ``python tests/easydel_reference.py OUT_DIR``
"""
from __future__ import annotations

import sys

import torch
from stage_reference import write_references
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32}
FAMILIES = ("llama", "qwen2", "qwen3")


def tiny_model(family: str) -> torch.nn.Module:
    """A tiny random float32 ``family`` model whose norms are random too (so that they matter)."""
    torch.manual_seed(0)
    if family == "llama":
        config = LlamaConfig(**SIZES, head_dim=16, rope_theta=500_000.0, rope_scaling=LLAMA31_ROPE, rms_norm_eps=1e-5,
                             attention_bias=False, tie_word_embeddings=False)
        model = LlamaForCausalLM(config)
    elif family == "qwen2":  # q/k/v with biases, tied embeddings
        model = Qwen2ForCausalLM(Qwen2Config(**SIZES, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                                             tie_word_embeddings=True, use_sliding_window=False))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**SIZES, head_dim=16, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                                             attention_bias=False, tie_word_embeddings=True))
    model = model.float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def main(out_dir: str) -> None:
    """Write every family's files under ``out_dir`` (see :mod:`stage_reference`)."""
    out = write_references(out_dir, tiny_model, FAMILIES, SIZES["vocab_size"])
    print(f"easydel reference: wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1])
