"""BD-LoRA (PEFT's use_bdlora: block-diagonal lora_A on some modules, lora_B on others) against the real peft on a
tiny Llama: loading, logits, merging, gradients and training (the off-block entries stay zero), saving, jlora.init,
mixed batches, and what is refused."""
from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
from peft_twin import (
    assert_runs_merges_and_saves_like_peft,
    build_twin,
    flax_logits_wrapped,
    peft_loads_cleanly,
    perturb_trainable,
    rel_err,
    torch_logits,
)
from safetensors.torch import load_file
from test_parity_models import llama

import jlora

BD = {"target_modules_bd_a": ["o_proj", "down_proj"], "target_modules_bd_b": ["q_proj", "v_proj", "up_proj"],
      "nblocks": 2}
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], use_bdlora=BD)
O_PROJ = "base_model.model.model.layers.0.self_attn.o_proj"
Q_PROJ = "base_model.model.model.layers.0.self_attn.q_proj"
IDS = np.array([[1, 5, 9, 3, 60, 2, 7], [4, 4, 8, 11, 0, 33, 12]], np.int32)


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    torch_cls, flax_cls, cfg = llama()
    return build_twin(tmp_path_factory.mktemp("bdlora"), torch_cls, flax_cls, cfg, LORA)


def _attn(tree):
    return tree["model"]["layers"]["0"]["self_attn"]


def test_logits_merge_and_save_match_peft(twin, tmp_path):
    file = load_file(twin.adapter_dir / "adapter_model.safetensors")
    assert file[f"{O_PROJ}.lora_A.weight"].shape == (4, 16)  # (r, in / nblocks): PEFT's stacked diagonal blocks
    assert file[f"{Q_PROJ}.lora_B.weight"].shape == (32, 2)  # (out, r / nblocks)
    lp = jlora.load(twin.flax_model.params, twin.adapter_dir)
    a = np.asarray(_attn(lp)["o_proj"]["lora_A"])  # (in, r) with zeros off the blocks
    assert a.shape == (32, 4) and not a[:16, 2:].any() and not a[16:, :2].any() and a[:16, :2].all()
    np.testing.assert_array_equal(a[16:, 2:].T, file[f"{O_PROJ}.lora_A.weight"].numpy()[2:])

    assert_runs_merges_and_saves_like_peft(twin, lp, tmp_path / "saved")


def test_training_keeps_the_blocks_and_matches_torch(twin, tmp_path):
    """Gradients equal PEFT's on the blocks and are zero off them, so AdamW steps keep the factors block-diagonal:
    the trained adapter saves in PEFT's layout and PEFT runs it as jlora does."""
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(twin.torch_base), twin.adapter_dir, is_trainable=True)
    ids = torch.as_tensor(twin.inputs["input_ids"]).long()
    torch.tanh(pm(input_ids=ids).logits).sum().backward()
    want = {n.replace(".default", ""): p.grad.numpy() for n, p in pm.named_parameters() if p.requires_grad}

    lp = jlora.load(twin.flax_model.params, twin.adapter_dir)
    trainable, frozen = jlora.split(lp)
    forward = jlora.wrap(twin.flax_model.__call__)

    def loss(tr):
        return jnp.sum(jnp.tanh(forward(**twin.inputs, params=jlora.combine(tr, frozen)).logits))

    grads = jax.grad(loss)(trainable)
    got = jlora.to_peft_tensors(jlora.combine(grads, frozen))
    assert set(got) == set(want)
    for key in want:
        assert rel_err(got[key], want[key]) <= 1e-4, key
    grad_a = np.asarray(_attn(grads)["o_proj"]["lora_A"])
    assert grad_a[:16, :2].any() and not grad_a[:16, 2:].any() and not grad_a[16:, :2].any()

    tx = optax.adamw(1e-2, weight_decay=0.1)  # (on the trainable leaves only: jlora.split)
    step = jax.jit(lambda tr, state: tx.update(jax.grad(loss)(tr), state, tr))
    state = tx.init(trainable)
    for _ in range(3):
        updates, state = step(trainable, state)
        trainable = optax.apply_updates(trainable, updates)
    trained = jlora.combine(trainable, frozen)
    q_b = np.asarray(_attn(trained)["q_proj"]["lora_B"])  # (r, out): block-diagonal
    assert not q_b[:2, 16:].any() and not q_b[2:, :16].any()
    out = jlora.save(trained, tmp_path / "trained")
    again = peft_loads_cleanly(twin.torch_base, out)
    assert rel_err(flax_logits_wrapped(twin, trained), torch_logits(again, twin.inputs)) <= 1e-5

    broken = jax.tree_util.tree_map(lambda x: x, trained)
    _attn(broken)["o_proj"] = _attn(broken)["o_proj"].replace(lora_A=_attn(broken)["o_proj"]["lora_A"].at[0, 3].set(1))
    with pytest.raises(jlora.AdapterError, match="lora_A .*outside its diagonal blocks"):
        jlora.save(broken, tmp_path / "broken")
    assert not (tmp_path / "broken").exists()


def test_init_makes_what_peft_loads(twin, tmp_path):
    """jlora.init of a BD-LoRA config: PEFT's init (the block-diagonal A kaiming-uniform with gain sqrt(2), every B
    zero) and PEFT's shapes: after one SGD step through jlora.wrap it saves a file PEFT loads with no missing or
    unexpected keys and runs as jlora does."""
    lp = jlora.init(twin.flax_model.params, jlora.LoraConfig(**LORA), key=jax.random.key(0))
    a = np.asarray(_attn(lp)["o_proj"]["lora_A"])
    assert np.abs(a).max() <= np.sqrt(6 / 16) and np.abs(a).max() > 1 / np.sqrt(16)  # (fan_in: in / nblocks = 16)
    assert not any(np.asarray(_attn(lp)[m]["lora_B"]).any() for m in ("q_proj", "o_proj"))
    trainable, frozen = jlora.split(lp)
    forward = jlora.wrap(twin.flax_model.__call__)
    grads = jax.grad(lambda tr: jnp.sum(forward(**twin.inputs, params=jlora.combine(tr, frozen)).logits ** 2))(
        trainable)
    stepped = jlora.combine(jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, trainable, grads), frozen)
    assert np.asarray(_attn(stepped)["q_proj"]["lora_B"]).any()
    again = peft_loads_cleanly(twin.torch_base, jlora.save(stepped, tmp_path / "stepped"))
    assert rel_err(flax_logits_wrapped(twin, stepped), torch_logits(again, twin.inputs)) <= 1e-5


def test_mixed_batch_matches_peft(twin, tmp_path):
    """A BD-LoRA adapter beside a plain one in one batch: PEFT's adapter_names forward."""
    torch_cls, flax_cls, cfg = llama()
    plain = peft.get_peft_model(copy.deepcopy(twin.torch_base), peft.LoraConfig(
        init_lora_weights=False, r=3, lora_alpha=6, target_modules=["q_proj", "o_proj"]))
    perturb_trainable(plain, 9)
    plain.save_pretrained(tmp_path / "plain")
    judge = peft.PeftModel.from_pretrained(copy.deepcopy(twin.torch_base), twin.adapter_dir, adapter_name="bd")
    judge.load_adapter(tmp_path / "plain", adapter_name="plain")
    ids = np.concatenate([twin.inputs["input_ids"]] * 2)[:3]
    with torch.no_grad():
        want = judge.eval()(input_ids=torch.as_tensor(ids).long(), adapter_names=["plain", "bd", "__base__"]).logits
    lp = jlora.load(twin.flax_model.params, {"bd": twin.adapter_dir, "plain": tmp_path / "plain"})
    got = jax.jit(jlora.wrap(twin.flax_model.__call__))(ids, params=lp, adapter_ids=jnp.array([1, 0, -1])).logits
    assert rel_err(got, want.numpy()) <= 1e-5
    with pytest.raises(jlora.UnsupportedAdapterError, match="block-diagonal"):
        jlora.add_weighted(lp, {"bd": 0.5, "plain": 0.5})


def test_refusals(twin):
    with pytest.raises(jlora.UnsupportedAdapterError, match="pad_rank"):
        jlora.load(twin.flax_model.params, twin.adapter_dir, pad_rank=8)
    with pytest.raises(jlora.ConfigError) as err:
        jlora.LoraConfig(r=4, use_dora=True, use_bdlora={"target_modules_bd_a": ["q"], "target_modules_bd_b": ["q"],
                                                         "nblocks": "2"})
    assert err.value.problems == ["use_bdlora.nblocks must be a positive integer, found '2'",
                                  "use_bdlora with use_dora: PEFT has no such variant combination"]
    with pytest.raises(jlora.TargetMismatchError) as err:  # 3 blocks do not divide rank 4 (nor 32 features)
        jlora.init(twin.flax_model.params, jlora.LoraConfig(**{**LORA, "use_bdlora": {**BD, "nblocks": 3}}),
                   key=jax.random.key(0))
    assert "divisible by 3" in str(err.value)
    strict = jlora.LoraConfig(**{**LORA, "target_modules": ["q_proj", "k_proj"]})
    with pytest.raises(jlora.TargetMismatchError, match="k_proj: BD-LoRA .*matches neither"):
        jlora.init(twin.flax_model.params, strict, key=jax.random.key(0))


def test_inspect_names_the_blocks(twin):
    from jlora.describe import describe_adapter, format_description

    info = describe_adapter(twin.adapter_dir)
    kinds = {g["module"]: g["kind"] for g in info["groups"]}
    assert kinds["o_proj"] == "LoRA (A block-diagonal, 2 blocks)"
    assert kinds["up_proj"] == "LoRA (B block-diagonal, 2 blocks)"
    assert "options     BD-LoRA (2 blocks)" in format_description(info)


def test_nnx_model_matches_peft_and_stacked_kernels_are_refused(tmp_path):
    """jlora.nnx_model runs BD-LoRA as PEFT (NNX Llama); a scanned layout (layers stacked in one kernel) is refused
    with the modules named."""
    from llama_variants import make_nnx_llama, nnx_pure_params_from_torch, scanned_params_from_torch
    from test_layouts import NNX, SCANNED, torch_llama

    lora = {**LORA, "target_modules": ["q_proj", "o_proj", "up_proj", "down_proj"]}
    cfg, base, judge = torch_llama(tmp_path, lora)
    with torch.no_grad():
        want = judge(input_ids=torch.as_tensor(IDS).long()).logits.numpy()
    graphdef, state = make_nnx_llama(cfg, abstract=True)
    lp = jlora.load(nnx_pure_params_from_torch(base.state_dict(), cfg, template=state), tmp_path / "adapter",
                    layout=NNX)
    assert rel_err(jax.jit(lambda p: jlora.nnx_model(graphdef, p)(IDS))(lp), want) <= 1e-5
    with pytest.raises(jlora.TargetMismatchError, match="stacked or fused kernel"):
        jlora.load(scanned_params_from_torch(base.state_dict(), cfg), tmp_path / "adapter", layout=SCANNED)
