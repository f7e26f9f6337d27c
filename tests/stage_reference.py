"""PEFT's side of the library stages (MaxText, EasyDeL), shared by ``tests/maxtext_reference.py`` and
``tests/easydel_reference.py``: run in the main env (torch, transformers 4.x, peft), read by the stages' venvs.

For each family and adapter case, :func:`write_references` writes under ``OUT_DIR``: ``<family>/hf`` (the tiny
random Hugging Face checkpoint, safetensors, float32), ``<family>/ids.npy``, ``<family>/base_logits.npy``,
``<family>/<case>/adapter`` (a PEFT adapter whose every tensor is random: PEFT starts lora_B at zero),
``<family>/<case>/logits.npy`` (PEFT's unmerged forward), optionally ``<family>/<case>/merged_hf`` (PEFT's
``merge_and_unload``), and a ``manifest.json``.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {
    "all_linear": dict(r=4, lora_alpha=8, target_modules=ALL_LINEAR),
    "qv_patterns": dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                        rank_pattern={"layers.1.self_attn.q_proj": 6}, alpha_pattern={"v_proj": 3}),
    "rslora": dict(r=8, lora_alpha=8, use_rslora=True, target_modules=ALL_LINEAR),
}


def write_family(model: Callable[[], torch.nn.Module], vocab_size: int, out: Path, merged: bool) -> None:
    """Write one family's checkpoint, inputs, base logits and every case's adapter and logits under ``out``
    (``model()`` makes the same tiny random model each call)."""
    base = model()
    base.save_pretrained(out / "hf", safe_serialization=True)
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, vocab_size, (2, 12)))
    np.save(out / "ids.npy", ids.numpy().astype(np.int32))
    with torch.no_grad():
        np.save(out / "base_logits.npy", base(ids).logits.float().numpy())
    for i, (case, kwargs) in enumerate(CASES.items()):
        peft_model = get_peft_model(model(), LoraConfig(**kwargs))
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:  # every adapter tensor random (PEFT's lora_B starts at zero)
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            logits = peft_model(ids).logits.float().numpy()
        (out / case).mkdir(parents=True, exist_ok=True)
        peft_model.save_pretrained(out / case / "adapter")
        np.save(out / case / "logits.npy", logits)
        if merged:
            peft_model.merge_and_unload().save_pretrained(out / case / "merged_hf", safe_serialization=True)


def write_references(out_dir: str, tiny_model: Callable[[str], torch.nn.Module], families: Sequence[str],
                     vocab_size: int, *, merged: bool = False) -> Path:
    """Every family's files under ``out_dir`` and a ``manifest.json`` listing families and cases."""
    out = Path(out_dir)
    for family in families:
        write_family(lambda family=family: tiny_model(family), vocab_size, out / family, merged)
    (out / "manifest.json").write_text(json.dumps({"families": list(families), "cases": list(CASES)}))
    return out
