"""Several adapters at once, against PEFT: mixed batches (adapter_names / "__base__") and
add_weighted_adapter (cat, linear, svd); select gives back each adapter exactly."""
from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers as tf
from peft_twin import peft_family, perturb_trainable, rel_err

import jlora
from jlora import side_paths

ADAPTERS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=8, lora_alpha=4, target_modules=["v_proj", "o_proj", "down_proj", "embed_tokens"]),
    "c": dict(r=2, lora_alpha=16, target_modules=["q_proj", "up_proj"], use_rslora=True,
              rank_pattern={"layers.1.self_attn.q_proj": 3}),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multi")
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    base = tf.LlamaForCausalLM(cfg).eval()
    base.save_pretrained(tmp / "base")
    flax_model = tf.FlaxLlamaForCausalLM.from_pretrained(tmp / "base", from_pt=True)
    for i, (name, lora) in enumerate(ADAPTERS.items()):
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **lora))
        perturb_trainable(pm, 10 + i)
        pm.save_pretrained(tmp / name)
    judge = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp / "a", adapter_name="a")
    for name in ("b", "c"):
        judge.load_adapter(tmp / name, adapter_name=name)
    return tmp, base, judge.eval(), flax_model


IDS = np.array([[1, 5, 9, 3, 60, 2, 7], [4, 4, 8, 11, 0, 33, 12], [9, 8, 7, 6, 5, 4, 3], [2, 2, 2, 30, 31, 32, 1]],
               np.int32)


@pytest.fixture(params=["gathered copies", "one example at a time"])
def per_example(request, monkeypatch):
    """Both forms of a replaced module's per-example parameters in mixed batches (small ones are gathered for
    all examples at once; past side_paths.PER_EXAMPLE_COPY_LIMIT bytes they run one example at a time)."""
    if request.param == "one example at a time":
        monkeypatch.setattr(side_paths, "PER_EXAMPLE_COPY_LIMIT", 0)
    return request.param


def torch_out(model, **kw):
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(IDS).long(), **kw).logits.numpy()


def test_mixed_batch_matches_peft(setup):
    tmp, _, judge, flax_model = setup
    want = torch_out(judge, adapter_names=["a", "b", "c", "__base__"])
    lp = jlora.load(flax_model.params, {name: tmp / name for name in ADAPTERS})
    fwd = jax.jit(jlora.wrap(flax_model.__call__))
    got = fwd(IDS, params=lp, adapter_ids=jnp.array([0, 1, 2, -1])).logits
    assert rel_err(got, want) <= 1e-4
    # each row equals running that adapter alone
    for row, name in enumerate(ADAPTERS):
        alone = fwd(IDS, params=jlora.load(flax_model.params, tmp / name)).logits
        assert rel_err(got[row], alone[row]) <= 1e-5
    assert rel_err(got[3], flax_model(IDS, params=flax_model.params).logits[3]) <= 1e-6
    # other assignments reuse the compiled function and stay right
    again = fwd(IDS, params=lp, adapter_ids=jnp.array([2, -1, 0, 1])).logits
    assert rel_err(again, torch_out(judge, adapter_names=["c", "__base__", "a", "b"])) <= 1e-4


def test_select_is_the_single_adapter(setup):
    tmp, _, _, flax_model = setup
    lp = jlora.load(flax_model.params, {name: tmp / name for name in ADAPTERS})
    for name in ADAPTERS:
        alone = jlora.load(flax_model.params, tmp / name)
        picked = jlora.select(lp, name)
        assert jax.tree_util.tree_structure(picked) == jax.tree_util.tree_structure(alone)
        for x, y in zip(jax.tree_util.tree_leaves(picked), jax.tree_util.tree_leaves(alone)):
            np.testing.assert_array_equal(x, y)


def test_multi_adapter_errors(setup):
    tmp, _, _, flax_model = setup
    lp = jlora.load(flax_model.params, {name: tmp / name for name in ADAPTERS})
    with pytest.raises(jlora.AdapterError, match="adapter_ids"):
        jlora.wrap(flax_model.__call__)(IDS, params=lp)
    with pytest.raises(jlora.AdapterError, match="select"):
        jlora.merge(lp)
    with pytest.raises(jlora.AdapterError, match="select"):
        jlora.save(lp, tmp / "nope")
    with pytest.raises(jlora.AdapterError, match="no adapter named"):
        jlora.select(lp, "zzz")


def test_mixed_batch_with_lora_bias_matches_peft(tmp_path):
    """An adapter with lora_bias (PEFT's mixed batches run lora_B with its bias) beside one without, on a
    Llama with attention biases."""
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, attention_bias=True)
    torch.manual_seed(0)
    base = tf.LlamaForCausalLM(cfg).eval()
    base.save_pretrained(tmp_path / "base")
    flax_model = tf.FlaxLlamaForCausalLM.from_pretrained(tmp_path / "base", from_pt=True)
    loras = {"plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
             "biased": dict(r=3, lora_alpha=9, target_modules=["q_proj", "o_proj"], lora_bias=True)}
    judge = peft_family(tmp_path, base, loras, seed=20)
    want = torch_out(judge, adapter_names=["biased", "plain", "__base__", "biased"])
    sources = {name: tmp_path / name for name in loras}
    lp = jlora.load(flax_model.params, sources)
    got = jax.jit(jlora.wrap(flax_model.__call__))(IDS, params=lp, adapter_ids=jnp.array([1, 0, -1, 1])).logits
    assert rel_err(got, want) <= 1e-4
    for name, source in sources.items():  # select gives back each adapter, lora_B bias included
        alone, picked = jlora.load(flax_model.params, source), jlora.select(lp, name)
        assert jax.tree_util.tree_structure(picked) == jax.tree_util.tree_structure(alone)
        for x, y in zip(jax.tree_util.tree_leaves(picked), jax.tree_util.tree_leaves(alone)):
            np.testing.assert_array_equal(x, y)


def test_linear_needs_equal_ranks_in_every_module(setup, tmp_path):
    tmp, base, _, flax_model = setup
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        init_lora_weights=False, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
        rank_pattern={"layers.1.self_attn.q_proj": 2, "layers.0.self_attn.v_proj": 3}))
    pm.save_pretrained(tmp_path / "d")
    lp = jlora.load(flax_model.params, {"a": tmp / "a", "d": tmp_path / "d"})  # both r=4 at the config level
    with pytest.raises(jlora.AdapterError, match="equal ranks in every module") as err:
        jlora.add_weighted(lp, {"a": 0.5, "d": 0.5}, method="linear")
    assert sorted(err.value.problems) == ["model.layers.0.self_attn.v_proj: ranks [4, 3]",
                                          "model.layers.1.self_attn.q_proj: ranks [4, 2]"]


@pytest.mark.parametrize("method,names,weights", [
    ("cat", ["a", "b", "c"], [0.7, 0.3, -0.5]),
    ("linear", ["a", "b"], [0.6, 0.9]),  # linear needs equal ranks: b is reloaded at rank 4 below
    ("svd", ["a", "b", "c"], [1.0, 0.5, 0.25]),
])
def test_add_weighted_matches_peft(setup, tmp_path, method, names, weights):
    tmp, base, _, flax_model = setup
    sources = {name: tmp / name for name in names}
    if method == "linear":
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, r=4, lora_alpha=2,
                                                                      target_modules=["v_proj", "q_proj"]))
        perturb_trainable(pm, 99)
        pm.save_pretrained(tmp_path / "b4")
        sources["b"] = tmp_path / "b4"
    judge = peft.PeftModel.from_pretrained(copy.deepcopy(base), sources[names[0]], adapter_name=names[0])
    for name in names[1:]:
        judge.load_adapter(sources[name], adapter_name=name)
    judge.add_weighted_adapter(names, weights, "blend", combination_type=method)
    judge.set_adapter("blend")
    want = torch_out(judge.eval())

    lp = jlora.load(flax_model.params, sources)
    blend = jlora.add_weighted(lp, dict(zip(names, weights)), method=method)
    got = jax.jit(jlora.wrap(flax_model.__call__))(IDS, params=blend).logits
    tol = 1e-4 if method != "svd" else 1e-3  # svd: both sides truncate the same spectrum in float32
    assert rel_err(got, want) <= tol
    assert rel_err(got, torch_out(base)) > 1e-2
    out = jlora.save(blend, tmp_path / "blend")  # and PEFT reads the combination back
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    assert rel_err(got, torch_out(again)) <= 1e-4


def _assert_select_gives_back(flax_params, lp, sources: dict) -> None:
    for name, source in sources.items():
        alone, picked = jlora.load(flax_params, source), jlora.select(lp, name)
        assert jax.tree_util.tree_structure(picked) == jax.tree_util.tree_structure(alone)
        for x, y in zip(jax.tree_util.tree_leaves(picked), jax.tree_util.tree_leaves(alone)):
            np.testing.assert_array_equal(x, y)


CLASSIFIERS = {  # SEQ_CLS: PEFT also saves each adapter's classifier (modules_to_save)
    "trainable_tokens": {
        "a": dict(r=4, lora_alpha=8, target_modules=["query", "value"], trainable_token_indices=[3, 5]),
        "b": dict(r=2, lora_alpha=4, target_modules=["key", "dense"], trainable_token_indices=[7, 3, 60])},
    "saved_embedding": {
        "a": dict(r=3, lora_alpha=3, target_modules=["query"], modules_to_save=["word_embeddings"]),
        "b": dict(r=2, lora_alpha=5, target_modules=["value"], modules_to_save=["word_embeddings"])},
}


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bert")
    cfg = tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, num_labels=3)
    torch.manual_seed(0)
    base = tf.BertForSequenceClassification(cfg).eval()
    base.save_pretrained(tmp / "base")
    return base, tf.FlaxBertForSequenceClassification.from_pretrained(tmp / "base", from_pt=True)


@pytest.mark.parametrize("kind", CLASSIFIERS)
def test_mixed_batch_of_classifiers_matches_peft(bert, tmp_path, kind):
    """Classification adapters in one mixed batch: each example runs its adapter's LoRA, classifier (PEFT's
    modules_to_save) and trainable tokens or embedding table, as PEFT's adapter_names; select gives back
    each adapter; add_weighted refuses replaced tensors."""
    base, flax_model = bert
    loras = {name: {**lora, "task_type": "SEQ_CLS"} for name, lora in CLASSIFIERS[kind].items()}
    judge = peft_family(tmp_path, base, loras, seed=30)
    sources = {name: tmp_path / name for name in loras}
    lp = jlora.load(flax_model.params, sources)
    assert lp["classifier"]["by_adapter_kernel"].shape == (2, 32, 3)
    table = lp["bert"]["embeddings"]["word_embeddings"]  # trainable tokens alone: no per-adapter copy of the table
    assert ("by_adapter_embedding" in table) == (kind == "saved_embedding")
    fwd = jax.jit(jlora.wrap(flax_model.__call__))
    for names in (["b", "a", "__base__", "b"], ["__base__", "b", "a", "a"]):
        with torch.no_grad():
            want = judge(input_ids=torch.as_tensor(IDS).long(), adapter_names=names).logits.numpy()
        ids = jnp.array([list(loras).index(n) if n in loras else -1 for n in names])
        got = fwd(IDS, params=lp, adapter_ids=ids).logits
        assert rel_err(got, want) <= 1e-4
    for row, name in enumerate(["b", "a"]):  # the rows differ between adapters, and from the base model
        alone = fwd(IDS, params=jlora.load(flax_model.params, sources[name])).logits
        assert rel_err(got[row + 1], alone[row + 1]) <= 1e-5
    assert rel_err(got[1:3], flax_model(IDS).logits[1:3]) > 1e-2
    _assert_select_gives_back(flax_model.params, lp, sources)
    with pytest.raises(jlora.AdapterError, match="replace tensors") as err:
        jlora.add_weighted(lp, {"a": 0.5, "b": 0.5})
    assert "classifier" in err.value.problems


def test_mixed_batch_where_one_adapter_keeps_the_module(setup, tmp_path, per_example):
    """A module only some adapters replace (lm_head in modules_to_save, trainable tokens): the others run the
    base module there, so each row equals its adapter alone (PEFT's mixed batches fail with a KeyError here)."""
    tmp, base, _, flax_model = setup
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        init_lora_weights=False, r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"],
        trainable_token_indices=[1, 8, 33]))
    perturb_trainable(pm, 40)
    pm.save_pretrained(tmp_path / "x")
    sources = {"x": tmp_path / "x", "a": tmp / "a"}
    lp = jlora.load(flax_model.params, sources)
    fwd = jax.jit(jlora.wrap(flax_model.__call__))
    got = np.asarray(fwd(IDS, params=lp, adapter_ids=jnp.array([0, 1, -1, 0])).logits)
    program = str(jax.make_jaxpr(jlora.wrap(flax_model.__call__))(IDS, params=lp, adapter_ids=jnp.array([0, 1, -1, 0])))
    assert ("scan[" in program) == (per_example == "one example at a time")  # (lax.map runs as a scan)
    for rows, name in (([0, 3], "x"), ([1], "a")):
        alone = np.asarray(fwd(IDS, params=jlora.load(flax_model.params, sources[name])).logits)
        assert rel_err(got[rows], alone[rows]) <= 1e-5
    assert rel_err(got[2], flax_model(IDS, params=flax_model.params).logits[2]) <= 1e-6
    judge = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "x").eval()
    assert rel_err(got[[0, 3]], torch_out(judge)[[0, 3]]) <= 1e-4
    _assert_select_gives_back(flax_model.params, lp, sources)


def test_mixed_batch_with_saved_tied_embedding_matches_peft(tmp_path):
    """GPT-2 ties its output head to wte: adapters that save their own wte (modules_to_save) look tokens up in
    their table while the head keeps the base one, as in PEFT; trainable tokens there are refused (the tied head
    would need each example's rows)."""
    from test_parity_models import gpt2

    torch_cls, flax_cls, cfg = gpt2()
    torch.manual_seed(0)
    base = torch_cls(cfg).eval()
    base.save_pretrained(tmp_path / "base")
    flax_model = flax_cls.from_pretrained(tmp_path / "base", from_pt=True)
    loras = {"a": dict(r=4, lora_alpha=8, target_modules=["c_attn"], modules_to_save=["wte"], fan_in_fan_out=True),
             "b": dict(r=2, lora_alpha=8, target_modules=["c_fc"], modules_to_save=["wte"], fan_in_fan_out=True)}
    judge = peft_family(tmp_path, base, loras, seed=50)
    names = ["a", "__base__", "b", "b"]
    with torch.no_grad():
        want = judge(input_ids=torch.as_tensor(IDS).long(), adapter_names=names).logits.numpy()
    sources = {name: tmp_path / name for name in loras}
    lp = jlora.load(flax_model.params, sources)
    got = jax.jit(jlora.wrap(flax_model.__call__))(IDS, params=lp, adapter_ids=jnp.array([0, -1, 1, 1])).logits
    assert rel_err(got, want) <= 1e-4
    _assert_select_gives_back(flax_model.params, lp, sources)  # each with its base_table for the head
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["c_fc"], fan_in_fan_out=True,
                                                                  trainable_token_indices=[3]))
    pm.save_pretrained(tmp_path / "tokens")
    with pytest.raises(jlora.AdapterError, match="trainable tokens on an embedding that the output head may read"):
        jlora.load(flax_model.params, {"a": tmp_path / "a", "tokens": tmp_path / "tokens"})


def test_mixed_batch_refuses_lora_and_replacement_on_one_module(setup, tmp_path):
    tmp, base, _, flax_model = setup
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                                  modules_to_save=["embed_tokens"]))
    pm.save_pretrained(tmp_path / "saved")  # adapter b puts LoRA on embed_tokens
    with pytest.raises(jlora.AdapterError, match="some adapters put LoRA on it, others replace its tensors"):
        jlora.load(flax_model.params, {"b": tmp / "b", "saved": tmp_path / "saved"})


def test_mixed_batch_on_convolutions_matches_peft(tmp_path):
    """ViT adapters on the patch convolution (different ranks), attention and their own classifiers: each image
    runs its adapter's conv (per-example (kh, kw, in, r) slices), as PEFT's adapter_names."""
    cfg = tf.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=48, num_labels=3)
    torch.manual_seed(0)
    base = tf.ViTForImageClassification(cfg).eval()
    base.save_pretrained(tmp_path / "base")
    flax_model = tf.FlaxViTForImageClassification.from_pretrained(tmp_path / "base", from_pt=True)
    loras = {"a": dict(r=4, lora_alpha=8, target_modules=["projection", "query"], modules_to_save=["classifier"]),
             "b": dict(r=2, lora_alpha=6, target_modules=["projection", "value"], modules_to_save=["classifier"],
                       lora_bias=True)}
    judge = peft_family(tmp_path, base, loras, seed=60)
    pixels = np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32)
    names = ["b", "__base__", "a"]
    with torch.no_grad():
        want = judge(pixel_values=torch.as_tensor(pixels), adapter_names=names).logits.numpy()
    lp = jlora.load(flax_model.params, {name: tmp_path / name for name in loras})
    got = jax.jit(jlora.wrap(flax_model.__call__))(pixels, params=lp, adapter_ids=jnp.array([1, -1, 0])).logits
    assert rel_err(got, want) <= 1e-4
    with torch.no_grad():
        base_logits = base(pixel_values=torch.as_tensor(pixels)).logits.numpy()
        assert rel_err(np.asarray(got)[[0, 2]], base_logits[[0, 2]]) > 1e-2


def test_generate_with_mixed_adapters_matches_peft(setup):
    """Greedy generation (transformers' Flax generate, KV cache) through jlora.wrap, one adapter per row: the
    tokens PEFT's generate(adapter_names=...) produces."""
    tmp, _, judge, flax_model = setup
    prompt = IDS[:, :4]
    names = ["c", "__base__", "a", "b"]
    with torch.no_grad():
        want = judge.generate(input_ids=torch.as_tensor(prompt).long(), attention_mask=torch.ones(prompt.shape),
                              max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0,
                              adapter_names=names).numpy()
    lp = jlora.load(flax_model.params, {name: tmp / name for name in ADAPTERS})
    generate = jlora.wrap(flax_model.generate)
    got = generate(prompt, params=lp, adapter_ids=jnp.array([2, -1, 0, 1]), max_new_tokens=6, do_sample=False,
                   eos_token_id=None, pad_token_id=0).sequences
    np.testing.assert_array_equal(np.asarray(got), want)
    base = flax_model.generate(prompt, params=flax_model.params, max_new_tokens=6, do_sample=False, eos_token_id=None,
                               pad_token_id=0).sequences
    assert (np.asarray(base)[[0, 2, 3], 4:] != want[[0, 2, 3], 4:]).any()  # the adapters change the tokens


def test_gradients_of_a_mixed_batch_are_each_adapters_own(setup, tmp_path, per_example):
    """Training several adapters in one batch: the gradient of a mixed batch's loss reaches each adapter's
    factors (and its lm_head copy and token rows) exactly as the loss of its own rows does when that adapter
    runs alone; padding columns get none."""
    tmp, base, _, flax_model = setup
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        init_lora_weights=False, r=3, lora_alpha=6, target_modules=["q_proj", "down_proj"], modules_to_save=["lm_head"],
        trainable_token_indices=[1, 8, 33]))
    perturb_trainable(pm, 70)
    pm.save_pretrained(tmp_path / "x")
    sources = {"a": tmp / "a", "x": tmp_path / "x", "c": tmp / "c"}
    fwd = jlora.wrap(flax_model.__call__)
    ids, rows = jnp.array([2, -1, 0, 1]), {"c": [0], "a": [2], "x": [3]}

    def loss(trainable, frozen, adapter_rows, **kw):
        logits = fwd(IDS, params=jlora.combine(trainable, frozen), **kw).logits
        return jnp.sum(jnp.tanh(logits[adapter_rows]))

    lp = jlora.load(flax_model.params, sources)
    mixed = jax.grad(loss)(*jlora.split(lp), jnp.array([0, 2, 3]), adapter_ids=ids)
    compared = 0
    for index, name in enumerate(sources):
        alone_lp = jlora.load(flax_model.params, sources[name])
        alone = jax.grad(loss)(*jlora.split(alone_lp), jnp.array(rows[name]))
        for path, node in jlora.tree.adapted_modules(alone):
            grads = jlora.tree.get_path(mixed, path)
            for key, g in node.items():
                if g is None or key == "lora_scale":
                    continue
                if key in ("lora_A", "lora_B"):
                    got = grads[key][index]
                    r = g.shape[-1] if key == "lora_A" else g.shape[0]
                    got = got[..., :r] if key == "lora_A" else got[:r]
                elif key == "token_delta":
                    got = grads["by_adapter_token_delta"][index, :g.shape[0]]
                else:
                    got = grads["by_adapter_" + key][index]
                np.testing.assert_allclose(got, g, rtol=2e-4, atol=1e-6)
                compared += 1
    assert compared >= 20
    q = mixed["model"]["layers"]["1"]["self_attn"]["q_proj"]["lora_A"]  # c has rank 3 there, x rank 3, a rank 4
    assert q.shape[-1] == 4 and float(jnp.abs(q[2, :, 3]).max()) == 0.0  # c's padding column: no gradient
