"""load/wrap/merge as pure functions: inputs untouched, base arrays shared, no recompiles."""
from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
from adapter_files import llama_lora_tensors, tiny_llama, write_adapter

import jlora


def _leaves_by_path(tree):
    return {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_load_is_pure_and_shares_base_arrays(tmp_path):
    model = tiny_llama()
    params = model.params
    before = _leaves_by_path(params)
    lp = jlora.load(params, write_adapter(tmp_path / "a"))
    after = _leaves_by_path(params)
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)
    assert "lora_A" not in params["model"]["layers"]["0"]["self_attn"]["q_proj"]
    q = lp["model"]["layers"]["0"]["self_attn"]["q_proj"]
    assert q["kernel"] is params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert lp["model"]["embed_tokens"] is params["model"]["embed_tokens"]  # untouched subtrees shared
    assert q["lora_A"].shape == (32, 4) and q["lora_B"].shape == (4, 32)
    assert float(q["lora_scale"]) == 2.0 and q.spec.peft_name == "model.layers.0.self_attn.q_proj"


def test_merge_and_wrap_do_not_modify_numpy_params(tmp_path):
    model = tiny_llama()
    params = jax.tree_util.tree_map(np.array, model.params)
    copies = jax.tree_util.tree_map(np.copy, params)
    lp = jlora.load(params, write_adapter(tmp_path / "a"))
    jlora.merge(lp)
    ids = np.array([[1, 2, 3]], np.int32)
    jlora.wrap(model.__call__)(ids, params=lp)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(copies)):
        np.testing.assert_array_equal(a, b)


def test_merge_formula(tmp_path):
    model = tiny_llama()
    tensors = llama_lora_tensors()
    lp = jlora.load(model.params, write_adapter(tmp_path / "a", tensors=tensors))
    merged = jlora.merge(lp)
    name = "base_model.model.model.layers.1.self_attn.v_proj"
    a, b = tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"]
    kernel = np.asarray(model.params["model"]["layers"]["1"]["self_attn"]["v_proj"]["kernel"], np.float64)
    want = kernel + 2.0 * (b.astype(np.float64) @ a).T
    # float32 rounding, relative to the kernel's scale: an entry near zero is a difference of larger terms
    np.testing.assert_allclose(merged["model"]["layers"]["1"]["self_attn"]["v_proj"]["kernel"], want, rtol=1e-6,
                               atol=1e-6 * np.abs(want).max())
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(model.params)


def test_new_adapter_values_do_not_recompile(tmp_path):
    model = tiny_llama()
    traces = []

    def forward(ids, params):
        traces.append(1)
        return model(ids, params=params).logits

    fwd = jax.jit(jlora.wrap(forward))
    ids = jnp.array([[1, 2, 3]], jnp.int32)
    lp1 = jlora.load(model.params, write_adapter(tmp_path / "a", tensors=llama_lora_tensors(seed=1)))
    lp2 = jlora.load(model.params, write_adapter(tmp_path / "b", tensors=llama_lora_tensors(seed=2)))
    out1, out2 = fwd(ids, lp1), fwd(ids, lp2)
    assert not np.allclose(out1, out2)
    assert len(traces) == 2  # one abstract probe + one real trace, both in the first call only
    fwd(ids, lp1)
    assert len(traces) == 2


def test_int_keyed_tree_loads_and_merges(tmp_path):
    """NNX-style pure dicts use int keys for layer lists."""
    model = tiny_llama()
    params = dict(model.params)
    params["model"] = dict(params["model"])
    params["model"]["layers"] = {int(k): v for k, v in params["model"]["layers"].items()}
    lp = jlora.load(params, write_adapter(tmp_path / "a"))
    assert "lora_A" in lp["model"]["layers"][1]["self_attn"]["q_proj"]
    merged = jlora.merge(lp)
    assert set(merged["model"]["layers"]) == {0, 1}


def test_base_class_tree_without_prefix(tmp_path):
    """A FlaxLlamaModel tree has no 'model' prefix; the adapter (made on LlamaForCausalLM) still fits."""
    model = tiny_llama()
    lp = jlora.load(model.params["model"], write_adapter(tmp_path / "a"))
    assert "lora_B" in lp["layers"]["0"]["self_attn"]["v_proj"]


def test_place_merge_wrap_modify_nothing_with_replacements_dora_and_tokens():
    """numpy params, numpy adapter tensors and the config all come back unchanged, also for the paths that
    replace tensors (modules_to_save, trainable-token rows) and DoRA."""
    model = tiny_llama()
    params = jax.tree_util.tree_map(np.array, model.params)
    tensors = llama_lora_tensors()
    rng = np.random.default_rng(3)
    for i in range(2):
        for m, out in (("q_proj", 32), ("v_proj", 16)):
            tensors[f"base_model.model.model.layers.{i}.self_attn.{m}.lora_magnitude_vector"] = (
                1 + rng.random(out)).astype(np.float32)
    tensors["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"] = rng.standard_normal(
        (2, 32)).astype(np.float32)
    tensors["base_model.model.lm_head.weight"] = rng.standard_normal((64, 32)).astype(np.float32)
    config = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True,
                              trainable_token_indices={"embed_tokens": [1, 3]}, modules_to_save=["lm_head"])
    before = (jax.tree_util.tree_map(np.copy, params), {k: v.copy() for k, v in tensors.items()}, config.to_json())
    lp = jlora.place(params, config, tensors)
    merged = jlora.merge(lp)
    jlora.wrap(model.__call__)(np.array([[1, 2, 3]], np.int32), params=lp)
    table = params["model"]["embed_tokens"]["embedding"]
    assert not np.array_equal(merged["model"]["embed_tokens"]["embedding"][1], table[1])  # the token row merged
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(before[0])):
        np.testing.assert_array_equal(a, b)
    assert tensors.keys() == before[1].keys() and all(np.array_equal(tensors[k], before[1][k]) for k in tensors)
    assert config.to_json() == before[2]


def _aligned_safetensors(path, tensors: dict) -> int:
    """A valid safetensors file whose data starts 64-byte aligned (every tensor here is a multiple of 64
    bytes, so each one is aligned too: what jax needs to alias host memory on CPU). Returns the data start."""
    import json
    entries, offset = {}, 0
    for key, value in tensors.items():
        entries[key] = {"dtype": "F32", "shape": list(value.shape), "data_offsets": [offset, offset + value.nbytes]}
        offset += value.nbytes
    header = json.dumps(entries).encode()
    header += b" " * (-(8 + len(header)) % 64)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header + b"".join(v.tobytes() for v in tensors.values()))
    return 8 + len(header)


def test_loaded_arrays_do_not_alias_the_file(tmp_path):
    """Rewriting the adapter file in place (as torch/safetensors savers do) must not change loaded arrays."""
    rng = np.random.default_rng(0)
    tensors = llama_lora_tensors()
    for i in range(2):  # float32 DoRA magnitudes: contiguous in the file, placed without a cast or transpose
        for m, out in (("q_proj", 32), ("v_proj", 16)):
            tensors[f"base_model.model.model.layers.{i}.self_attn.{m}.lora_magnitude_vector"] = (
                1 + rng.random(out)).astype(np.float32)
    folder = write_adapter(tmp_path / "a", {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True,
                                            "target_modules": ["q_proj", "v_proj"]}, tensors=False)
    start = _aligned_safetensors(folder / "adapter_model.safetensors", tensors)
    lp = jlora.load(tiny_llama().params, folder)
    before = jax.tree_util.tree_map(np.array, lp)
    with open(folder / "adapter_model.safetensors", "r+b") as f:  # same inode, new bytes
        f.seek(start)
        f.write(b"\0" * sum(v.nbytes for v in tensors.values()))
    after = jax.tree_util.tree_map(np.asarray, lp)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(before)[0], jax.tree_util.tree_leaves(after)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_loading_many_adapters_shows_progress(tmp_path, capsys):
    """Eight or more adapters in one load: a progress bar on stderr (fewer: none)."""
    params = tiny_llama().params
    many = importlib.import_module("jlora.load").MANY_ADAPTERS  # (the module: jlora.load is the function)
    folders = {f"a{i}": write_adapter(tmp_path / f"a{i}") for i in range(many)}
    jlora.load(params, dict(list(folders.items())[:2]))
    assert "jlora: loading adapters" not in capsys.readouterr().err
    lp = jlora.load(params, folders)
    err = capsys.readouterr().err
    assert "jlora: loading adapters" in err and f"{len(folders)}/{len(folders)}" in err
    assert len(lp["model"]["layers"]["0"]["self_attn"]["q_proj"].spec.adapters) == len(folders)
