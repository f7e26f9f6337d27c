"""PEFT adapters <-> qwix LoRA (jlora.to_qwix / jlora.from_qwix), against the real qwix, tunix and PEFT.

A tiny random transformers Llama saved as safetensors and converted by tunix's own loader (``test_tunix``'s
helpers); qwix's LoRA added once by ``qwix.apply_lora_to_model`` with two rules (attention rank 4 / alpha 8, MLP and
head rank 2 / alpha 3); PEFT adapters made by ``peft.get_peft_model`` with every tensor random. Checked: a PEFT
adapter in the qwix model gives PeftModel's logits (and jlora's unmerged ones), PEFT -> qwix -> PEFT gives PEFT's
file back bit for bit, a qwix model trained with ``nnx.Optimizer(wrt=nnx.LoRAParam)`` saves as an adapter PEFT
loads with the qwix model's logits, rsLoRA / pattern scales are folded exactly, and what qwix cannot hold is refused.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import optax
import peft
import pytest
import qwix
import torch
from flax import nnx
from peft_twin import peft_loads_cleanly, rel_err
from safetensors.numpy import load_file
from test_tunix import _llama, _randomise

import jlora
from jlora.targeting import is_targeted, module_rank, module_scale

TOL = 2e-4  # float32, relative to the largest logit
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RULES = [qwix.LoraRule(module_path=r".*attn/(q_proj|k_proj|v_proj|o_proj)", rank=4, alpha=8.0),
         qwix.LoraRule(module_path=r".*mlp/(gate_proj|up_proj|down_proj)|lm_head", rank=2, alpha=3.0)]
NAMES = [f"model.layers.{i}.{p}" for i in range(2) for p in
         [f"self_attn.{x}" for x in ALL_LINEAR[:4]] + [f"mlp.{x}" for x in ALL_LINEAR[4:]]] + ["lm_head"]


@dataclasses.dataclass
class Setup:
    torch_base: torch.nn.Module
    graphdef: Any  # the tunix model's
    state: Any
    provider: Any
    qwix_graphdef: Any  # the same model with qwix's LoRA
    qwix_state: Any
    inputs: tuple  # (ids, positions, attention mask)
    qwix_forward: Callable


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Setup:
    folder = tmp_path_factory.mktemp("llama3")
    torch.manual_seed(0)
    base, convert = _llama(folder)
    base.eval().save_pretrained(folder, safe_serialization=True)
    model = convert()
    graphdef, state = nnx.split(model)
    ids = np.array([[1, 5, 9, 3, 7, 2, 8, 4], [3, 3, 1, 60, 22, 9, 0, 5]], np.int32)
    positions = np.broadcast_to(np.arange(8, dtype=np.int32), ids.shape)
    mask = np.broadcast_to(np.tril(np.ones((8, 8), bool)), (2, 8, 8))
    provider = qwix.LoraProvider(RULES)
    lora_model = qwix.apply_lora_to_model(model, provider, ids[:1, :2], positions[:1, :2], None, mask[:1, :2, :2],
                                          rngs=nnx.Rngs(0))
    qwix_graphdef, qwix_state = nnx.split(lora_model)
    qwix_state = jax.device_put(qwix_state, jax.devices()[0])  # committed, as jit's outputs: one compilation
    forward = jax.jit(lambda st, ids, pos, m: nnx.merge(qwix_graphdef, st)(ids, pos, None, m)[0])
    return Setup(base, graphdef, state, provider, qwix_graphdef, qwix_state, (ids, positions, mask),
                 lambda st: np.asarray(forward(jax.device_put(st, jax.devices()[0]), ids, positions, mask)))


def _adapter(setup: Setup, folder: Path, lora: dict, seed: int) -> tuple[torch.nn.Module, np.ndarray]:
    """A PEFT adapter with every tensor random, saved to ``folder``; its PeftModel and logits."""
    pm = peft.get_peft_model(copy.deepcopy(setup.torch_base), peft.LoraConfig(**lora))
    _randomise(pm, seed)
    pm.save_pretrained(folder)
    return pm.eval(), _torch_logits(pm, setup)


def _torch_logits(model: torch.nn.Module, setup: Setup) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(setup.inputs[0]).long()).logits.float().numpy()


def _unmerged(setup: Setup, lora_params) -> np.ndarray:
    ids, positions, mask = setup.inputs
    return np.asarray(jax.jit(lambda lp: jlora.nnx_model(setup.graphdef, lp)(ids, positions, None, mask)[0])(
        lora_params))


def _noisy(state, seed: int):
    """``state`` with every qwix LoRA leaf random (as if trained), so that leaves to_qwix must clear show."""
    leaves = jlora.qwix_bridge.qwix_lora_leaves(nnx.to_pure_dict(state))
    rng = np.random.default_rng(seed)
    updates = {}
    for (path, key), (a, b) in leaves.items():
        updates[path + (key + "_lora_a",)] = rng.normal(size=a.shape).astype(np.float32)
        updates[path + (key + "_lora_b",)] = rng.normal(size=b.shape).astype(np.float32)
    return jlora.qwix_bridge._rebuild(state, nnx.to_pure_dict(state), updates)


def _same_config(got: jlora.LoraConfig, want: jlora.LoraConfig) -> None:
    """Equivalent for PEFT: the same modules targeted, with the same rank and scale each."""
    for name in NAMES:
        assert is_targeted(got, name) == is_targeted(want, name), name
        if is_targeted(want, name):
            assert module_rank(got, name) == module_rank(want, name), name
            assert module_scale(got, name) == pytest.approx(module_scale(want, name), rel=1e-12), name


def test_peft_adapter_runs_in_qwix(llama, tmp_path):
    """(1) PEFT -> jlora.load -> to_qwix: the qwix model gives PeftModel's logits and jlora's unmerged ones. Ranks 2
    and 3 padded to qwix's 4, scales 5/2 and 5/3 folded into b, the head's qwix LoRA (not in the adapter) cleared."""
    lora = dict(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                rank_pattern={"layers.1.self_attn.o_proj": 3})
    _, want = _adapter(llama, tmp_path / "adapter", lora, seed=1)
    lora_params = jlora.load(llama.state, tmp_path / "adapter", layout="tunix")
    start = _noisy(llama.qwix_state, seed=2)
    filled = jlora.to_qwix(lora_params, start, llama.provider)
    got = llama.qwix_forward(filled)
    unmerged = _unmerged(llama, lora_params)
    print(f"qwix vs PEFT {rel_err(got, want):.2e}, qwix vs jlora unmerged {rel_err(got, unmerged):.2e}")
    assert rel_err(got, want) <= TOL and rel_err(got, unmerged) <= TOL
    assert rel_err(llama.qwix_forward(start), want) > 100 * TOL

    o_proj = nnx.to_pure_dict(filled)["layers"][1]["attn"]["o_proj"]
    assert not np.any(o_proj["w_lora_b"][3:]) and np.any(o_proj["w_lora_b"][:3])  # rank 3 of 4: one column padded
    np.testing.assert_array_equal(o_proj["w_lora_a"][..., 3],  # the padded column keeps qwix's a (trainable)
                                  nnx.to_pure_dict(start)["layers"][1]["attn"]["o_proj"]["w_lora_a"][..., 3])
    assert not np.any(nnx.to_pure_dict(filled)["lm_head"]["w_lora_b"])
    assert nnx.to_pure_dict(start)["lm_head"]["w_lora_b"].any()  # (to_qwix left the State it was given alone)


def test_round_trip_is_bit_exact(llama, tmp_path):
    """(2) PEFT -> qwix -> from_qwix -> jlora.save: PEFT's tensors bit for bit, an equivalent config."""
    lora = dict(r=4, lora_alpha=8, target_modules=ALL_LINEAR + ["lm_head"],
                rank_pattern={p: 2 for p in ["gate_proj", "up_proj", "down_proj", "lm_head"]},
                alpha_pattern={p: 3.0 for p in ["gate_proj", "up_proj", "down_proj", "lm_head"]})
    _, want = _adapter(llama, tmp_path / "adapter", lora, seed=3)
    lora_params = jlora.load(llama.state, tmp_path / "adapter", layout="tunix")
    filled = jlora.to_qwix(lora_params, llama.qwix_state, llama.provider)
    assert rel_err(llama.qwix_forward(filled), want) <= TOL

    model = nnx.merge(llama.qwix_graphdef, llama.qwix_state)  # a model is filled in place
    assert jlora.to_qwix(lora_params, model, llama.provider) is model
    for a, b in zip(jax.tree_util.tree_leaves(nnx.state(model)), jax.tree_util.tree_leaves(filled)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    back = jlora.from_qwix(filled, llama.provider)
    out = jlora.save(back, tmp_path / "saved")
    original, saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors"), load_file(
        out / "adapter_model.safetensors")
    # (PEFT also writes the targeted head's base weight, unchanged, as lm_head.base_layer.weight; qwix has no copy)
    assert set(original) - set(saved) == {"base_model.model.lm_head.base_layer.weight"} and set(saved) < set(original)
    for key, value in saved.items():
        assert saved[key].dtype == value.dtype == np.float32 and np.array_equal(saved[key], value), key
    config = jlora.LoraConfig.from_pretrained(str(out))
    _same_config(config, jlora.LoraConfig.from_pretrained(str(tmp_path / "adapter")))
    assert (config.r, config.lora_alpha, config.target_modules) == (4, 8.0, sorted(ALL_LINEAR + ["lm_head"]))

    from_dict = jlora.from_qwix(nnx.to_pure_dict(filled), RULES)  # a pure dict and the rules alone: the same
    for a, b in zip(jax.tree_util.tree_leaves(from_dict), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _train(setup: Setup, steps: int) -> nnx.Module:
    """The qwix model (fresh LoRA: He-uniform a, zero b) after ``steps`` AdamW steps on its LoRA leaves alone."""
    model = nnx.merge(setup.qwix_graphdef, setup.qwix_state)
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.LoRAParam)
    nnx.update(optimizer, jax.device_put(nnx.state(optimizer), jax.devices()[0]))  # committed: one compilation
    ids, positions, mask = setup.inputs

    def loss_fn(model):
        logits = model(ids, positions, None, mask)[0][:, :-1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(steps)]
    assert losses[-1] < losses[0]
    return model


def test_trained_qwix_model_saves_for_peft(llama, tmp_path):
    """(3) A qwix LoRA model trained with nnx.Optimizer(wrt=nnx.LoRAParam) -> from_qwix -> save: PEFT loads it with
    no missing or unexpected keys and gives the qwix model's logits."""
    model = _train(llama, steps=3)
    state = nnx.state(model)
    base_before = nnx.to_pure_dict(llama.qwix_state)["layers"][0]["attn"]["q_proj"]["w"]
    np.testing.assert_array_equal(nnx.to_pure_dict(state)["layers"][0]["attn"]["q_proj"]["w"], base_before)
    want = llama.qwix_forward(state)

    lora_params = jlora.from_qwix(model, llama.provider, base_model_name_or_path="tiny-llama", task_type="CAUSAL_LM")
    out = jlora.save(lora_params, tmp_path / "trained")
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (4, 8.0, "tiny-llama")
    assert config["rank_pattern"] == {p: 2 for p in ["down_proj", "gate_proj", "lm_head", "up_proj"]}
    got = _torch_logits(peft_loads_cleanly(llama.torch_base, out), llama)
    moved = rel_err(_torch_logits(llama.torch_base, llama), want)
    print(f"PEFT vs trained qwix {rel_err(got, want):.2e} (training moved the logits {moved:.2e})")
    assert rel_err(got, want) <= TOL and moved > 100 * TOL


def test_rslora_and_patterns_fold_into_qwix_scale(llama, tmp_path):
    """(4) rsLoRA with rank and alpha patterns: qwix's one alpha/rank per rule cannot express them, to_qwix folds the
    ratio into b; back through from_qwix and save, PEFT gives the original adapter's logits."""
    lora = dict(r=2, lora_alpha=4, use_rslora=True, target_modules="all-linear", alpha_pattern={"v_proj": 7.0},
                rank_pattern={"layers.1.self_attn.q_proj": 3, "up_proj": 1})
    _, want = _adapter(llama, tmp_path / "adapter", lora, seed=4)
    lora_params = jlora.load(llama.state, tmp_path / "adapter", layout="tunix")
    filled = jlora.to_qwix(lora_params, llama.qwix_state, llama.provider)
    got = llama.qwix_forward(filled)
    out = jlora.save(jlora.from_qwix(filled, llama.provider), tmp_path / "saved")
    back = _torch_logits(peft_loads_cleanly(llama.torch_base, out), llama)
    print(f"qwix vs PEFT {rel_err(got, want):.2e}, round trip vs PEFT {rel_err(back, want):.2e}")
    assert rel_err(got, want) <= TOL and rel_err(back, want) <= TOL
    config = jlora.LoraConfig.from_pretrained(str(out))
    assert not config.use_rslora and module_rank(config, "model.layers.0.mlp.up_proj") == 2  # qwix's rank, padded
    # PEFT's all-linear leaves the head out: its qwix LoRA was cleared, and comes back with a zero lora_B
    assert not np.any(load_file(out / "adapter_model.safetensors")["base_model.model.lm_head.lora_B.weight"])


def test_what_qwix_cannot_hold_is_refused_all_at_once(llama, tmp_path):
    _adapter(llama, tmp_path / "dora", dict(r=2, use_dora=True, target_modules=["q_proj", "v_proj"],
                                            rank_pattern={"v_proj": 6}, modules_to_save=["embed_tokens"]), seed=5)
    lora_params = jlora.load(llama.state, tmp_path / "dora", layout="tunix")
    with pytest.raises(jlora.UnsupportedAdapterError) as err:
        jlora.to_qwix(lora_params, llama.qwix_state, llama.provider)
    text = str(err.value)
    assert text.count("DoRA") == 4 and "modules_to_save" in text and text.count("rank 6 is above") == 2, text

    for folder, lora, why in [("bias", dict(r=2, lora_bias=True, target_modules=["o_proj"]), "lora_bias"),
                              ("embedding", dict(r=2, target_modules=["embed_tokens"]), "LoRA on an embedding")]:
        _adapter(llama, tmp_path / folder, lora, seed=6)
        with pytest.raises(jlora.UnsupportedAdapterError, match=why):
            jlora.to_qwix(jlora.load(llama.state, tmp_path / folder, layout="tunix"), llama.qwix_state, llama.provider)


def test_mismatched_models_and_providers_are_refused(llama, tmp_path):
    _adapter(llama, tmp_path / "adapter", dict(r=2, target_modules=["q_proj", "lm_head"]), seed=7)
    lora_params = jlora.load(llama.state, tmp_path / "adapter", layout="tunix")
    pure = nnx.to_pure_dict(llama.qwix_state)
    pure["lm_head"] = {"w": pure["lm_head"]["w"]}  # a qwix model whose rules left the head out
    with pytest.raises(jlora.TargetMismatchError, match="no w_lora_a / w_lora_b at lm_head"):
        jlora.to_qwix(lora_params, pure, llama.provider)
    with pytest.raises(jlora.TargetMismatchError, match="rule '.\\*' has rank 3, the qwix LoRA at 'lm_head' rank 2"):
        jlora.from_qwix(llama.qwix_state, {"module_path": ".*", "rank": 3, "alpha": 6.0})
    with pytest.raises(jlora.AdapterError, match="come from the qwix provider"):
        jlora.from_qwix(llama.qwix_state, llama.provider, r=8)


def test_fused_kernel_shares_qwix_a():
    """A fused k/v kernel (Gemma's kv_einsum (2, K, D, H): qwix's a (D, r) is shared by both parts, b (r, 2, K, H)):
    PEFT's k_proj (rank 2) and v_proj (rank 1) become one rank-3 block pair in qwix's rank 4, and come back as two
    rank-4 modules with the same delta. No tunix model needed: a pure-dict tree and a custom layout."""
    rng = np.random.default_rng(0)
    d, k, h, n = 6, 2, 3, 4
    tree = {"attn": {"kv": {"w": rng.normal(size=(2, k, d, h)).astype(np.float32)},
                     "o": {"w": rng.normal(size=(n, h, d)).astype(np.float32)}}}
    layout = jlora.Layout([
        jlora.Rule(r"attn\.k_proj", "attn/kv/w", "(k h) d -> part k d h", part=0),
        jlora.Rule(r"attn\.v_proj", "attn/kv/w", "(k h) d -> part k d h", part=1),
        jlora.Rule(r"attn\.o_proj", "attn/o/w", "d (n h) -> n h d")])
    config = jlora.LoraConfig(r=2, lora_alpha=3, use_rslora=True, rank_pattern={"v_proj": 1},
                              target_modules=["k_proj", "v_proj", "o_proj"])
    ranks, outs, ins = {"k_proj": 2, "v_proj": 1, "o_proj": 2}, {"k_proj": k * h, "v_proj": k * h, "o_proj": d}, \
        {"k_proj": d, "v_proj": d, "o_proj": n * h}
    tensors = {}
    for m, r in ranks.items():
        tensors[f"base_model.model.attn.{m}.lora_A.weight"] = rng.normal(size=(r, ins[m])).astype(np.float32)
        tensors[f"base_model.model.attn.{m}.lora_B.weight"] = rng.normal(size=(outs[m], r)).astype(np.float32)
    lora_params = jlora.place(tree, config, tensors, layout=layout)
    def qwix_tree(r: int) -> dict:  # qwix's leaves for rank r
        return {"attn": {"kv": {**tree["attn"]["kv"], "w_lora_a": np.zeros((d, r), np.float32),
                                "w_lora_b": np.zeros((r, 2, k, h), np.float32)},
                         "o": {**tree["attn"]["o"], "w_lora_a": np.zeros((n, h, r), np.float32),
                               "w_lora_b": np.zeros((r, d), np.float32)}}}

    rules = {"module_path": ".*", "rank": 4, "alpha": 2.0}
    filled = jlora.to_qwix(lora_params, qwix_tree(4), rules)
    merged = jlora.merge(lora_params)
    kv, o = filled["attn"]["kv"], filled["attn"]["o"]
    np.testing.assert_allclose(0.5 * np.einsum("dr,rpkh->pkdh", kv["w_lora_a"], kv["w_lora_b"]),
                               merged["attn"]["kv"]["w"] - tree["attn"]["kv"]["w"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(0.5 * np.einsum("nhr,rd->nhd", o["w_lora_a"], o["w_lora_b"]),
                               merged["attn"]["o"]["w"] - tree["attn"]["o"]["w"], rtol=1e-5, atol=1e-6)
    with pytest.raises(jlora.UnsupportedAdapterError, match=r"k_proj \+ attn.v_proj \(one fused kernel\): rank 2 "
                                                            r"\+ 1 = 3 is above the qwix rule's rank 2"):
        jlora.to_qwix(lora_params, qwix_tree(2), {"module_path": ".*", "rank": 2, "alpha": 1.0})
    with pytest.raises(jlora.TargetMismatchError, match="rule '.\\*' has rank 4, the qwix LoRA at 'attn/o' rank 2"):
        jlora.to_qwix(lora_params, {"attn": {**qwix_tree(4)["attn"], "o": qwix_tree(2)["attn"]["o"]}}, rules)
    back = jlora.from_qwix(filled, rules, layout=layout, module_names=["attn.k_proj", "attn.v_proj", "attn.o_proj"])
    assert back["attn"]["kv"]["lora_A"].shape == (d, 8)  # two rank-4 parts
    for path in (("attn", "kv", "w"), ("attn", "o", "w")):
        np.testing.assert_allclose(jlora.merge(back)[path[0]][path[1]][path[2]], merged[path[0]][path[1]][path[2]],
                                   rtol=1e-5, atol=1e-6)
