"""Layouts beyond transformers naming, against PEFT: a MaxText-style scanned linen decoder
(DenseGeneral kernels with the layer axis at 1) and an NNX decoder (int layer keys, fused kv kernel),
both converted from a PyTorch LlamaForCausalLM on which PEFT made the adapter."""
from __future__ import annotations

import copy
import importlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers as tf
from llama_variants import (
    ScannedLlama,
    make_nnx_llama,
    nnx_logits,
    nnx_pure_params_from_torch,
    scanned_params_from_torch,
)
from peft_twin import perturb_trainable, rel_err
from safetensors.torch import load_file

import jlora
from jlora import Layout, Rule

LAYER = r"model\.layers\.(?P<layer>\d+)"
SCANNED = Layout([
    Rule(r"model\.embed_tokens", "embed/embedding", "v d -> v d"),
    Rule(rf"{LAYER}\.self_attn\.q_proj", "decoder/layers/attn/query/kernel", "(n h) i -> i layer n h", n=4),
    Rule(rf"{LAYER}\.self_attn\.k_proj", "decoder/layers/attn/key/kernel", "(k h) i -> i layer k h"),
    Rule(rf"{LAYER}\.self_attn\.v_proj", "decoder/layers/attn/value/kernel", "(k h) i -> i layer k h"),
    Rule(rf"{LAYER}\.self_attn\.o_proj", "decoder/layers/attn/out/kernel", "o (n h) -> n layer h o"),
    Rule(rf"{LAYER}\.mlp\.gate_proj", "decoder/layers/mlp/wi_0/kernel", "f i -> i layer f"),
    Rule(rf"{LAYER}\.mlp\.up_proj", "decoder/layers/mlp/wi_1/kernel", "f i -> i layer f"),
    Rule(rf"{LAYER}\.mlp\.down_proj", "decoder/layers/mlp/wo/kernel", "o f -> f layer o"),
    Rule(r"lm_head", "lm_head/kernel", "o i -> i o"),
], name="scanned-llama")

NNX = Layout([
    Rule(rf"{LAYER}\.self_attn\.q_proj", "layers/{layer}/attn/q/kernel", "o i -> i o"),
    Rule(rf"{LAYER}\.self_attn\.k_proj", "layers/{layer}/attn/kv/kernel", "(k h) i -> i part k h", part=0),
    Rule(rf"{LAYER}\.self_attn\.v_proj", "layers/{layer}/attn/kv/kernel", "(k h) i -> i part k h", part=1),
    Rule(rf"{LAYER}\.self_attn\.o_proj", "layers/{layer}/attn/o/kernel", "o i -> i o"),
    Rule(rf"{LAYER}\.mlp\.(?P<m>gate|up|down)_proj", "layers/{layer}/mlp/{m}/kernel", "o i -> i o"),
], name="nnx-llama")

ADAPTERS = {
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "down_proj"],
                     rank_pattern={"layers.1.self_attn.q_proj": 2, "v_proj": 6},
                     alpha_pattern={"layers.0.mlp.down_proj": 3, "k_proj": 16}),
    "untouched_layers": dict(r=4, lora_alpha=8, target_modules=r"model\.layers\.1\.self_attn\.(k|v)_proj|"
                                                               r"model\.layers\.0\.(self_attn\.q_proj|mlp\.up_proj)"),
    "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"], use_dora=True),
}


def torch_llama(tmp_path, lora, seed=0):
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    torch.manual_seed(seed)
    base = tf.LlamaForCausalLM(cfg).eval()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **lora))
    perturb_trainable(pm, seed + 1)
    pm.save_pretrained(tmp_path / "adapter")
    judge = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    return cfg, base, judge


def torch_out(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(ids).long()).logits.numpy()


IDS = np.array([[1, 5, 9, 3, 60, 2, 7], [4, 4, 8, 11, 0, 33, 12]], np.int32)


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_scanned_linen_parity(tmp_path, adapter):
    cfg, base, judge = torch_llama(tmp_path, ADAPTERS[adapter])
    params = scanned_params_from_torch(base.state_dict(), cfg)
    model = ScannedLlama(cfg)
    want = torch_out(judge, IDS)
    assert rel_err(model.apply({"params": params}, IDS), want) > 1e-3

    lp = jlora.load(params, tmp_path / "adapter", layout=SCANNED)
    q = lp["decoder"]["layers"]["attn"]["query"]
    assert q["kernel"] is params["decoder"]["layers"]["attn"]["query"]["kernel"]  # base never re-stacked
    assert q["lora_A"].shape[:2] == (32, 2) and q["lora_B"].shape[1:] == (2, 4, 8)  # layer axis where the kernel has it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every module runs the side path, nothing is merged in the call
        wrapped = jax.jit(jlora.wrap(model.apply))({"params": lp}, IDS)
    assert rel_err(wrapped, want) <= 1e-4
    assert rel_err(model.apply({"params": jlora.merge(lp)}, IDS), torch_out(judge.merge_and_unload(), IDS)) <= 1e-4

    saved = jlora.to_peft_tensors(lp)  # the stacked adapter inverts to PEFT's per-layer keys
    original = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert set(saved) == set(original)
    for key, value in original.items():
        np.testing.assert_allclose(saved[key], value.numpy(), rtol=0, atol=0, err_msg=key)

    if adapter == "patterns":  # ranks 2, 4 and 6 padded to 8 columns: same outputs, same saved tensors
        padded = jlora.load(params, tmp_path / "adapter", layout=SCANNED, pad_rank=8)
        assert padded["decoder"]["layers"]["attn"]["value"]["lora_A"].shape == (32, 2, 8)
        assert rel_err(jax.jit(jlora.wrap(model.apply))({"params": padded}, IDS), want) <= 1e-4
        for key, value in jlora.to_peft_tensors(padded).items():
            np.testing.assert_array_equal(value, saved[key], err_msg=key)


@pytest.mark.parametrize("adapter", ["patterns", "dora"])
def test_nnx_fused_kv_parity(tmp_path, adapter):
    cfg, base, judge = torch_llama(tmp_path, ADAPTERS[adapter])
    graphdef, state = make_nnx_llama(cfg, abstract=True)
    pure = nnx_pure_params_from_torch(base.state_dict(), cfg, template=state)
    want = torch_out(judge, IDS)

    lp = jlora.load(pure, tmp_path / "adapter", layout=NNX)
    kv = lp["layers"][1]["attn"]["kv"]
    assert kv["lora_A"].shape[-1] == 2 * kv["lora_B"].shape[0] // 2 and kv["lora_B"].shape[1:] == (2, 2, 8)
    forward = jax.jit(lambda p, ids: nnx_logits(graphdef, p, ids))
    with pytest.warns(UserWarning, match="no unmerged side path"):  # NNX modules: merged inside the call
        wrapped = jax.jit(jlora.wrap(lambda p, ids: nnx_logits(graphdef, p, ids)))(lp, IDS)
    assert rel_err(wrapped, want) <= 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # jlora.nnx_model: every adapted module runs its side path
        unmerged = jax.jit(lambda p, ids: jlora.nnx_model(graphdef, p)(ids))(lp, IDS)
    assert rel_err(unmerged, want) <= 1e-4
    kernels = {tuple(x.shape) for path, x in jax.tree_util.tree_flatten_with_path(pure)[0] if path[-1].key == "kernel"}
    for name, fn in (("wrap", jlora.wrap(lambda p, ids: nnx_logits(graphdef, p, ids))),
                     ("nnx_model", lambda p, ids: jlora.nnx_model(graphdef, p)(ids))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eqns = jax.make_jaxpr(fn)(lp, IDS).jaxpr.eqns
        merges = [e for e in eqns if e.primitive.name == "add" and tuple(e.outvars[0].aval.shape) in kernels]
        # only the in-call merge forms kernel-sized sums (and DoRA's weight norm, as in PEFT)
        assert bool(merges) == (name == "wrap" or adapter == "dora"), name
    assert rel_err(forward(jlora.merge(lp), IDS), torch_out(judge.merge_and_unload(), IDS)) <= 1e-4
    original = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    saved = jlora.to_peft_tensors(lp)
    assert set(saved) == set(original)
    for key, value in original.items():
        np.testing.assert_array_equal(saved[key], value.numpy(), err_msg=key)

    if adapter == "patterns":  # k (r=4) and v (r=6) blocks of the fused kv kernel, each padded to 8 columns
        padded = jlora.load(pure, tmp_path / "adapter", layout=NNX, pad_rank=8)
        assert padded["layers"][1]["attn"]["kv"]["lora_A"].shape == (32, 16)
        assert rel_err(forward(jlora.merge(padded), IDS), torch_out(judge.merge_and_unload(), IDS)) <= 1e-4
        for key, value in jlora.to_peft_tensors(padded).items():
            np.testing.assert_array_equal(value, saved[key], err_msg=key)


def test_scanned_mixed_batch_matches_peft(tmp_path):
    """Several adapters on a scanned model (ranks 2-6 with patterns, one touching only layer 1): a mixed
    batch matches PEFT's adapter_names, select gives back each adapter exactly, and add_weighted matches
    PEFT's add_weighted_adapter layer by layer."""
    cfg, base, _ = torch_llama(tmp_path / "a", ADAPTERS["patterns"])
    only_layer_1 = dict(r=3, lora_alpha=6, target_modules=["k_proj", "v_proj"], layers_to_transform=[1])
    torch_llama(tmp_path / "b", only_layer_1, seed=0)  # same seed: the same base model
    judge = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a" / "adapter", adapter_name="a")
    judge.load_adapter(tmp_path / "b" / "adapter", adapter_name="b")
    ids = np.concatenate([IDS, IDS[:1] + 1])
    with torch.no_grad():
        want = judge.eval()(input_ids=torch.as_tensor(ids).long(), adapter_names=["b", "a", "__base__"]).logits.numpy()

    params = scanned_params_from_torch(base.state_dict(), cfg)
    model = ScannedLlama(cfg)
    sources = {name: tmp_path / name / "adapter" for name in ("a", "b")}
    lp = jlora.load(params, sources, layout=SCANNED)
    assert lp["decoder"]["layers"]["attn"]["value"]["lora_A"].shape == (2, 2, 32, 6)  # (adapters, layers, in, r)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every module runs the mixed side path
        got = jax.jit(jlora.wrap(model.apply))({"params": lp}, ids, adapter_ids=jnp.array([1, 0, -1]))
    assert rel_err(got, want) <= 1e-4
    for name, source in sources.items():
        alone, picked = jlora.load(params, source, layout=SCANNED), jlora.select(lp, name)
        assert jax.tree_util.tree_structure(picked) == jax.tree_util.tree_structure(alone)
        for x, y in zip(jax.tree_util.tree_leaves(picked), jax.tree_util.tree_leaves(alone)):
            np.testing.assert_array_equal(x, y)

    for method, weights in (("cat", {"a": 0.7, "b": -0.4}), ("svd", {"a": 1.0, "b": 0.5})):  # layer by layer, as PEFT
        judge.add_weighted_adapter(list(weights), list(weights.values()), method, combination_type=method)
        judge.set_adapter(method)
        want = torch_out(judge.eval(), IDS)
        blend = jlora.add_weighted(lp, weights, method=method)
        got = jax.jit(jlora.wrap(model.apply))({"params": blend}, IDS)
        assert rel_err(got, want) <= (1e-4 if method == "cat" else 1e-3), method  # svd: float32 spectra
        out = jlora.save(blend, tmp_path / method)
        again = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
        assert rel_err(got, torch_out(again, IDS)) <= 1e-4, method
        if method == "cat":  # exact: the same tensors as PEFT's combination, untouched layers included
            mine = load_file(out / "adapter_model.safetensors")
            theirs = {k: v for k, v in peft.get_peft_model_state_dict(judge, adapter_name="cat").items()}
            assert set(mine) == set(theirs)
            for key in theirs:
                np.testing.assert_allclose(mine[key].numpy(), theirs[key].numpy(), rtol=1e-6, atol=1e-7, err_msg=key)


def test_scanned_init_train_save_loads_in_peft(tmp_path):
    cfg, base, _ = torch_llama(tmp_path, dict(r=2, target_modules=["q_proj"]))
    params = scanned_params_from_torch(base.state_dict(), cfg)
    model = ScannedLlama(cfg)
    config = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "down_proj"],
                              rank_pattern={"layers.1.self_attn.o_proj": 2})
    names = [n for n, _ in base.named_modules()]
    lp = jlora.init(params, config, key=jax.random.key(0), layout=SCANNED, module_names=names)
    trainable, frozen = jlora.split(lp)
    tx = optax.adam(1e-2)
    state = tx.init(trainable)
    fwd = jlora.wrap(model.apply)

    def loss(tr, ids):
        logits = fwd({"params": jlora.combine(tr, frozen)}, ids)[:, :-1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    for _ in range(5):
        updates, state = tx.update(jax.grad(loss)(trainable, jnp.asarray(IDS)), state, trainable)
        trainable = optax.apply_updates(trainable, updates)
    lp = jlora.combine(trainable, frozen)
    o = lp["decoder"]["layers"]["attn"]["out"]
    # padding (layer 1 of o_proj has rank 2 of 4) stayed exactly zero through training
    assert not np.any(np.asarray(o["lora_A"])[:, 1, :, 2:]) and not np.any(np.asarray(o["lora_B"])[2:, 1])
    out = jlora.save(lp, tmp_path / "trained")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    got = jlora.wrap(model.apply)({"params": lp}, IDS)
    assert rel_err(got, torch_out(pm, IDS)) <= 1e-4
    assert rel_err(got, model.apply({"params": params}, IDS)) > 1e-4  # training moved it


def test_nnx_state_load_train_save(tmp_path):
    """The NNX workflow: load onto nnx.State, train through jlora.nnx_model (same gradients as wrap's in-call
    merge), save for PEFT."""
    from flax import nnx
    from llama_variants import NnxLlama

    cfg, base, _ = torch_llama(tmp_path, dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]))
    model = NnxLlama(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    state.replace_by_pure_dict(nnx_pure_params_from_torch(base.state_dict(), cfg, template=state))
    lp = jlora.load(state, tmp_path / "adapter", layout=NNX)  # nnx.State in, pure dict + adapter out
    trainable, frozen = jlora.split(lp)
    tx = optax.adam(1e-2)
    opt_state = tx.init(trainable)
    merged_in_call = jlora.wrap(lambda p, ids: nnx_logits(graphdef, p, ids))

    def loss(tr, ids, fwd=lambda p, ids: jlora.nnx_model(graphdef, p)(ids)):
        logits = fwd(jlora.combine(tr, frozen), ids)[:, :-1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = jax.grad(loss)(trainable, jnp.asarray(IDS), merged_in_call)
    for got, want in zip(jax.tree_util.tree_leaves(jax.grad(loss)(trainable, jnp.asarray(IDS))),
                         jax.tree_util.tree_leaves(reference)):
        assert rel_err(got, want) <= 1e-5

    @jax.jit
    def step(trainable, opt_state, ids):
        value, grads = jax.value_and_grad(loss)(trainable, ids)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every adapted module runs its side path
        losses = []
        for _ in range(5):
            trainable, opt_state, value = step(trainable, opt_state, jnp.asarray(IDS))
            losses.append(float(value))
    assert losses[-1] < losses[0]
    trained = jlora.combine(trainable, frozen)
    merged_state = nnx.State(state)  # run the merged model as a plain NNX module
    merged_state.replace_by_pure_dict(jlora.merge(trained))
    merged_model = nnx.merge(graphdef, merged_state)
    out = jlora.save(trained, tmp_path / "trained")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    assert rel_err(merged_model(jnp.asarray(IDS)), torch_out(pm.merge_and_unload(), IDS)) <= 1e-4


def test_nnx_mixed_batch_matches_peft(tmp_path):
    """jlora.nnx_model with several adapters (one with rank patterns over the fused kv kernel, one on layer 1
    only) and adapter_ids: PEFT's adapter_names; without adapter_ids, a clear error."""
    cfg, base, _ = torch_llama(tmp_path / "a", ADAPTERS["patterns"])
    torch_llama(tmp_path / "b", dict(r=3, lora_alpha=6, target_modules=["k_proj", "v_proj"], layers_to_transform=[1]))
    judge = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a" / "adapter", adapter_name="a")
    judge.load_adapter(tmp_path / "b" / "adapter", adapter_name="b")
    ids = np.concatenate([IDS, IDS[:1] + 1])
    with torch.no_grad():
        want = judge.eval()(input_ids=torch.as_tensor(ids).long(), adapter_names=["b", "__base__", "a"]).logits.numpy()
    graphdef, state = make_nnx_llama(cfg, abstract=True)
    pure = nnx_pure_params_from_torch(base.state_dict(), cfg, template=state)
    lp = jlora.load(pure, {name: tmp_path / name / "adapter" for name in ("a", "b")}, layout=NNX)
    forward = jax.jit(lambda p, ids, a: jlora.nnx_model(graphdef, p, adapter_ids=a)(ids))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = forward(lp, ids, jnp.array([1, -1, 0]))
    assert rel_err(got, want) <= 1e-4
    with pytest.raises(jlora.AdapterError, match="adapter_ids"):
        jlora.nnx_model(graphdef, lp)


def test_nnx_dora_dropout_matches_peft_train_mode(tmp_path, monkeypatch):
    """DoRA with lora_dropout through jlora.nnx_model: PEFT in train mode, both dropping the same entries
    (DoRA's base term is the module on the dropped input, without bias)."""
    from test_training import FixedMask, fixed_mask

    cfg, base, judge = torch_llama(tmp_path, {**ADAPTERS["dora"], "lora_dropout": 0.3})
    judge.train()
    for module in judge.modules():
        if isinstance(getattr(module, "lora_dropout", None), torch.nn.ModuleDict):
            module.lora_dropout["default"] = FixedMask()
    want = torch_out(judge, IDS)
    graphdef, state = make_nnx_llama(cfg, abstract=True)
    lp = jlora.load(nnx_pure_params_from_torch(base.state_dict(), cfg, template=state), tmp_path / "adapter",
                    layout=NNX)
    def fixed(key, rate, site, name, layer=None):
        return None if key is None else lambda x: x * jnp.asarray(fixed_mask(tuple(x.shape)), x.dtype)

    monkeypatch.setattr(importlib.import_module("jlora.nnx_model"), "lora_dropout", fixed)
    got = jlora.nnx_model(graphdef, lp, lora_dropout_key=jax.random.key(0))(IDS)
    assert rel_err(got, want) <= 1e-4
    assert rel_err(jlora.nnx_model(graphdef, lp)(IDS), want) > 1e-3  # the dropout matters


def test_nnx_model_einsum_side_path_and_merge_fallback():
    """nnx.Einsum runs its side path in nnx_model; a module class without one (a raw kernel matmul) is merged
    in the call, with one warning naming it; the output equals the merged model's."""
    from flax import nnx

    class Raw(nnx.Module):
        def __init__(self, rngs):
            self.kernel = nnx.Param(jax.random.normal(rngs.params(), (4, 4)))

        def __call__(self, x):
            return x @ self.kernel[...]

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.proj = nnx.Linear(8, 8, rngs=rngs)
            self.mix = nnx.Einsum("btd,de->bte", (8, 4), rngs=rngs)
            self.raw = Raw(rngs)

        def __call__(self, x):
            return self.raw(self.mix(self.proj(x)))

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    layout = Layout([Rule(r"(?P<m>proj|mix|raw)", "{m}/kernel", "o i -> i o")])
    config = jlora.LoraConfig(r=2, target_modules=["proj", "mix", "raw"], init_lora_weights=False)
    lp = jlora.init(state, config, key=jax.random.key(0), layout=layout, module_names=["proj", "mix", "raw"])
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 8)), jnp.float32)
    with pytest.warns(UserWarning, match=r"nnx_model: no unmerged side path for \['raw'\]"):
        got = jlora.nnx_model(graphdef, lp)(x)
    want = nnx.merge(graphdef, jlora.merge(lp))(x)
    assert rel_err(got, want) <= 1e-5 and rel_err(want, nnx.merge(graphdef, state)(x)) > 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eqns = jax.make_jaxpr(lambda p: jlora.nnx_model(graphdef, p)(x))(lp).jaxpr.eqns
    sums = {tuple(e.outvars[0].aval.shape) for e in eqns if e.primitive.name == "add"}
    assert (4, 4) in sums and (8, 8) not in sums and (8, 4) not in sums  # only the raw kernel is merged


def test_dora_must_cover_a_fused_kernel(tmp_path):
    cfg, base, _ = torch_llama(tmp_path, dict(r=2, target_modules=["v_proj"], use_dora=True))
    graphdef, state = make_nnx_llama(cfg, abstract=True)
    pure = nnx_pure_params_from_torch(base.state_dict(), cfg, template=state)
    with pytest.raises(jlora.UnsupportedAdapterError, match="cover all"):
        jlora.load(pure, tmp_path / "adapter", layout=NNX)


def test_rule_errors():
    with pytest.raises(jlora.AdapterError, match="form"):
        Rule("a", "a/kernel", "o i")
    with pytest.raises(jlora.AdapterError, match="each torch axis once"):
        Rule("a", "a/kernel", "o i -> i x")
    with pytest.raises(jlora.AdapterError, match="part="):
        Rule("a", "a/kernel", "o i -> part i o")
    with pytest.raises(jlora.AdapterError, match="regex"):
        Rule("(", "a/kernel", "o i -> i o")


def test_unmatched_keys_and_unused_rules(tmp_path, caplog):
    cfg, base, _ = torch_llama(tmp_path, dict(r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"]))
    params = scanned_params_from_torch(base.state_dict(), cfg)
    partial = Layout([SCANNED.rules[1], Rule(r"nothing\.matches", "lm_head/kernel", "o i -> i o")])
    with caplog.at_level("INFO", logger="jlora"), pytest.raises(jlora.TargetMismatchError) as err:
        jlora.load(params, tmp_path / "adapter", layout=partial)
    assert len(err.value.problems) == 2 and "up_proj" in str(err.value)  # both layers' up_proj
    assert "nothing" in caplog.text


def test_nnx_model_modules_to_save_on_a_tied_embedding():
    """A replaced embedding table (modules_to_save) whose output head is tied to it: as in PEFT, the lookups
    use the replacement and the head keeps the base table."""
    from flax import nnx

    class Tied(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(16, 8, rngs=rngs)
            self.proj = nnx.Linear(8, 8, rngs=rngs)

        def __call__(self, ids):
            return self.embed.attend(self.proj(self.embed(ids)))

    graphdef, state = nnx.split(Tied(nnx.Rngs(0)))
    layout = Layout([Rule(r"proj", "proj/kernel", "o i -> i o")])
    config = jlora.LoraConfig(r=2, target_modules=["proj"], modules_to_save=["embed"], init_lora_weights=False)
    lp = jlora.init(state, config, key=jax.random.key(0), layout=layout, module_names=["proj", "embed"])
    base_table = state["embed"]["embedding"][...]
    new_table = base_table + jax.random.normal(jax.random.key(1), base_table.shape)
    lp = {**lp, "embed": lp["embed"].replace(embedding=new_table)}
    ids = jnp.array([[1, 5, 7]])

    merged_proj = jlora.merge({"proj": lp["proj"]})["proj"]
    want = (new_table[ids] @ merged_proj["kernel"] + merged_proj["bias"]) @ base_table.T
    assert rel_err(jlora.nnx_model(graphdef, lp)(ids), want) <= 1e-5
    assert rel_err(want, (new_table[ids] @ merged_proj["kernel"] + merged_proj["bias"]) @ new_table.T) > 1e-2


def _nnx_conv_net():
    """An NNX conv (strided, padded) + Linear net, split: (graphdef, state, its layout)."""
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 8, (3, 3), strides=2, padding=((1, 1), (0, 2)), rngs=rngs)
            self.head = nnx.Linear(8, 4, rngs=rngs)

        def __call__(self, x):
            return self.head(self.conv(x))

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    layout = Layout([Rule(r"conv", "conv/kernel", "o i kh kw -> kh kw i o"),
                     Rule(r"head", "head/kernel", "o i -> i o")])
    return graphdef, state, layout


def _all_eqns(jaxpr):
    """The equations of a jaxpr and of the jaxprs inside it (a scan's body, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                yield from _all_eqns(inner)


def _assert_runs_unmerged(graphdef, state, lp, x, kernel_shapes: set, scan: bool = False) -> None:
    """jlora.nnx_model runs ``lp`` with no warning, equal to the merged model (which differs from the base), and
    its jaxpr (a scan's body included) adds nothing of ``kernel_shapes``: no kernel is merged."""
    from flax import nnx

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = jax.jit(lambda p: jlora.nnx_model(graphdef, p)(x))(lp)
    want = nnx.merge(graphdef, jlora.merge(lp))(x)
    assert rel_err(got, want) <= 1e-5 and rel_err(want, nnx.merge(graphdef, state)(x)) > 1e-3

    eqns = list(_all_eqns(jax.make_jaxpr(lambda p: jlora.nnx_model(graphdef, p)(x))(lp).jaxpr))
    assert any(e.primitive.name == "scan" for e in eqns) == scan
    assert not {tuple(e.outvars[0].aval.shape) for e in eqns if e.primitive.name == "add"} & kernel_shapes


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_nnx_model_conv_side_path(use_dora):
    """nnx.Conv runs its side path in nnx_model (strided, padded): the output equals the merged model's, no
    warning, and no kernel-sized sum in the jaxpr (plain LoRA)."""
    graphdef, state, layout = _nnx_conv_net()
    config = jlora.LoraConfig(r=2, target_modules=["conv", "head"], init_lora_weights=False, use_dora=use_dora)
    lp = jlora.init(state, config, key=jax.random.key(0), layout=layout, module_names=["conv", "head"])
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 9, 9, 3)), jnp.float32)
    _assert_runs_unmerged(graphdef, state, lp, x, set() if use_dora else {(3, 3, 3, 8), (8, 4)})


def _assert_rows_run_alone(got, graphdef, state, layout, row_sources: dict, inputs) -> None:
    """Rows of a mixed NNX batch: each row in ``row_sources`` equals its adapter alone (which changes it), every
    other row the base model."""
    from flax import nnx

    base = nnx.merge(graphdef, state)(inputs)
    for row in range(base.shape[0]):
        if row not in row_sources:
            assert rel_err(got[row], base[row]) <= 1e-6
            continue
        alone = jlora.nnx_model(graphdef, jlora.load(state, row_sources[row], layout=layout))(inputs)
        assert rel_err(got[row], alone[row]) <= 1e-5 and rel_err(alone[row], base[row]) > 1e-2


def test_nnx_model_mixed_batch_with_replaced_modules(tmp_path):
    """nnx_model with adapters that replace a Linear (modules_to_save) and embedding rows (trainable tokens):
    each row equals its adapter alone, -1 rows the base model."""
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(16, 8, rngs=rngs)
            self.proj = nnx.Linear(8, 8, rngs=rngs)
            self.lm_head = nnx.Linear(8, 5, rngs=rngs)  # its own head: the table is read by lookups only

        def __call__(self, ids):
            return self.lm_head(jnp.tanh(self.proj(self.embed(ids))))

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    layout = Layout([Rule(r"proj", "proj/kernel", "o i -> i o"), Rule(r"lm_head", "lm_head/kernel", "o i -> i o"),
                     Rule(r"embed", "embed/embedding", "v d -> v d")])
    configs = {"x": jlora.LoraConfig(r=2, target_modules=["proj"], modules_to_save=["lm_head"],
                                     trainable_token_indices={"embed": [1, 4]}, init_lora_weights=False),
               "y": jlora.LoraConfig(r=3, target_modules=["proj"], trainable_token_indices={"embed": [4, 9, 2]},
                                     init_lora_weights=False)}
    sources = {}
    for seed, (name, config) in enumerate(configs.items()):
        lp = jlora.init(state, config, key=jax.random.key(seed), layout=layout,
                        module_names=["embed", "proj", "lm_head"])
        lp = jax.tree_util.tree_map(lambda v: v + 0.3 * jax.random.normal(jax.random.key(seed + 7), v.shape, v.dtype)
                                    if v.ndim else v, lp)  # every tensor moves: replaced ones differ from the base
        sources[name] = jlora.save(lp, tmp_path / name)
    lp = jlora.load(state, sources, layout=layout)
    ids = jnp.array([[1, 4, 9, 3], [2, 4, 1, 0], [9, 9, 1, 4]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = jax.jit(lambda p, a: jlora.nnx_model(graphdef, p, adapter_ids=a)(ids))(lp, jnp.array([1, -1, 0]))
    _assert_rows_run_alone(got, graphdef, state, layout, {0: sources["y"], 2: sources["x"]}, ids)


def test_nnx_model_mixed_batch_on_a_conv(tmp_path):
    """Two adapters of different ranks on an nnx.Conv and a Linear, one mixed batch: each row equals its
    adapter alone, the -1 row the base model."""
    graphdef, state, layout = _nnx_conv_net()
    sources = {}
    for seed, rank in enumerate((2, 3)):
        config = jlora.LoraConfig(r=rank, target_modules=["conv", "head"], init_lora_weights=False)
        lp = jlora.init(state, config, key=jax.random.key(seed), layout=layout, module_names=["conv", "head"])
        sources[f"r{rank}"] = jlora.save(lp, tmp_path / f"r{rank}")
    lp = jlora.load(state, sources, layout=layout)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 9, 9, 3)), jnp.float32)
    got = jax.jit(lambda p, a: jlora.nnx_model(graphdef, p, adapter_ids=a)(x))(lp, jnp.array([1, -1, 0]))
    _assert_rows_run_alone(got, graphdef, state, layout, {0: sources["r3"], 2: sources["r2"]}, x)


def _nnx_scanned_net(layers: int = 3, dim: int = 8):
    """An NNX net whose blocks are stacked (built with nnx.vmap, run with nnx.scan), split, and its layout."""
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(dim, 2 * dim, rngs=rngs)
            self.down = nnx.Linear(2 * dim, dim, rngs=rngs)

        def __call__(self, x):
            return x + self.down(jnp.tanh(self.up(x)))

    class Net(nnx.Module):
        def __init__(self, rngs):
            @nnx.split_rngs(splits=layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def create(rngs):
                return Block(rngs)

            self.blocks = create(rngs)

        def __call__(self, x):
            @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
            def step(block, x):
                return block(x)

            return step(self.blocks, x)

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    layout = Layout([Rule(r"blocks\.(?P<layer>\d+)\.(?P<m>up|down)", "blocks/{m}/kernel", "o i -> layer i o")])
    return graphdef, state, layout


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_nnx_model_runs_stacked_layers_unmerged(use_dora):
    """Blocks built with nnx.vmap and run with nnx.scan (kernels (L, in, out)): the adapter runs unmerged inside
    the scan, each layer with its own slice (LoRA: one layer left untouched), equal to the merged model, with no
    warning, no kernel-sized sum (plain LoRA) and the gradients of the merged-in-call path."""
    from flax import nnx

    graphdef, state, layout = _nnx_scanned_net()
    some_layers = {} if use_dora else dict(layers_to_transform=[0, 2], layers_pattern="blocks")  # DoRA: all layers
    config = jlora.LoraConfig(r=2, target_modules=["up", "down"], init_lora_weights=False, use_dora=use_dora,
                              **some_layers)
    names = [f"blocks.{i}.{m}" for i in range(3) for m in ("up", "down")]
    lp = jlora.init(state, config, key=jax.random.key(0), layout=layout, module_names=names)
    assert lp["blocks"]["up"]["lora_A"].shape == (3, 8, 2)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 8)), jnp.float32)
    _assert_runs_unmerged(graphdef, state, lp, x, set() if use_dora else {(3, 8, 16), (8, 16)}, scan=True)

    trainable, frozen = jlora.split(lp)
    loss = lambda t, model: jnp.sum(jnp.sin(model(jlora.combine(t, frozen))(x)))  # noqa: E731
    unmerged = jax.grad(loss)(trainable, lambda p: jlora.nnx_model(graphdef, p))
    in_call = jax.grad(loss)(trainable, lambda p: nnx.merge(graphdef, jlora.merge(p)))
    for g, h in zip(jax.tree_util.tree_leaves(unmerged), jax.tree_util.tree_leaves(in_call), strict=True):
        assert rel_err(g, h) <= 1e-5


def test_nnx_model_mixed_batch_in_stacked_layers(tmp_path):
    """Several adapters on stacked NNX layers (nnx.vmap + nnx.scan): unmerged inside the scan (no warning, no
    kernel-sized sum), each example with its own adapter's slices of the layer at hand: each row equals its
    adapter alone (ranks 2 and 3, one adapter on some layers only), the -1 row the base model."""
    graphdef, state, layout = _nnx_scanned_net()
    names = [f"blocks.{i}.{m}" for i in range(3) for m in ("up", "down")]
    configs = {"r2": jlora.LoraConfig(r=2, target_modules=["up", "down"], init_lora_weights=False),
               "r3": jlora.LoraConfig(r=3, lora_alpha=5, target_modules=["up"], init_lora_weights=False,
                                      layers_to_transform=[1, 2], layers_pattern="blocks")}
    sources = {name: jlora.save(jlora.init(state, config, key=jax.random.key(seed), layout=layout, module_names=names),
                                tmp_path / name) for seed, (name, config) in enumerate(configs.items())}
    lp = jlora.load(state, sources, layout=layout)
    assert lp["blocks"]["up"]["lora_A"].shape == (3, 2, 8, 3)  # (layers, adapters, in, widest rank)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5, 8)), jnp.float32)
    ids = jnp.array([1, -1, 0])
    forward = lambda p, a: jlora.nnx_model(graphdef, p, adapter_ids=a)(x)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = jax.jit(forward)(lp, ids)
    _assert_rows_run_alone(got, graphdef, state, layout, {0: sources["r3"], 2: sources["r2"]}, x)
    adds = {tuple(e.outvars[0].aval.shape) for e in _all_eqns(jax.make_jaxpr(forward)(lp, ids).jaxpr)
            if e.primitive.name == "add"}
    assert not adds & {(3, 8, 16), (8, 16), (3, 16, 8), (16, 8)}


def test_nnx_model_stacked_layers_draw_a_dropout_mask_per_layer():
    """lora_dropout in stacked NNX layers runs unmerged, one mask per layer (as PEFT's per-layer dropouts): two
    scanned layers x + drop(x) @ I @ I on ones (rate 0.5, kernel zero) give 3 somewhere, which one shared mask
    cannot (only 1 or 9); without a key, no dropout."""
    from flax import nnx

    dim = 64

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(dim, dim, use_bias=False, kernel_init=nnx.initializers.zeros, rngs=rngs)

        def __call__(self, x):
            return x + self.lin(x)

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.blocks = nnx.vmap(Block, in_axes=0, out_axes=0)(rngs.fork(split=2))  # kernels (2, dim, dim)

        def __call__(self, x):
            return nnx.scan(lambda block, x: (block(x), None), in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0))(
                self.blocks, x)[0]

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    layout = Layout([Rule(r"blocks\.(?P<layer>\d+)\.lin", "blocks/lin/kernel", "o i -> layer i o")])
    config = jlora.LoraConfig(r=dim, lora_alpha=dim, lora_dropout=0.5, target_modules=["lin"])
    lp = jlora.init(state, config, key=jax.random.key(1), layout=layout, module_names=["blocks.0.lin", "blocks.1.lin"])
    eye = jnp.broadcast_to(jnp.eye(dim), (2, dim, dim))
    lp["blocks"]["lin"] = lp["blocks"]["lin"].replace(lora_A=eye, lora_B=eye)
    x = jnp.ones((1, dim))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dropped = jax.jit(lambda p, k: jlora.nnx_model(graphdef, p, lora_dropout_key=k)(x))(lp, jax.random.key(2))
        plain = jlora.nnx_model(graphdef, lp)(x)
    assert set(np.unique(np.asarray(dropped))) <= {1.0, 3.0, 9.0} and 3.0 in np.asarray(dropped)
    np.testing.assert_array_equal(plain, np.full((1, dim), 4.0))
