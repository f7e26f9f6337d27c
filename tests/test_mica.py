"""MiCA adapters (PEFT's ``init_lora_weights="mica"``): plain LoRA at inference, lora_B frozen in training
(only lora_A trains), against the real peft on a tiny Llama with LoRA on linear layers and the embedding."""
from __future__ import annotations

import copy

import jax
import numpy as np
import peft
import pytest
import transformers as tf
from peft_twin import (
    flax_logits_plain,
    flax_logits_wrapped,
    peft_loads_cleanly,
    perturb_trainable,
    rel_err,
    saved_pair,
    torch_logits,
)
from test_parity_models import llama

import jlora

TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return saved_pair(*llama(), tmp_path_factory.mktemp("mica") / "base")


def test_mica_adapter_runs_and_trains_only_lora_a(models, tmp_path):
    base, flax_model = models
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                  init_lora_weights="mica"))
    peft_trainable = sorted(n for n, p in pm.named_parameters() if p.requires_grad)
    assert peft_trainable and all("lora_A" in n or "lora_embedding_A" in n for n in peft_trainable)
    perturb_trainable(pm, seed=1)  # "trained": lora_A moves, the frozen SVD-made lora_B stays
    pm.save_pretrained(tmp_path / "adapter")
    judge = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    ids = np.random.default_rng(0).integers(0, base.config.vocab_size, size=(2, 7)).astype(np.int32)
    want = torch_logits(judge, {"input_ids": ids})

    lora_params = jlora.load(flax_model.params, tmp_path / "adapter")
    twin = type("Twin", (), {"flax_model": flax_model, "inputs": {"input_ids": ids}})
    assert rel_err(flax_logits_plain(twin, flax_model.params), want) > 1e-3
    assert rel_err(flax_logits_wrapped(twin, lora_params), want) <= 1e-4
    assert rel_err(flax_logits_plain(twin, jlora.merge(lora_params)), want) <= 1e-4

    mask = jlora.trainable_mask(lora_params)
    marked = {"/".join(str(getattr(k, "key", k)) for k in path): m
              for path, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert sorted(p.rsplit("/", 1)[1] for p, m in marked.items() if m) == ["lora_A"] * len(peft_trainable)
    assert jlora.count_trainable(lora_params) == sum(p.numel() for n, p in pm.named_parameters() if p.requires_grad)
    assert_saved = jlora.save(lora_params, tmp_path / "saved")
    again = peft_loads_cleanly(base, assert_saved)
    assert rel_err(torch_logits(again, {"input_ids": ids}), want) <= 1e-6


def test_mica_init_matches_peft_up_to_singular_vector_signs(models, tmp_path):
    """jlora.init's MiCA: lora_A zero, lora_B PEFT's minor left singular vectors (each column up to its sign, which
    LAPACK builds choose freely); the file loads in PEFT as a MiCA adapter that trains lora_A alone."""
    base, flax_model = models
    config = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="mica")
    fresh = jlora.init(flax_model.params, config, key=jax.random.key(0))
    ours = jlora.to_peft_tensors(fresh)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                  init_lora_weights="mica"))
    theirs = {k.replace(".default", ""): v.detach().numpy() for k, v in pm.state_dict().items()
              if "lora_" in k}
    assert sorted(ours) == sorted(theirs)
    for key, want in theirs.items():
        got = ours[key]
        if "_A" in key:
            assert not np.any(got) and not np.any(want), key
        else:  # columns (r) of B: equal up to sign
            overlap = np.abs(got.T @ want)
            np.testing.assert_allclose(overlap, np.eye(4), atol=1e-4, err_msg=key)
    again = peft_loads_cleanly(base, jlora.save(fresh, tmp_path / "fresh"))  # (get_peft_model with the saved config)
    trains = [n for n, p in again.named_parameters() if p.requires_grad]
    assert len(trains) == 7 and all("lora_A" in n or "lora_embedding_A" in n for n in trains)


def test_mica_refusals():
    with pytest.raises(jlora.ConfigError, match="mica' with use_dora"):
        jlora.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="mica", use_dora=True)
    cfg = tf.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=8, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=8)
    params = tf.FlaxViTModel(cfg).params
    with pytest.raises(jlora.AdapterError, match="PEFT has no MiCA for convolutions") as err:
        jlora.init(params, jlora.LoraConfig(r=2, target_modules=["projection", "query"], init_lora_weights="mica"),
                   key=jax.random.key(0))
    assert len(err.value.problems) == 1
