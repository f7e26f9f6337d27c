"""Hot swap: adapters with the same targets share one compiled function, whatever their lora_alpha,
config text or (with pad_rank) rank; outputs stay those of each adapter; saved files stay right."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from adapter_files import llama_lora_tensors, tiny_llama, write_adapter
from safetensors.numpy import load_file

import jlora

IDS = jnp.array([[1, 2, 3, 4]], jnp.int32)


def _config(**kw) -> dict:
    return {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **kw}


def _counted_forward(model):
    traces = []

    def forward(ids, params):
        traces.append(1)
        return model(ids, params=params).logits

    return jax.jit(jlora.wrap(forward)), traces


def test_other_alpha_rslora_and_config_text_reuse_the_compiled_function(tmp_path):
    model = tiny_llama()
    fwd, traces = _counted_forward(model)
    variants = [_config(),
                _config(lora_alpha=32, base_model_name_or_path="someone/else", revision="v2"),
                _config(lora_alpha=3, use_rslora=True, alpha_pattern={"v_proj": 5})]
    outs = []
    for i, config in enumerate(variants):
        lp = jlora.load(model.params, write_adapter(tmp_path / str(i), config, llama_lora_tensors(seed=i)))
        outs.append(fwd(IDS, lp))
        want = model(IDS, params=jlora.merge(lp)).logits  # each adapter's own scale, not the first one's
        np.testing.assert_allclose(outs[-1], want, rtol=2e-5, atol=2e-5)
    assert len(traces) == 2  # one abstract probe + one trace, both for the first adapter only
    assert not np.allclose(outs[0], outs[1])


def test_pad_rank_shares_the_compiled_function_across_ranks(tmp_path):
    model = tiny_llama()
    fwd, traces = _counted_forward(model)
    for r in (4, 2, 8):
        folder = write_adapter(tmp_path / f"r{r}", _config(r=r, lora_alpha=2 * r), llama_lora_tensors(r=r, seed=r))
        padded = jlora.load(model.params, folder, pad_rank=8)
        plain = jlora.load(model.params, folder)
        q = padded["model"]["layers"]["0"]["self_attn"]["q_proj"]
        assert q["lora_A"].shape == (32, 8) and q["lora_B"].shape == (8, 32)
        np.testing.assert_allclose(fwd(IDS, padded), model(IDS, params=jlora.merge(plain)).logits,
                                   rtol=2e-5, atol=2e-5)
        jlora.save(padded, tmp_path / f"saved{r}")  # padding dropped: the file's own tensors come back
        saved = load_file(str(tmp_path / f"saved{r}" / "adapter_model.safetensors"))
        assert {k: v.tolist() for k, v in saved.items()} \
            == {k: v.tolist() for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}
    assert len(traces) == 2


def test_pad_rank_smaller_than_a_rank_lists_every_module(tmp_path):
    model = tiny_llama()
    with pytest.raises(jlora.AdapterError) as err:
        jlora.load(model.params, write_adapter(tmp_path / "a"), pad_rank=3)
    assert len(err.value.problems) == 4 and all("rank 4" in p for p in err.value.problems)
    with pytest.raises(jlora.AdapterError, match="pad_rank"):
        jlora.load(model.params, write_adapter(tmp_path / "b"), pad_rank=0)


def test_stale_config_from_a_jitted_step_is_caught_and_combine_repairs_it(tmp_path):
    """jit outputs keep the config text of the adapter they were compiled for; save refuses such a tree,
    and combine(trainable, frozen) takes the metadata from this adapter's own frozen part."""
    model = tiny_llama()
    tx = optax.sgd(0.0)  # a step that changes nothing, so the saved tensors can be compared exactly

    @jax.jit
    def step(lp):
        trainable, frozen = jlora.split(lp)
        grads = jax.tree_util.tree_map(jnp.zeros_like, trainable)
        updates, _ = tx.update(grads, tx.init(trainable))
        return optax.apply_updates(trainable, updates), jlora.combine(optax.apply_updates(trainable, updates), frozen)

    first = jlora.load(model.params, write_adapter(tmp_path / "a", _config()))
    step(first)
    second_dir = write_adapter(tmp_path / "b", _config(lora_alpha=16), llama_lora_tensors(seed=5))
    second = jlora.load(model.params, second_dir)
    trained, whole = step(second)  # compiled for `first`: the outputs carry first's config text
    with pytest.raises(jlora.AdapterError, match="lora_scale") as err:
        jlora.save(whole, tmp_path / "stale")
    assert len(err.value.problems) == 4
    assert not (tmp_path / "stale" / "adapter_config.json").exists()
    _, frozen = jlora.split(second)
    out = jlora.save(jlora.combine(trained, frozen), tmp_path / "fresh")
    assert json.loads((out / "adapter_config.json").read_text())["lora_alpha"] == 16


def test_stale_rank_from_a_jitted_step_with_pad_rank_is_caught(tmp_path):
    model = tiny_llama()
    step = jax.jit(lambda lp: lp)  # outputs keep the metadata of the adapter it was compiled for
    small = write_adapter(tmp_path / "r2", _config(r=2, lora_alpha=4), llama_lora_tensors(r=2, seed=1))
    step(jlora.load(model.params, small, pad_rank=8))
    big_dir = write_adapter(tmp_path / "r4", _config(r=4, lora_alpha=8), llama_lora_tensors(r=4, seed=2))
    big = jlora.load(model.params, big_dir, pad_rank=8)
    with pytest.raises(jlora.AdapterError, match="padding past its rank 2"):
        jlora.save(step(big), tmp_path / "stale")
    assert not (tmp_path / "stale" / "adapter_model.safetensors").exists()
    trainable, frozen = jlora.split(step(big))
    _, own_frozen = jlora.split(big)
    out = jlora.save(jlora.combine(trainable, own_frozen), tmp_path / "fresh")
    assert load_file(str(out / "adapter_model.safetensors")).keys() == load_file(
        str(big_dir / "adapter_model.safetensors")).keys()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4


def test_mixed_trees_swap_adapters_without_recompiling(tmp_path):
    """Several adapters in one tree (pad_rank for equal widths): other values, lora_alpha and ranks under the
    same names reuse the compiled mixed-batch function, and each row stays its adapter's."""
    model = tiny_llama()
    fwd, traces = _counted_forward(model)
    ids, adapter_ids = jnp.array([[1, 2, 3, 4], [5, 6, 7, 8]], jnp.int32), jnp.array([1, 0])
    for i, (r_a, r_b) in enumerate([(4, 2), (8, 4), (2, 8)]):
        sources = {"a": write_adapter(tmp_path / f"a{i}", _config(r=r_a, lora_alpha=3 * r_a),
                                      llama_lora_tensors(r=r_a, seed=10 + i)),
                   "b": write_adapter(tmp_path / f"b{i}", _config(r=r_b, lora_alpha=5 + i),
                                      llama_lora_tensors(r=r_b, seed=20 + i))}
        got = fwd(ids, jlora.load(model.params, sources, pad_rank=8), adapter_ids=adapter_ids)
        for row, name in ((0, "b"), (1, "a")):
            want = model(ids, params=jlora.merge(jlora.load(model.params, sources[name]))).logits[row]
            np.testing.assert_allclose(got[row], want, rtol=2e-5, atol=2e-5)
    assert len(traces) == 2  # one abstract probe + one trace, for the first pair only
