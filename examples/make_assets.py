"""Regenerate the tiny demo assets used by ``examples/quickstart.py`` (deterministic, fixed seeds).

Needs torch, transformers (with Flax) and peft; the quickstart itself needs none of torch/peft.

    python examples/make_assets.py

Writes, next to this script:
    assets/tiny-llama/               config.json + flax_model.msgpack (a tiny random LlamaForCausalLM)
    assets/tiny-llama-lora/          adapter_config.json + adapter_model.safetensors (PEFT LoRA, r=8)
    assets/tiny-llama-lora/reference_logits.json
                                     PEFT's and the base model's last-position logits for a fixed prompt
"""
from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import FlaxLlamaForCausalLM, LlamaConfig, LlamaForCausalLM

ASSETS = Path(__file__).resolve().parent / "assets"
BASE_DIR, ADAPTER_DIR = ASSETS / "tiny-llama", ASSETS / "tiny-llama-lora"
PROMPT = [[1, 17, 42, 99, 5, 23, 64, 7]]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def last_logits(model, ids: torch.Tensor) -> list[float]:
    with torch.no_grad():
        return [float(x) for x in model(input_ids=ids).logits[0, -1].float()]


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    base = LlamaForCausalLM(config).eval()

    # Base model, saved as Flax weights only.
    shutil.rmtree(BASE_DIR, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        base.save_pretrained(tmp, safe_serialization=True)
        FlaxLlamaForCausalLM.from_pretrained(tmp, from_pt=True).save_pretrained(BASE_DIR)

    # LoRA adapter with non-zero B: random init, then 0.1 * randn on every trainable tensor.
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                          init_lora_weights=False))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in lora.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    shutil.rmtree(ADAPTER_DIR, ignore_errors=True)
    lora.save_pretrained(ADAPTER_DIR)
    (ADAPTER_DIR / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template
    cfg_path = ADAPTER_DIR / "adapter_config.json"  # PEFT writes target_modules in set order: sort it
    cfg = json.loads(cfg_path.read_text())
    cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    # Reference logits from PEFT itself, loading the adapter from disk onto a fresh copy of the base.
    ids = torch.tensor(PROMPT)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), ADAPTER_DIR).eval()
    reference = {
        "note": "Produced by examples/make_assets.py: last-position logits of PeftModel.from_pretrained("
                "base, tiny-llama-lora) (eval mode) and of the base LlamaForCausalLM, in PyTorch float32.",
        "input_ids": PROMPT,
        "peft_logits": last_logits(peft_model, ids),
        "base_logits": last_logits(base, ids),
    }
    (ADAPTER_DIR / "reference_logits.json").write_text(json.dumps(reference, indent=1) + "\n")

    for f in sorted(ASSETS.rglob("*")):
        if f.is_file():
            print(f"{f.relative_to(ASSETS.parent)}: {f.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
