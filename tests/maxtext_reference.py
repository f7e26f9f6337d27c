"""PEFT's side of the MaxText parity stage (``tests/maxtext_stage``): run in the main env (torch, transformers, peft).

For each model family MaxText converts (Llama 3.1, Qwen3) and each adapter case, writes under ``OUT_DIR``:
``<family>/hf`` (a tiny random Hugging Face checkpoint, safetensors), ``<family>/<case>/adapter`` (a PEFT adapter
whose every tensor is random: PEFT starts lora_B at zero), ``<family>/ids.npy``, ``<family>/base_logits.npy``
(the adapter disabled), ``<family>/<case>/logits.npy`` (PEFT's unmerged forward), all float32, and
``<family>/<case>/merged_hf`` (PEFT's merge_and_unload, for MaxText's converter to give its own adapted model).

Usage: ``python tests/maxtext_reference.py OUT_DIR``
"""
from __future__ import annotations

import sys

import torch
from stage_reference import write_references
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=64, attention_bias=False)
# the RoPE of MaxText's llama3.1 models (LLaMARotaryEmbedding with use_scale): Llama 3.1's
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def tiny_model(family: str) -> torch.nn.Module:
    """A tiny random float32 model of ``family`` ("llama3.1" or "qwen3"), as MaxText's configs of it expect."""
    torch.manual_seed(0)
    if family == "llama3.1":
        config = LlamaConfig(**{**SIZES, "max_position_embeddings": 131072}, rope_theta=500_000.0,
                             rope_scaling=LLAMA31_ROPE, rms_norm_eps=1e-5, tie_word_embeddings=False)
        return LlamaForCausalLM(config).float().eval()
    config = Qwen3Config(**SIZES, rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
    model = Qwen3ForCausalLM(config).float().eval()
    with torch.no_grad():  # the norms start at one: make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def main(out_dir: str) -> None:
    """Write every family's files under ``out_dir`` (see :mod:`stage_reference`)."""
    out = write_references(out_dir, tiny_model, ("llama3.1", "qwen3"), SIZES["vocab_size"], merged=True)
    print(f"maxtext reference: wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1])
