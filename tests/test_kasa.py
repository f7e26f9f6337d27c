"""KaSA (PEFT's kasa_config: LoRA in SVD form on a base weight without its r smallest singular components) against
the real peft on a tiny Llama: logits unmerged and merged, gradients (lora_diag too), the KaSA regularizer, saving,
jlora.init, NNX, and what is refused. jlora keeps the base arrays and adds the dropped components back negated."""
from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from peft_twin import (
    assert_runs_merges_and_saves_like_peft,
    build_twin,
    flax_logits_wrapped,
    peft_loads_cleanly,
    rel_err,
    torch_logits,
)
from test_parity_models import llama

import jlora

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "down_proj"],
            kasa_config={"beta": 0.01, "gamma": 0.02})


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    torch_cls, flax_cls, cfg = llama()
    return build_twin(tmp_path_factory.mktemp("kasa"), torch_cls, flax_cls, cfg, LORA)


def test_logits_merge_and_save_match_peft(twin, tmp_path):
    lp = jlora.load(twin.flax_model.params, twin.adapter_dir)
    q = lp["model"]["layers"]["0"]["self_attn"]["q_proj"]
    assert q["kernel"] is twin.flax_model.params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert q["lora_diag"].shape == (4,) and q["kasa_down"].shape == (32, 4) and q["kasa_up"].shape == (4, 32)
    assert_runs_merges_and_saves_like_peft(twin, lp, tmp_path / "saved")


def test_gradients_and_regularizer_match_peft(twin):
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(twin.torch_base), twin.adapter_dir, is_trainable=True)
    ids = torch.as_tensor(twin.inputs["input_ids"]).long()
    (torch.tanh(pm(input_ids=ids).logits).sum() + pm.base_model._get_kasa_loss()).backward()
    want = {n.replace(".default", ""): p.grad.numpy() for n, p in pm.named_parameters() if p.requires_grad}
    assert any(n.endswith("lora_diag") for n in want)

    lp = jlora.load(twin.flax_model.params, twin.adapter_dir)
    trainable, frozen = jlora.split(lp)
    forward = jlora.wrap(twin.flax_model.__call__)

    def loss(tr):
        full = jlora.combine(tr, frozen)
        return jnp.sum(jnp.tanh(forward(**twin.inputs, params=full).logits)) + jlora.kasa_loss(full)

    got = jlora.to_peft_tensors(jlora.combine(jax.grad(loss)(trainable), frozen))
    assert set(got) == set(want)
    for key in want:
        assert rel_err(got[key], want[key]) <= 1e-4, key
    with torch.no_grad():
        assert abs(float(jlora.kasa_loss(lp)) - float(pm.base_model._get_kasa_loss())) <= 1e-5


def test_init_makes_what_peft_loads(twin, tmp_path):
    """jlora.init: PEFT's shapes and init (B zero, so only the truncation changes the model); after one SGD step
    through jlora.wrap the saved file loads in PEFT, which truncates its own base, and runs as jlora does."""
    lp = jlora.init(twin.flax_model.params, jlora.LoraConfig(**LORA), key=jax.random.key(0))
    trainable, frozen = jlora.split(lp)
    forward = jlora.wrap(twin.flax_model.__call__)
    grads = jax.grad(lambda tr: jnp.sum(forward(**twin.inputs, params=jlora.combine(tr, frozen)).logits ** 2))(
        trainable)
    stepped = jlora.combine(jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, trainable, grads), frozen)
    again = peft_loads_cleanly(twin.torch_base, jlora.save(stepped, tmp_path / "stepped"))
    assert rel_err(flax_logits_wrapped(twin, stepped), torch_logits(again, twin.inputs)) <= 1e-5


def test_nnx_model_matches_peft(tmp_path):
    from llama_variants import make_nnx_llama, nnx_pure_params_from_torch
    from test_layouts import NNX, torch_llama

    cfg, base, judge = torch_llama(tmp_path, LORA)
    ids = np.array([[1, 5, 9, 3, 60, 2, 7]], np.int32)
    graphdef, state = make_nnx_llama(cfg, abstract=True)
    lp = jlora.load(nnx_pure_params_from_torch(base.state_dict(), cfg, template=state), tmp_path / "adapter",
                    layout=NNX)
    got = jax.jit(lambda p: jlora.nnx_model(graphdef, p)(ids))(lp)
    assert rel_err(got, torch_logits(judge, {"input_ids": ids})) <= 1e-5


def test_refusals(twin, tmp_path):
    with pytest.raises(jlora.UnsupportedAdapterError, match="pad_rank"):
        jlora.load(twin.flax_model.params, twin.adapter_dir, pad_rank=8)
    with pytest.raises(jlora.AdapterError, match="KaSA"):
        jlora.load(twin.flax_model.params, {"a": twin.adapter_dir, "b": twin.adapter_dir})
    with pytest.raises(jlora.ConfigError, match="kasa_config with use_dora"):
        jlora.LoraConfig(r=4, use_dora=True, kasa_config={})
    with pytest.raises(jlora.TargetMismatchError, match="r < min"):  # rank 40 > 32 features
        jlora.init(twin.flax_model.params, jlora.LoraConfig(**{**LORA, "r": 40}), key=jax.random.key(0))
