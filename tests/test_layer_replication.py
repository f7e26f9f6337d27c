"""Layer replication (PEFT's layer_replication) against the real peft: a Llama and a BERT classifier made deeper
by repeating layers (weights shared), each repeated layer with its own LoRA: logits unmerged and merged, saving,
jlora.init, and the refusal of a tree that was not replicated."""
from __future__ import annotations

import copy

import jax
import numpy as np
import peft
import pytest
from peft_twin import assert_saves_back, peft_loads_cleanly, perturb_trainable, rel_err, saved_pair, torch_logits
from test_parity_models import bert_cls, llama

import jlora

LAYER_MAP = [[0, 2], [1, 2]]  # layers 0 1 -> 0 1 1
IDS = np.array([[1, 5, 9, 3, 60, 2, 7], [4, 4, 8, 11, 0, 33, 12]], np.int32)
CASES = {"llama": (llama, ["q_proj", "down_proj"], ("model", "layers"), None),
         "bert": (bert_cls, ["query", "output.dense"], ("bert", "encoder", "layer"), "SEQ_CLS")}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replication")
    maker, targets, layers, task = CASES[request.param]
    torch_cls, flax_cls, cfg = maker()
    base, flax_model = saved_pair(torch_cls, flax_cls, cfg, tmp / "base")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        init_lora_weights=False, r=4, lora_alpha=8, target_modules=targets, layer_replication=LAYER_MAP,
        task_type=task))
    perturb_trainable(pm, 3)
    pm.save_pretrained(tmp / "adapter")
    judge = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp / "adapter").eval()
    deeper_config = copy.deepcopy(flax_model.config)
    deeper_config.num_hidden_layers = 3
    return tmp, base, flax_model, flax_cls(deeper_config, _do_init=False), judge, layers


def test_logits_match_peft(case, tmp_path):
    tmp, _, flax_model, deeper, judge, layers = case
    want = torch_logits(judge, {"input_ids": IDS})
    with pytest.raises(jlora.AdapterError, match=r"replicate_layers\(params, \[\[0, 2\], \[1, 2\]\]\)"):
        jlora.load(flax_model.params, tmp / "adapter")
    deep = jlora.replicate_layers(flax_model.params, LAYER_MAP)
    original, repeated = (jax.tree_util.tree_leaves(jlora.tree.get_path(tree, layers)[i])
                          for tree, i in ((flax_model.params, "1"), (deep, "2")))
    assert all(a is b for a, b in zip(original, repeated, strict=True))  # shared, not copied
    lp = jlora.load(deep, tmp / "adapter")
    assert rel_err(jax.jit(jlora.wrap(deeper.__call__))(IDS, params=lp).logits, want) <= 1e-5
    assert rel_err(deeper(IDS, params=jlora.merge(lp)).logits, want) <= 1e-5
    assert rel_err(flax_model(IDS, params=flax_model.params).logits, want) > 1e-2
    assert_saves_back(lp, tmp / "adapter", tmp_path / "saved")


def test_init_makes_what_peft_loads(case, tmp_path):
    _, base, flax_model, deeper, _, _ = case
    config = jlora.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "q_proj"], init_lora_weights=False,
                              layer_replication=LAYER_MAP)
    lp = jlora.init(jlora.replicate_layers(flax_model.params, LAYER_MAP), config, key=jax.random.key(0))
    again = peft_loads_cleanly(base, jlora.save(lp, tmp_path / "fresh"))
    assert rel_err(deeper(IDS, params=jlora.merge(lp)).logits, torch_logits(again, {"input_ids": IDS})) <= 1e-5


def test_bad_maps_are_refused(case):
    _, _, flax_model, _, _, _ = case
    with pytest.raises(jlora.AdapterError, match="within the tree's 2 layers"):
        jlora.replicate_layers(flax_model.params, [[0, 3]])
    with pytest.raises(jlora.ConfigError, match="layer_replication"):
        jlora.LoraConfig(r=2, layer_replication=[[2, 1]])
    with pytest.raises(jlora.AdapterError, match="no list of layers"):
        jlora.replicate_layers({"dense": {"kernel": np.zeros((2, 2))}}, LAYER_MAP)


def test_inspect_names_the_replication(case):
    from jlora.describe import describe_adapter, format_description

    tmp = case[0]
    assert "layer_replication [[0, 2], [1, 2]] (jlora.replicate_layers)" in format_description(
        describe_adapter(tmp / "adapter"))
