"""Parity with PEFT for every adapter feature jlora supports (float32, tiny models built here)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
from peft_twin import (
    assert_saves_back,
    build_twin,
    flax_logits_plain,
    flax_logits_wrapped,
    peft_loads_cleanly,
    rel_err,
    torch_logits,
)
from safetensors.torch import load_file, save_file
from test_parity_models import gemma, gpt2, llama, opt

import jlora

TOL = 1e-4

FEATURES = {
    "rslora": (llama, dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj"])),
    "rank_and_alpha_patterns": (llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 6},
                                            alpha_pattern={"v_proj": 3, r"layers\.0\.mlp\.down_proj": 20})),
    "regex_targets": (llama, dict(r=4, lora_alpha=8,
                                  target_modules=r".*\.layers\.1\.(self_attn\.k_proj|mlp\.up_proj)")),
    "exclude_modules": (llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                    exclude_modules=["layers.0.self_attn.q_proj"])),
    "layers_to_transform": (llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"],
                                        layers_to_transform=[1], layers_pattern="layers")),
    "all_linear": (llama, dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "bias_all": (gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn"], bias="all", fan_in_fan_out=True)),
    "bias_lora_only": (opt, dict(r=4, lora_alpha=8, target_modules=["q_proj", "fc1"], bias="lora_only")),
    "lora_bias": (opt, dict(r=4, lora_alpha=8, target_modules=["v_proj", "fc2"], lora_bias=True)),
    "dora_linear": (llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)),
    "dora_gpt2_conv1d": (gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], use_dora=True,
                                    fan_in_fan_out=True)),
    "dora_embedding": (llama, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "v_proj"], use_dora=True)),
    "embedding_lora": (llama, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "embedding_lora_tied_gpt2": (gpt2, dict(r=4, lora_alpha=8, target_modules=["wte", "c_attn"],
                                            fan_in_fan_out=True)),
    "modules_to_save_lm_head": (llama, dict(r=4, lora_alpha=8, target_modules=["q_proj"],
                                            modules_to_save=["lm_head", "norm"])),
    "trainable_tokens": (llama, dict(r=4, lora_alpha=8, target_modules=["q_proj"],
                                     trainable_token_indices=[3, 5, 60])),
    "trainable_tokens_tied_gemma": (gemma, dict(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                trainable_token_indices={"embed_tokens": [1, 7]})),
}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_feature_parity(feature, tmp_path):
    make, lora = FEATURES[feature]
    torch_cls, flax_cls, cfg = make()
    twin = build_twin(tmp_path, torch_cls, flax_cls, cfg, lora)
    want = torch_logits(twin.peft_model, twin.inputs)
    assert rel_err(flax_logits_plain(twin, twin.flax_model.params), want) > 100 * TOL

    lora_params = jlora.load(twin.flax_model.params, twin.adapter_dir)
    assert rel_err(flax_logits_wrapped(twin, lora_params), want) <= TOL
    merged_want = torch_logits(twin.peft_model.merge_and_unload(), twin.inputs)
    assert rel_err(flax_logits_plain(twin, jlora.merge(lora_params)), merged_want) <= TOL
    assert_saves_back(lora_params, twin.adapter_dir, tmp_path / "saved")


@pytest.mark.parametrize("make, lora", [
    (gemma, dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens"])),
    (gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn"], modules_to_save=["wte"], fan_in_fan_out=True)),
], ids=["gemma", "gpt2"])
def test_modules_to_save_on_a_tied_embedding(make, lora, tmp_path):
    """PEFT copies the embedding module; the tied output head keeps the old table. The Flax model reads
    one table for both, so jlora runs the replacement in the lookups only. A merged tree can hold only one
    table (PEFT's merged model unties them): merge puts in the replacement and warns."""
    torch_cls, flax_cls, cfg = make()
    twin = build_twin(tmp_path, torch_cls, flax_cls, cfg, lora)
    want = torch_logits(twin.peft_model, twin.inputs)
    lora_params = jlora.load(twin.flax_model.params, twin.adapter_dir)
    assert rel_err(flax_logits_wrapped(twin, lora_params), want) <= TOL

    with pytest.warns(UserWarning, match="output head"):
        merged = jlora.merge(lora_params)
    (path, node), = [(p, n) for p, n in jlora.tree.adapted_modules(lora_params) if "embedding" in n]
    np.testing.assert_array_equal(jlora.tree.get_path(merged, path)["embedding"], node["embedding"])

    pm = peft_loads_cleanly(twin.torch_base, jlora.save(lora_params, tmp_path / "again"))
    assert rel_err(torch_logits(pm, twin.inputs), want) <= TOL


@pytest.mark.parametrize("lora", [
    dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens"], ensure_weight_tying=True),
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"], ensure_weight_tying=True),
], ids=["modules_to_save", "embedding_lora"])
def test_ensure_weight_tying_on_a_tied_embedding(lora, tmp_path):
    """PEFT's ensure_weight_tying saves the tied lm_head too, as a copy of the embedding's table or with LoRA
    factors that are the embedding's transposed; the head then reads the adapted table. The Flax tree has one
    table, so the copy has no place of its own: it is checked, used as the tied table, and written back by save."""
    torch_cls, flax_cls, cfg = gemma()
    twin = build_twin(tmp_path, torch_cls, flax_cls, cfg, lora)
    file = load_file(twin.adapter_dir / "adapter_model.safetensors")
    assert any(k.startswith("base_model.model.lm_head.") for k in file)
    want = torch_logits(twin.peft_model, twin.inputs)
    lora_params = jlora.load(twin.flax_model.params, twin.adapter_dir)
    assert rel_err(flax_logits_wrapped(twin, lora_params), want) <= TOL
    # the merged table against PEFT's unmerged output: PEFT 0.21's merge_and_unload adds the tied LoRA delta
    # twice (once for embed_tokens, once for the lm_head sharing its weight)
    assert rel_err(flax_logits_plain(twin, jlora.merge(lora_params)), want) <= TOL

    out = jlora.save(lora_params, tmp_path / "again")
    saved = load_file(out / "adapter_model.safetensors")
    assert set(saved) == set(file)
    for key, value in file.items():
        np.testing.assert_array_equal(saved[key].numpy(), value.numpy(), err_msg=key)
    assert rel_err(torch_logits(peft_loads_cleanly(twin.torch_base, out), twin.inputs), want) <= TOL

    head_adapter = [k for k in file if k.startswith("base_model.model.lm_head.") and "base_layer" not in k]
    broken = {k: v + 1 if k in head_adapter else v for k, v in file.items()}
    save_file(broken, str(twin.adapter_dir / "adapter_model.safetensors"))
    with pytest.raises(jlora.TargetMismatchError, match="lm_head"):  # a head that is not a tied copy has no place
        jlora.load(twin.flax_model.params, twin.adapter_dir)


def test_trainable_tokens_tied_to_a_copied_head(tmp_path):
    """A tied model (Llama with tie_word_embeddings) in a Flax tree whose lm_head is a copy of the table, as
    FlaxLlama needs: PEFT ties the trainable tokens to the head, so the head's rows for those tokens change too.
    Logits (wrapped and merged), loss and the delta's gradient (summed over both uses) against PEFT."""
    import jax
    import jax.numpy as jnp
    import peft
    import torch
    from test_training import jax_loss_fn, torch_grads_by_peft_key

    torch_cls, flax_cls, cfg = llama()
    cfg.tie_word_embeddings = True
    twin = build_twin(tmp_path, torch_cls, flax_cls, cfg, dict(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                               trainable_token_indices=[1, 3, 60]))
    params = twin.flax_model.params
    params["lm_head"]["kernel"] = params["model"]["embed_tokens"]["embedding"].T  # FlaxLlama does not tie
    assert rel_err(flax_logits_plain(twin, params), torch_logits(twin.torch_base, twin.inputs)) <= TOL
    want = torch_logits(twin.peft_model, twin.inputs)
    lora_params = jlora.load(params, twin.adapter_dir)
    assert rel_err(flax_logits_wrapped(twin, lora_params), want) <= TOL
    assert rel_err(flax_logits_plain(twin, jlora.merge(lora_params)), want) <= TOL

    pm = peft.PeftModel.from_pretrained(copy.deepcopy(twin.torch_base), twin.adapter_dir, is_trainable=True)
    ids = twin.inputs["input_ids"]
    loss_t = pm(input_ids=torch.as_tensor(ids).long(), labels=torch.as_tensor(ids).long()).loss
    loss_t.backward()
    trainable, frozen = jlora.split(lora_params)
    loss_j, grads = jax.value_and_grad(jax_loss_fn(twin.flax_model))(trainable, frozen, jnp.asarray(ids))
    assert rel_err(loss_j, loss_t.item()) <= 1e-4
    got = jlora.to_peft_tensors(jlora.combine(grads, frozen))
    for key, g in torch_grads_by_peft_key(pm).items():
        assert rel_err(got[key], g) <= 1e-4, key
