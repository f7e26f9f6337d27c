"""LoRA variants whose forward at inference is plain LoRA (VeLoRA, MonteCLoRA: they change only PEFT's training
pass) against the real peft on a tiny Llama: run as PEFT's eval forward, saved back byte for byte, trained as plain
LoRA with a warning, refused in mixed trees."""
from __future__ import annotations

import copy
import json
import warnings

import jax
import numpy as np
import peft
import pytest
import torch
from peft_twin import (
    assert_saves_back,
    flax_logits_plain,
    flax_logits_wrapped,
    perturb_trainable,
    rel_err,
    saved_pair,
    torch_logits,
)
from safetensors.torch import load_file, save_file
from test_parity_models import llama

import jlora

VARIANTS = {"velora": dict(velora_config=peft.VeloraConfig()),
            "monteclora": dict(monteclora_config=peft.MontecloraConfig())}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return saved_pair(*llama(), tmp_path_factory.mktemp("variants") / "base")


def _adapter(base, folder, variant: str):
    """A saved adapter of ``variant`` whose LoRA factors and variant tensors all hold nonzero values."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                             **VARIANTS[variant])
    pm = peft.get_peft_model(copy.deepcopy(base), config)
    perturb_trainable(pm, seed=1)
    pm.save_pretrained(folder)
    file = folder / "adapter_model.safetensors"
    tensors = load_file(file)
    extras = sorted(k for k in tensors if f"lora_{variant}" in k)
    assert extras
    gen = torch.Generator().manual_seed(2)
    for k in extras:  # (VeLoRA's projection starts as zeros until a training batch sets it)
        tensors[k] = tensors[k] + torch.rand(tensors[k].shape, generator=gen).to(tensors[k].dtype)
    save_file(tensors, str(file), metadata={"format": "pt"})
    return folder, extras


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_runs_as_peft_eval_and_saves_back(models, tmp_path, variant):
    base, flax_model = models
    folder, extras = _adapter(base, tmp_path / "adapter", variant)
    judge = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    assert type(judge.base_model.model.model.layers[0].self_attn.q_proj.lora_variant["default"]).__name__.lower() \
        .startswith(variant)
    ids = np.random.default_rng(0).integers(0, base.config.vocab_size, size=(2, 7)).astype(np.int32)
    want = torch_logits(judge, {"input_ids": ids})
    twin = type("Twin", (), {"flax_model": flax_model, "inputs": {"input_ids": ids}})

    lora_params = jlora.load(flax_model.params, folder)
    assert rel_err(flax_logits_plain(twin, flax_model.params), want) > 1e-3
    assert rel_err(flax_logits_wrapped(twin, lora_params), want) <= 1e-4
    assert rel_err(flax_logits_plain(twin, jlora.merge(lora_params)), want) <= 1e-4
    assert_saves_back(lora_params, folder, tmp_path / "saved")

    with pytest.warns(UserWarning, match="trains it as plain LoRA"):
        mask = jlora.trainable_mask(lora_params)
    flat = {jax.tree_util.keystr(path): m for path, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
    variant_leaves = [p for p in flat if "variant:" in p]
    assert len(variant_leaves) == len(extras) and not any(flat[p] for p in variant_leaves)
    assert sum(flat.values()) == 8  # lora_A, lora_B of q_proj and v_proj in 2 layers

    with pytest.raises(jlora.AdapterError, match="LoRA variant"):
        jlora.load(flax_model.params, {"a": folder, "b": folder})


def test_variant_tensors_need_their_config(models, tmp_path):
    base, flax_model = models
    folder, extras = _adapter(base, tmp_path / "adapter", "velora")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["velora_config"] = None
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(jlora.TargetMismatchError, match="velora_config") as err:
            jlora.load(flax_model.params, folder)
    assert len(err.value.problems) == len(extras)
