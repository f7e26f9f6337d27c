"""Activated LoRA (aLoRA, PEFT's alora_invocation_tokens) against PEFT: the offsets, logits, greedy generation with a
KV cache, gradients, saving, and what is refused."""
from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft_twin import assert_saves_back, build_twin, flax_logits_plain, flax_logits_wrapped, rel_err
from test_parity_models import gpt2, llama

import jlora

INVOKE = [7, 9, 11]
# the invocation in the middle, twice (the last counts), at the very start, absent, and cut off by the end
IDS = np.array([[3, 4, 7, 9, 11, 5, 6, 8],
                [7, 9, 11, 2, 7, 9, 11, 4],
                [7, 9, 11, 1, 2, 3, 4, 5],
                [1, 2, 3, 4, 5, 6, 8, 10],
                [1, 2, 3, 4, 5, 6, 7, 9]], np.int32)


@pytest.fixture(scope="module", params=[llama, gpt2], ids=["llama", "gpt2 (Conv1D)"])
def twin(request, tmp_path_factory):
    torch_cls, flax_cls, cfg = request.param()
    targets = ["q_proj", "v_proj", "down_proj"] if request.param is llama else ["c_attn", "c_fc"]
    lora = dict(r=4, lora_alpha=8, target_modules=targets, alora_invocation_tokens=INVOKE, task_type="CAUSAL_LM")
    return build_twin(tmp_path_factory.mktemp("alora"), torch_cls, flax_cls, cfg, lora, inputs={"input_ids": IDS})


def test_offsets_are_peft_s(twin):
    from peft.tuners.lora.variants import calculate_alora_offsets

    want = calculate_alora_offsets(twin.peft_model.peft_config, "default", torch.as_tensor(IDS).long())
    lp = jlora.load(twin.flax_model.params, twin.adapter_dir)
    np.testing.assert_array_equal(jlora.alora_offsets(lp, IDS), [0 if o is None else o for o in want])
    assert list(jlora.alora_offsets(lp, IDS)) == [6, 4, 8, 0, 0]


def test_logits_match_peft(twin):
    """The adapter changes only the tokens from the invocation on (rows without it are the base model's)."""
    lp = jlora.load(twin.flax_model.params, twin.adapter_dir)
    with torch.no_grad():
        want = twin.peft_model(input_ids=torch.as_tensor(IDS).long()).logits.numpy()
    got = flax_logits_wrapped(twin, lp, alora_offsets=jlora.alora_offsets(lp, IDS))
    assert rel_err(got, want) <= 1e-5
    base = flax_logits_plain(twin, twin.flax_model.params)
    assert rel_err(got[:2, :2], base[:2, :2]) <= 1e-5 and rel_err(got[3:], base[3:]) <= 1e-5
    assert rel_err(got[0, 2:], base[0, 2:]) > 1e-3  # (from the invocation on, the adapter is at work)
    with pytest.raises(jlora.AdapterError, match="alora_offsets"):
        flax_logits_wrapped(twin, lp)


def test_generate_matches_peft(twin):
    """Greedy generation through jlora.wrap (transformers' Flax generate, KV cache; offsets from the prompt): the
    tokens PEFT's generate makes, where the prompt before the invocation stays the base model's and a prompt
    without it generates as the base model."""
    prompt = IDS[:4, :6]
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    no_eos = twin.flax_model.config.vocab_size  # (Flax's generate needs an eos id: one it can never produce)
    with torch.no_grad():
        want = twin.peft_model.generate(input_ids=torch.as_tensor(prompt).long(),
                                        attention_mask=torch.ones(prompt.shape), eos_token_id=None, **greedy).numpy()
    lp = jlora.load(twin.flax_model.params, twin.adapter_dir)
    got = jlora.wrap(twin.flax_model.generate)(prompt, params=lp, alora_offsets=jlora.alora_offsets(lp, prompt),
                                               eos_token_id=no_eos, **greedy).sequences
    np.testing.assert_array_equal(np.asarray(got), want)
    base = np.asarray(twin.flax_model.generate(prompt, params=twin.flax_model.params, eos_token_id=no_eos,
                                               **greedy).sequences)
    np.testing.assert_array_equal(base[3], want[3])  # (no invocation in this prompt)
    assert (base[:3, 6:] != want[:3, 6:]).any()  # (the adapter changes the others' tokens)


def test_gradients_match_peft(twin):
    """Training: gradients reach the factors through the invocation's tokens only, as in PEFT."""
    import peft

    model = peft.PeftModel.from_pretrained(copy.deepcopy(twin.torch_base), twin.adapter_dir, is_trainable=True)
    ids = torch.as_tensor(IDS).long()
    torch.tanh(model(input_ids=ids).logits).sum().backward()
    want = {n.replace(".default", ""): p.grad.numpy() for n, p in model.named_parameters() if "lora_" in n}
    lp = jlora.load(twin.flax_model.params, twin.adapter_dir)
    trainable, frozen = jlora.split(lp)
    offsets = jlora.alora_offsets(lp, IDS)

    def loss(t):
        out = jlora.wrap(twin.flax_model.__call__)(IDS, params=jlora.combine(t, frozen), alora_offsets=offsets)
        return jnp.sum(jnp.tanh(out.logits))

    got = jlora.to_peft_tensors(jlora.combine(jax.grad(loss)(trainable), frozen))
    assert set(got) == set(want)
    for key in want:
        assert rel_err(got[key], want[key]) <= 1e-4, key


def test_saves_back_and_refusals(twin, tmp_path):
    lp = jlora.load(twin.flax_model.params, twin.adapter_dir)
    assert_saves_back(lp, twin.adapter_dir, tmp_path / "saved")
    with pytest.raises(jlora.UnsupportedAdapterError, match="aLoRA"):
        jlora.merge(lp)
    with pytest.raises(jlora.ConfigError, match="alora_invocation_tokens"):
        jlora.LoraConfig.from_dict({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"],
                                    "alora_invocation_tokens": [1, 2], "use_dora": True})
    with pytest.raises(jlora.AdapterError, match="not an aLoRA adapter"):
        jlora.alora_offsets(jlora.LoraConfig(r=4), IDS)


def test_nnx_model_matches_peft(tmp_path):
    """jlora.nnx_model with an aLoRA adapter on an NNX Llama (fused kv kernel): PEFT's logits."""
    from llama_variants import make_nnx_llama, nnx_pure_params_from_torch
    from test_layouts import NNX, torch_llama

    cfg, base, judge = torch_llama(tmp_path, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                                  alora_invocation_tokens=INVOKE, task_type="CAUSAL_LM"))
    with torch.no_grad():
        want = judge(input_ids=torch.as_tensor(IDS).long()).logits.numpy()
    graphdef, state = make_nnx_llama(cfg, abstract=True)
    lp = jlora.load(nnx_pure_params_from_torch(base.state_dict(), cfg, template=state), tmp_path / "adapter",
                    layout=NNX)
    got = jax.jit(lambda p, o: jlora.nnx_model(graphdef, p, alora_offsets=o)(IDS))(lp, jlora.alora_offsets(lp, IDS))
    assert rel_err(got, want) <= 1e-4
    with torch.no_grad():
        assert rel_err(got[:3], base(input_ids=torch.as_tensor(IDS[:3]).long()).logits.numpy()) > 1e-3


def test_stacked_nnx_layers_adapt_the_last_offset_tokens(tmp_path):
    """Stacked NNX layers (nnx.vmap + nnx.scan) of a per-token net: each example's last `offset` tokens equal the
    same adapter as plain LoRA, the others the base model."""
    import json

    from test_layouts import _nnx_scanned_net

    graphdef, state, layout = _nnx_scanned_net()
    config = jlora.LoraConfig(r=2, target_modules=["up", "down"], init_lora_weights=False, alora_invocation_tokens=[5])
    names = [f"blocks.{i}.{m}" for i in range(3) for m in ("up", "down")]
    activated = jlora.save(jlora.init(state, config, key=jax.random.key(0), layout=layout, module_names=names),
                           tmp_path / "alora")
    plain = tmp_path / "plain"
    plain.mkdir()
    settings = json.loads((activated / "adapter_config.json").read_text())
    (plain / "adapter_config.json").write_text(json.dumps({**settings, "alora_invocation_tokens": None}))
    (plain / "adapter_model.safetensors").write_bytes((activated / "adapter_model.safetensors").read_bytes())

    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5, 8)), jnp.float32)
    offsets = np.array([2, 0, 7], np.int32)
    got = jlora.nnx_model(graphdef, jlora.load(state, activated, layout=layout), alora_offsets=offsets)(x)
    full = jlora.nnx_model(graphdef, jlora.load(state, plain, layout=layout))(x)
    from flax import nnx

    base = nnx.merge(graphdef, state)(x)
    assert rel_err(full, base) > 1e-3
    np.testing.assert_allclose(got[0, 3:], full[0, 3:], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[0, :3], base[0, :3], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[1], base[1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[2], full[2], rtol=1e-6, atol=1e-6)


def test_mixed_batch_matches_peft(tmp_path):
    """An aLoRA adapter beside a plain one and the base model in one batch (PEFT's adapter_names, which finds each
    row's offsets with its own adapter's invocation): logits and greedy generation with a KV cache."""
    from peft_twin import peft_family, saved_pair

    torch_cls, flax_cls, cfg = llama()
    base, flax_model = saved_pair(torch_cls, flax_cls, cfg, tmp_path / "base")
    adapters = {"activated": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                  alora_invocation_tokens=INVOKE, task_type="CAUSAL_LM"),
                "plain": dict(r=2, lora_alpha=6, target_modules=["q_proj", "o_proj"], task_type="CAUSAL_LM")}
    judge = peft_family(tmp_path, base, adapters, seed=20)
    names = ["activated", "plain", "__base__", "activated", "activated"]
    adapter_ids = np.array([0, 1, -1, 0, 0])
    lp = jlora.load(flax_model.params, {name: tmp_path / name for name in adapters})

    offsets = jlora.alora_offsets(lp, IDS, adapter_ids)
    assert list(offsets[[0, 3, 4]]) == [6, 0, 0] and offsets[1] >= IDS.shape[1] and offsets[2] == 0
    with torch.no_grad():
        want = judge(input_ids=torch.as_tensor(IDS).long(), adapter_names=names).logits.numpy()
    got = jax.jit(jlora.wrap(flax_model.__call__))(IDS, params=lp, adapter_ids=adapter_ids, alora_offsets=offsets)
    assert rel_err(got.logits, want) <= 1e-5

    prompt = IDS[:, :6]
    greedy = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = judge.generate(input_ids=torch.as_tensor(prompt).long(), attention_mask=torch.ones(prompt.shape),
                              adapter_names=names, eos_token_id=None, **greedy).numpy()
    got = jlora.wrap(flax_model.generate)(prompt, params=lp, adapter_ids=adapter_ids, eos_token_id=cfg.vocab_size,
                                          alora_offsets=jlora.alora_offsets(lp, prompt, adapter_ids), **greedy)
    np.testing.assert_array_equal(np.asarray(got.sequences), want)
    with pytest.raises(jlora.AdapterError, match="adapter_ids"):
        jlora.alora_offsets(lp, IDS)
