"""PEFT's side of the MaxText parity stage (``tests/maxtext_stage``): run in the main env (torch, transformers, peft).

For each model family MaxText converts (Llama 3.1, Qwen3) and each adapter case, writes under ``OUT_DIR``:
``<family>/hf`` (a tiny random Hugging Face checkpoint, safetensors), ``<family>/<case>/adapter`` (a PEFT adapter
whose every tensor is random: PEFT starts lora_B at zero), ``<family>/ids.npy``, ``<family>/base_logits.npy``
(the adapter disabled), ``<family>/<case>/logits.npy`` (PEFT's unmerged forward), all float32, and
``<family>/<case>/merged_hf`` (PEFT's merge_and_unload, for MaxText's converter to give its own adapted model).

Usage: ``python tests/maxtext_reference.py OUT_DIR``
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=64, attention_bias=False)
# the RoPE of MaxText's llama3.1 models (LLaMARotaryEmbedding with use_scale): Llama 3.1's
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
CASES = {
    "all_linear": dict(r=4, lora_alpha=8, target_modules=ALL_LINEAR),
    "qv_patterns": dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                        rank_pattern={"layers.1.self_attn.q_proj": 6}, alpha_pattern={"v_proj": 3}),
    "rslora": dict(r=8, lora_alpha=8, use_rslora=True, target_modules=ALL_LINEAR),
}


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


def write_family(family: str, out: Path) -> None:
    """Write ``family``'s checkpoint, inputs, base logits and every case's adapter and logits under ``out``."""
    model = tiny_model(family)
    model.save_pretrained(out / "hf", safe_serialization=True)
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, SIZES["vocab_size"], (2, 12)))
    np.save(out / "ids.npy", ids.numpy().astype(np.int32))
    with torch.no_grad():
        np.save(out / "base_logits.npy", model(ids).logits.float().numpy())
    for i, (case, kwargs) in enumerate(CASES.items()):
        peft_model = get_peft_model(tiny_model(family), LoraConfig(**kwargs))
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:  # every adapter tensor random (PEFT's lora_B starts at zero)
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            logits = peft_model(ids).logits.float().numpy()
        (out / case).mkdir(parents=True, exist_ok=True)
        peft_model.save_pretrained(out / case / "adapter")
        np.save(out / case / "logits.npy", logits)
        peft_model.merge_and_unload().save_pretrained(out / case / "merged_hf", safe_serialization=True)


def main(out_dir: str) -> None:
    """Write every family's files under ``out_dir`` and a ``manifest.json`` listing them."""
    out = Path(out_dir)
    for family in ("llama3.1", "qwen3"):
        write_family(family, out / family)
    (out / "manifest.json").write_text(json.dumps({"families": ["llama3.1", "qwen3"], "cases": list(CASES)}))
    print(f"maxtext reference: wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1])
