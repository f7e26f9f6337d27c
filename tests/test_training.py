"""Continued training: same loss and gradients as PEFT, ten AdamW steps in lockstep with torch,
round trips through jlora.save into PEFT, fresh adapters from jlora.init."""
from __future__ import annotations

import copy
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
from peft_twin import build_twin, flax_logits_wrapped, peft_loads_cleanly, rel_err, torch_logits
from safetensors.torch import load_file
from test_parity_models import bert_cls, gemma, gpt2, llama, opt, roberta_cls

import jlora


def llama_with_biases():
    torch_cls, flax_cls, cfg = llama()
    cfg.attention_bias = True
    return torch_cls, flax_cls, cfg

LORA = {
    "plain": (llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "dora": (llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], use_dora=True)),
    "lora_bias_and_bias_all": (llama_with_biases, dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"],
                                                       lora_bias=True, bias="all")),
    "embedding_and_modules_to_save": (llama, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "o_proj"],
                                                  modules_to_save=["lm_head"])),
    "trainable_tokens": (llama, dict(r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices=[1, 3])),
    "modules_to_save_tied_embedding": (gemma, dict(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                   modules_to_save=["embed_tokens"])),
}


def jax_loss_fn(model, **wrapped_kwargs):
    fwd = jlora.wrap(model.__call__)

    def loss(trainable, frozen, ids):
        logits = fwd(ids, params=jlora.combine(trainable, frozen), **wrapped_kwargs).logits[:, :-1]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

    return loss


def torch_trainable(pm):
    return {n: p for n, p in pm.named_parameters() if p.requires_grad}


def torch_grads_by_peft_key(pm):
    grads = {n: p.grad for n, p in torch_trainable(pm).items()}
    return {k: v.numpy() for k, v in peft.get_peft_model_state_dict(pm, state_dict=grads).items()}


def make(tmp_path, case):
    make_model, lora = LORA[case]
    torch_cls, flax_cls, cfg = make_model()
    twin = build_twin(tmp_path, torch_cls, flax_cls, cfg, lora)
    trainable = peft.PeftModel.from_pretrained(copy.deepcopy(twin.torch_base), twin.adapter_dir, is_trainable=True)
    return twin, trainable


@pytest.mark.parametrize("case", list(LORA))
def test_loss_and_gradients_match_peft(tmp_path, case):
    twin, pm = make(tmp_path, case)
    ids = twin.inputs["input_ids"]
    loss_t = pm(input_ids=torch.as_tensor(ids).long(), labels=torch.as_tensor(ids).long()).loss
    loss_t.backward()
    want = torch_grads_by_peft_key(pm)

    lp = jlora.load(twin.flax_model.params, twin.adapter_dir)
    trainable, frozen = jlora.split(lp)
    loss_j, grads = jax.value_and_grad(jax_loss_fn(twin.flax_model))(trainable, frozen, jnp.asarray(ids))
    assert rel_err(loss_j, loss_t.item()) <= 1e-4
    got = jlora.to_peft_tensors(jlora.combine(grads, frozen))
    assert set(want) <= set(got)
    assert sum(int(np.prod(v.shape)) for v in want.values()) == jlora.count_trainable(lp)
    for key, g in want.items():
        assert rel_err(got[key], g) <= 1e-4, key


@pytest.mark.parametrize("case", ["plain", "dora", "lora_bias_and_bias_all"])
def test_ten_adamw_steps_match_torch(tmp_path, case):
    twin, pm = make(tmp_path, case)
    ids = twin.inputs["input_ids"]
    opt_t = torch.optim.AdamW(list(torch_trainable(pm).values()), lr=1e-2, weight_decay=0.01, eps=1e-8)
    for _ in range(10):
        opt_t.zero_grad()
        pm(input_ids=torch.as_tensor(ids).long(), labels=torch.as_tensor(ids).long()).loss.backward()
        opt_t.step()
    want = {k: v.detach().numpy() for k, v in peft.get_peft_model_state_dict(pm).items()}

    lp = jlora.load(twin.flax_model.params, twin.adapter_dir)
    trainable, frozen = jlora.split(lp)
    tx = jlora.optimizer(optax.adamw(1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01), trainable)
    state = tx.init(trainable)
    grad_fn = jax.jit(jax.grad(jax_loss_fn(twin.flax_model)))
    for _ in range(10):
        updates, state = tx.update(grad_fn(trainable, frozen, jnp.asarray(ids)), state, trainable)
        trainable = optax.apply_updates(trainable, updates)
    got = jlora.to_peft_tensors(jlora.combine(trainable, frozen))
    assert set(got) == set(want)
    moved = 0
    for key in want:
        assert rel_err(got[key], want[key]) <= 1e-3, key
        moved += not np.allclose(want[key], load_file(twin.adapter_dir / "adapter_model.safetensors")[key].numpy())
    assert moved > 0


def test_train_save_reload_in_peft(tmp_path):
    twin, _ = make(tmp_path, "dora")
    lp = jlora.load(twin.flax_model.params, twin.adapter_dir)
    tx = jlora.optimizer(optax.adam(1e-2), lp)
    state = tx.init(lp)
    loss = jax_loss_fn(twin.flax_model)
    ids = jnp.asarray(twin.inputs["input_ids"])
    full_loss = lambda p: loss(*jlora.split(p), ids)  # noqa: E731
    for _ in range(3):
        updates, state = tx.update(jax.grad(full_loss)(lp), state, lp)
        lp = optax.apply_updates(lp, updates)
    out = jlora.save(lp, tmp_path / "trained")
    pm = peft_loads_cleanly(twin.torch_base, out)
    got = flax_logits_wrapped(twin, lp)
    assert rel_err(got, torch_logits(pm, twin.inputs)) <= 1e-4
    assert rel_err(got, torch_logits(twin.peft_model, twin.inputs)) > 1e-3  # training changed it

    again = jlora.load(twin.flax_model.params, out)
    flat, flat_again = jax.tree_util.tree_flatten_with_path(lp)[0], jax.tree_util.tree_flatten_with_path(again)[0]
    for (pa, a), (pb, b) in zip(flat, flat_again):
        assert pa == pb and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert jax.tree_util.tree_structure(lp) == jax.tree_util.tree_structure(again)


@pytest.mark.parametrize("lora", [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, init_lora_weights=False),
    dict(r=2, lora_alpha=4, target_modules=["embed_tokens", "k_proj"], modules_to_save=["lm_head"],
         init_lora_weights="gaussian", rank_pattern={"k_proj": 3}),
    dict(r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices=[2, 9], init_lora_weights=False),
])
def test_init_save_loads_in_peft(tmp_path, lora):
    torch_cls, flax_cls, cfg = llama()
    twin = build_twin(tmp_path, torch_cls, flax_cls, cfg, dict(r=4, target_modules=["q_proj"]))
    lp = jlora.init(twin.flax_model.params, jlora.LoraConfig(**lora), key=jax.random.key(0))
    out = jlora.save(lp, tmp_path / "fresh")
    pm = peft_loads_cleanly(twin.torch_base, out)
    assert rel_err(flax_logits_wrapped(twin, lp), torch_logits(pm, twin.inputs)) <= 1e-4


@pytest.mark.parametrize("make, task_type", [(llama, "CAUSAL_LM"), (gpt2, "CAUSAL_LM"), (opt, "CAUSAL_LM"),
                                             (bert_cls, "SEQ_CLS"), (bert_cls, None), (roberta_cls, "SEQ_CLS")],
                         ids=["llama", "gpt2", "opt", "bert_seq_cls", "bert_no_task", "roberta_seq_cls"])
def test_init_targets_what_peft_targets(make, task_type, tmp_path):
    """all-linear skips the output head; task_type SEQ_CLS adds the classifier to modules_to_save, as PEFT's
    PeftModelForSequenceClassification does (so neither it nor a Linear inside it gets LoRA)."""
    torch_cls, flax_cls, cfg = make()
    torch.manual_seed(0)
    base = torch_cls(cfg).eval()
    kwargs = dict(r=2, target_modules="all-linear", task_type=task_type)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    want = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(pm).items()}
    base.save_pretrained(tmp_path / "base")
    flax_model = flax_cls.from_pretrained(tmp_path / "base", from_pt=True)
    lp = jlora.init(flax_model.params, jlora.LoraConfig(**kwargs), key=jax.random.key(0))
    assert {k: tuple(v.shape) for k, v in jlora.to_peft_tensors(lp).items()} == want
    assert any("classifier" in k and "lora_" not in k for k in want) == (task_type == "SEQ_CLS")  # saved whole


def test_init_matches_peft_statistics(tmp_path):
    """A kaiming-uniform(a=sqrt(5)) like nn.Linear: uniform in +-1/sqrt(fan_in); B zero."""
    torch_cls, flax_cls, cfg = llama()
    model = flax_cls(cfg, seed=0)
    lp = jlora.init(model.params, jlora.LoraConfig(r=16, target_modules=["gate_proj"]), key=jax.random.key(1))
    node = lp["model"]["layers"]["0"]["mlp"]["gate_proj"]
    a = np.asarray(node["lora_A"])
    bound = 1 / np.sqrt(32)
    assert a.min() >= -bound and a.max() <= bound and a.std() > 0.5 * bound / np.sqrt(3)
    assert not np.any(np.asarray(node["lora_B"]))
    assert set(node.spec.trainable) == {"lora_A", "lora_B"}


def test_optimizer_state_only_for_trainable_leaves(tmp_path):
    torch_cls, flax_cls, cfg = llama()
    model = flax_cls(cfg, seed=0)
    lp = jlora.init(model.params, jlora.LoraConfig(r=4, target_modules=["q_proj"]), key=jax.random.key(0))
    state = jlora.optimizer(optax.adam(1e-3), lp).init(lp)
    sizes = [x.size for x in jax.tree_util.tree_leaves(state) if hasattr(x, "size") and x.ndim > 0]
    assert sum(sizes) == 2 * jlora.count_trainable(lp)  # mu and nu, nothing for frozen leaves
    mask = jlora.trainable_mask(lp)
    assert jax.tree_util.tree_structure(mask) == jax.tree_util.tree_structure(lp)
    assert sum(jax.tree_util.tree_leaves(mask)) == 4  # 2 layers x (A, B)


def test_no_gradient_for_frozen_kernels(tmp_path):
    torch_cls, flax_cls, cfg = llama()
    model = flax_cls(cfg, seed=0)
    lp = jlora.init(model.params, jlora.LoraConfig(r=4, target_modules=["q_proj"]), key=jax.random.key(0))
    trainable, frozen = jlora.split(lp)
    ids = jnp.ones((1, 5), jnp.int32)
    jaxpr = jax.make_jaxpr(jax.grad(jax_loss_fn(model)))(trainable, frozen, ids)
    frozen_shapes = {(32, 48), (48, 32), (64, 32), (32, 64)}  # mlp kernels, embedding, lm_head
    shapes = {tuple(v.aval.shape) for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars if hasattr(v.aval, "shape")}
    assert not shapes & frozen_shapes


class FixedMask(torch.nn.Module):
    """Dropout with a mask fixed by the input's shape, so torch and JAX drop the very same entries."""

    def forward(self, x):
        return x * torch.as_tensor(fixed_mask(tuple(x.shape)), dtype=x.dtype)


def fixed_mask(shape: tuple, keep: float = 0.7) -> np.ndarray:
    rng = np.random.default_rng(abs(hash(shape)) % 2**32)
    return ((rng.random(shape) < keep) / keep).astype(np.float32)


def gpt2_without_dropout():
    torch_cls, flax_cls, cfg = gpt2()
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0  # only the LoRA branch drops (torch runs in train mode)
    return torch_cls, flax_cls, cfg


DROPOUT_CASES = {**LORA, "gpt2_dora": (gpt2_without_dropout, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                                   fan_in_fan_out=True, use_dora=True))}


@pytest.mark.parametrize("case", ["plain", "dora", "gpt2_dora"])
def test_dropout_matches_peft_train_mode(tmp_path, monkeypatch, case):
    """PEFT in train mode with lora_dropout (DoRA: its base term is computed on the dropped input, without
    the bias) vs jlora with a dropout key, both dropping the same entries: same loss and gradients."""
    make_model, lora = DROPOUT_CASES[case]
    torch_cls, flax_cls, cfg = make_model()
    twin = build_twin(tmp_path, torch_cls, flax_cls, cfg, {**lora, "lora_dropout": 0.3})
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(twin.torch_base), twin.adapter_dir, is_trainable=True).train()
    swapped = 0
    for module in pm.modules():
        if isinstance(getattr(module, "lora_dropout", None), torch.nn.ModuleDict):
            module.lora_dropout["default"] = FixedMask()
            swapped += 1
    assert swapped == len(lora["target_modules"]) * cfg.num_hidden_layers
    ids = twin.inputs["input_ids"]
    loss_t = pm(input_ids=torch.as_tensor(ids).long(), labels=torch.as_tensor(ids).long()).loss
    loss_t.backward()
    want = torch_grads_by_peft_key(pm)

    wrap_module = importlib.import_module("jlora.wrap")
    real_dropout = wrap_module.lora_dropout
    seen = []

    def fixed(key, rate, site, name, layer=None):
        if key is None:  # wrap's abstract probe runs without a key
            return real_dropout(key, rate, site, name)
        assert rate == pytest.approx(0.3)
        seen.append(site)
        return lambda x: x * jnp.asarray(fixed_mask(tuple(x.shape)), x.dtype)

    monkeypatch.setattr(wrap_module, "lora_dropout", fixed)
    lp = jlora.load(twin.flax_model.params, twin.adapter_dir)
    trainable, frozen = jlora.split(lp)
    loss = jax_loss_fn(twin.flax_model, lora_dropout_key=jax.random.key(0))
    loss_j, grads = jax.value_and_grad(loss)(trainable, frozen, jnp.asarray(ids))
    assert len(seen) == swapped
    assert rel_err(loss_j, loss_t.item()) <= 1e-4
    got = jlora.to_peft_tensors(jlora.combine(grads, frozen))
    assert set(want) <= set(got)
    for key, g in want.items():
        assert rel_err(got[key], g) <= 1e-4, key


def test_dropout_only_with_a_key(tmp_path):
    torch_cls, flax_cls, cfg = llama()
    model = flax_cls(cfg, seed=0)
    config = jlora.LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.5, init_lora_weights=False)
    lp = jlora.init(model.params, config, key=jax.random.key(0))
    fwd = jax.jit(jlora.wrap(model.__call__))
    ids = jnp.arange(8, dtype=jnp.int32)[None]
    plain = fwd(ids, params=lp).logits
    drop1 = fwd(ids, params=lp, lora_dropout_key=jax.random.key(1)).logits
    drop1_again = fwd(ids, params=lp, lora_dropout_key=jax.random.key(1)).logits
    drop2 = fwd(ids, params=lp, lora_dropout_key=jax.random.key(2)).logits
    np.testing.assert_array_equal(drop1, drop1_again)
    assert not np.allclose(plain, drop1) and not np.allclose(drop1, drop2)
