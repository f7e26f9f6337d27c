"""adapter_model.bin (PEFT's older pickle format): refused by default, read with torch.load(weights_only=True)
when allow_pickle=True, and never a way to run code."""
from __future__ import annotations

import os
import pickle
import sys

import jax
import numpy as np
import pytest
import torch
from adapter_files import tiny_llama, write_adapter
from peft_twin import perturb_trainable

import jlora


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """The same PEFT adapter (bfloat16) saved twice: as safetensors and as a pickle (safe_serialization=False)."""
    import peft
    import transformers as tf

    tmp = tmp_path_factory.mktemp("pickle")
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = peft.get_peft_model(tf.LlamaForCausalLM(cfg), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    perturb_trainable(model, seed=1)
    model.to(torch.bfloat16)
    model.save_pretrained(tmp / "safe")
    model.save_pretrained(tmp / "pickled", safe_serialization=False)
    assert sorted(os.listdir(tmp / "pickled")) == ["README.md", "adapter_config.json", "adapter_model.bin"]
    return tmp / "safe", tmp / "pickled"


@pytest.fixture(scope="module")
def params():
    return tiny_llama().params


def test_pickle_is_refused_by_default(adapters, params):
    with pytest.raises(jlora.CheckpointError, match="adapter_model.bin.*allow_pickle=True"):
        jlora.load(params, adapters[1])


def test_allow_pickle_reads_the_same_adapter(adapters, params):
    safe, pickled = adapters
    want = jlora.load(params, safe)
    got = jlora.load(params, pickled, allow_pickle=True)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jlora.to_peft_tensors(got).keys() == jlora.to_peft_tensors(want).keys()


def test_safetensors_wins_over_the_pickle(adapters, params, tmp_path):
    folder = write_adapter(tmp_path / "both")
    (folder / "adapter_model.bin").write_bytes(b"never read")
    assert jlora.load(params, folder, allow_pickle=True) is not None


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pickle_that_runs_code_is_refused_and_runs_nothing(params, tmp_path, monkeypatch):
    folder = write_adapter(tmp_path / "evil", tensors=False)
    (folder / "adapter_model.bin").write_bytes(pickle.dumps({"x": _RunsCode()}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(jlora.CheckpointError, match="weights-only"):
        jlora.load(params, folder, allow_pickle=True)
    assert not (tmp_path / "pwned").exists()


def test_pickle_of_non_tensors_and_garbage(params, tmp_path):
    folder = write_adapter(tmp_path / "a", tensors=False)
    torch.save({"base_model.model.x.lora_A.weight": [1, 2]}, folder / "adapter_model.bin")
    with pytest.raises(jlora.CheckpointError, match="expected a tensor name and a tensor"):
        jlora.load(params, folder, allow_pickle=True)
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04garbage")
    with pytest.raises(jlora.CheckpointError, match="adapter_model.bin"):
        jlora.load(params, folder, allow_pickle=True)


def test_allow_pickle_without_torch_says_so(adapters, params, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(jlora.CheckpointError, match="needs torch"):
        jlora.load(params, adapters[1], allow_pickle=True)
