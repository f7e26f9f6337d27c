"""Regenerate the tiny demo assets under ``examples/assets`` (deterministic, fixed seeds).

Needs torch and peft, and transformers; the tiny Llama also needs transformers' Flax classes (4.x). The examples
that use the assets need neither torch nor peft.

    python examples/make_assets.py                # both
    python examples/make_assets.py tiny-qwen3     # one: tiny-llama or tiny-qwen3

Writes, next to this script:
    assets/tiny-llama/               config.json + flax_model.msgpack (a tiny random LlamaForCausalLM)
    assets/tiny-llama-lora/          adapter_config.json + adapter_model.safetensors (PEFT LoRA, r=8)
    assets/tiny-llama-lora/reference_logits.json
                                     PEFT's and the base model's last-position logits for a fixed prompt
    assets/tiny-qwen3/               config.json + model.safetensors (a tiny random Qwen3ForCausalLM, torch format;
                                     ``examples/quickstart.py`` loads it with google-tunix's safetensors loader)
    assets/tiny-qwen3-lora/          adapter_config.json + adapter_model.safetensors (PEFT LoRA, r=8, every projection)
    assets/tiny-qwen3-lora/reference_logits.json
                                     PEFT's and the base model's logits at every position of a fixed prompt
"""
from __future__ import annotations

import copy
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

ASSETS = Path(__file__).resolve().parent / "assets"
PROMPT = [[1, 17, 42, 99, 5, 23, 64, 7]]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def logits(model, ids: torch.Tensor, last_only: bool = True) -> list:
    """The model's float32 logits for ``ids`` (batch 0): the last position's, or every position's (a list a row)."""
    with torch.no_grad():
        out = model(input_ids=ids).logits[0].float()
    rows = [[float(x) for x in row] for row in out]
    return rows[-1] if last_only else rows


def write_random_adapter(base: torch.nn.Module, lora_config: LoraConfig, folder: Path) -> None:
    """A PEFT adapter on a copy of ``base`` with every trainable tensor random (PEFT's init, then 0.1 * randn, so
    lora_B is not zero), saved to ``folder`` with its target_modules sorted and without PEFT's model-card template."""
    lora = get_peft_model(copy.deepcopy(base), lora_config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in lora.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    shutil.rmtree(folder, ignore_errors=True)
    lora.save_pretrained(folder)
    (folder / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template
    cfg_path = folder / "adapter_config.json"  # PEFT writes target_modules in set order: sort it
    cfg = json.loads(cfg_path.read_text())
    if isinstance(cfg["target_modules"], list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def write_reference(base: torch.nn.Module, adapter_dir: Path, note: str, last_only: bool) -> None:
    """PEFT's logits for PROMPT, from ``PeftModel.from_pretrained`` on a fresh copy of ``base`` (eval mode), and the
    base model's, as ``adapter_dir/reference_logits.json``."""
    ids = torch.tensor(PROMPT)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir).eval()
    reference = {
        "note": note,
        "input_ids": PROMPT,
        "peft_logits": logits(peft_model, ids, last_only),
        "base_logits": logits(base, ids, last_only),
    }
    (adapter_dir / "reference_logits.json").write_text(json.dumps(reference, indent=1) + "\n")


def make_tiny_llama() -> None:
    """assets/tiny-llama (Flax weights, via transformers 4.x's Flax classes) and assets/tiny-llama-lora."""
    from transformers import FlaxLlamaForCausalLM, LlamaConfig, LlamaForCausalLM

    base_dir, adapter_dir = ASSETS / "tiny-llama", ASSETS / "tiny-llama-lora"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    base = LlamaForCausalLM(config).eval()
    shutil.rmtree(base_dir, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:  # the base model, saved as Flax weights only
        base.save_pretrained(tmp, safe_serialization=True)
        FlaxLlamaForCausalLM.from_pretrained(tmp, from_pt=True).save_pretrained(base_dir)
    write_random_adapter(base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False),
                         adapter_dir)
    write_reference(base, adapter_dir, "Produced by examples/make_assets.py: last-position logits of "
                    "PeftModel.from_pretrained(base, tiny-llama-lora) (eval mode) and of the base LlamaForCausalLM, "
                    "in PyTorch float32.", last_only=True)


def make_tiny_qwen3() -> None:
    """assets/tiny-qwen3 (torch-format safetensors + config.json) and assets/tiny-qwen3-lora (every projection).

    rope_theta is 1e6, Qwen3's default, which is also the base tunix's Qwen3 rotates with whatever its config says.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM

    base_dir, adapter_dir = ASSETS / "tiny-qwen3", ASSETS / "tiny-qwen3-lora"
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                         rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
    base = Qwen3ForCausalLM(config).eval()
    shutil.rmtree(base_dir, ignore_errors=True)
    base.save_pretrained(base_dir, safe_serialization=True)
    (base_dir / "generation_config.json").unlink(missing_ok=True)  # transformers' defaults, unused here
    write_random_adapter(base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False),
                         adapter_dir)
    write_reference(base, adapter_dir, "Produced by examples/make_assets.py: logits at every position of "
                    "PeftModel.from_pretrained(base, tiny-qwen3-lora) (eval mode) and of the base Qwen3ForCausalLM, "
                    "in PyTorch float32.", last_only=False)


MAKERS = {"tiny-llama": make_tiny_llama, "tiny-qwen3": make_tiny_qwen3}


def main(names: list[str]) -> None:
    """Write the named assets (all when none is named) and list the files."""
    for name in names or MAKERS:
        MAKERS[name]()
    for f in sorted(ASSETS.rglob("*")):
        if f.is_file():
            print(f"{f.relative_to(ASSETS.parent)}: {f.stat().st_size:,} bytes")


if __name__ == "__main__":
    main(sys.argv[1:])
