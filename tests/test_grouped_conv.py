"""LoRA on grouped convolutions (PEFT: lora_A a full conv to rank r, lora_B a grouped 1x1 conv, unmerged only),
against the real peft on a tiny RegNet whose bottleneck 3x3 convs have groups=2."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers as tf
from peft_twin import build_twin, flax_logits_plain, flax_logits_wrapped, peft_loads_cleanly, rel_err, torch_logits
from safetensors.torch import load_file

import jlora
from jlora.tree import LORA_B

GROUPED = "base_model.model.regnet.encoder.stages.1.layers.0.layer.1.convolution"  # groups=2 (16 channels, width 8)


def _twin(tmp_path, seed: int = 0, **lora):
    cfg = tf.RegNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8, num_labels=3)
    pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    return build_twin(tmp_path, tf.RegNetForImageClassification, tf.FlaxRegNetForImageClassification, cfg,
                      dict(r=4, lora_alpha=8, target_modules=["convolution"], **lora), inputs={"pixel_values": pixels},
                      seed=seed)


def _grouped_layer(tree):
    return tree["params"]["regnet"]["encoder"]["stages"]["1"]["layers"]["0"]["layer"]["1"]


def _grouped_node(tree):
    return _grouped_layer(tree)["convolution"]


def test_grouped_conv_parity_and_round_trip(tmp_path):
    twin = _twin(tmp_path)
    file = load_file(twin.adapter_dir / "adapter_model.safetensors")
    assert file[f"{GROUPED}.lora_B.weight"].shape == (16, 2, 1, 1)  # r / groups: PEFT's grouped lora_B
    assert file[f"{GROUPED}.lora_A.weight"].shape == (4, 16, 3, 3)  # every input channel
    want = torch_logits(twin.peft_model, twin.inputs)
    lora_params = jlora.load(twin.flax_model.params, twin.adapter_dir)
    node = _grouped_node(lora_params)
    assert node["kernel"].shape == (3, 3, 8, 16) and node["lora_A"].shape == (3, 3, 16, 4)
    assert node[LORA_B].shape == (4, 16)
    assert rel_err(flax_logits_plain(twin, twin.flax_model.params), want) > 1e-2
    assert rel_err(flax_logits_wrapped(twin, lora_params), want) <= 1e-4

    out = jlora.save(lora_params, tmp_path / "saved")
    saved = load_file(out / "adapter_model.safetensors")
    assert sorted(saved) == sorted(file)
    for key, value in file.items():
        np.testing.assert_array_equal(saved[key].numpy(), value.numpy(), err_msg=key)
    again = peft_loads_cleanly(twin.torch_base, out)
    assert rel_err(torch_logits(again.eval(), twin.inputs), want) <= 1e-6


def test_grouped_conv_is_not_merged(tmp_path):
    twin = _twin(tmp_path)
    lora_params = jlora.load(twin.flax_model.params, twin.adapter_dir)
    with pytest.raises(jlora.UnsupportedAdapterError, match="cannot be merged") as err:
        jlora.merge(lora_params)
    assert err.value.problems == [f"{GROUPED.removeprefix('base_model.model.')}: LoRA on a grouped convolution (its "
                                  "lora_A reads every input channel, the kernel only its group's)"]
    with pytest.raises(jlora.UnsupportedAdapterError, match="pad_rank") as err:
        jlora.load(twin.flax_model.params, twin.adapter_dir, pad_rank=8)
    assert err.value.problems == [GROUPED.removeprefix("base_model.model.")]


def test_grouped_conv_training_keeps_the_blocks(tmp_path):
    """Training through jlora.wrap never moves lora_B off its diagonal blocks, so the result saves in PEFT's
    grouped layout, and PEFT runs it as jlora does."""
    twin = _twin(tmp_path)
    lora_params = jlora.load(twin.flax_model.params, twin.adapter_dir)
    forward = jlora.wrap(twin.flax_model.__call__)
    trainable, frozen = jlora.split(lora_params)
    pixels = twin.inputs["pixel_values"]
    target = jnp.asarray([0, 2])

    def loss(tr):
        logits = forward(pixel_values=pixels, params=jlora.combine(tr, frozen)).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()

    tx = optax.adam(1e-2)
    state = tx.init(trainable)

    @jax.jit
    def step(tr, state):
        grads = jax.grad(loss)(tr)
        updates, state = tx.update(grads, state)
        return optax.apply_updates(tr, updates), state, grads

    first = loss(trainable)
    for _ in range(5):
        trainable, state, grads = step(trainable, state)
    grad_b = np.asarray(_grouped_node(grads)[LORA_B])
    blocks = np.kron(np.eye(2, dtype=bool), np.ones((2, 8), bool))
    assert np.any(grad_b[blocks]) and not np.any(grad_b[~blocks])
    assert float(loss(trainable)) < float(first)
    trained = jlora.combine(trainable, frozen)
    out = jlora.save(trained, tmp_path / "trained")
    pm = peft_loads_cleanly(twin.torch_base, out).eval()
    assert rel_err(flax_logits_wrapped(twin, trained), torch_logits(pm, twin.inputs)) <= 1e-4

    broken = jax.tree_util.tree_map(lambda x: x, trained)
    node = _grouped_node(broken)
    off_block = node.replace(**{LORA_B: node[LORA_B].at[0, 15].set(1.0)})
    _grouped_layer(broken)["convolution"] = off_block
    with pytest.raises(jlora.AdapterError, match="outside its diagonal blocks"):
        jlora.save(broken, tmp_path / "broken")
    assert not (tmp_path / "broken" / "adapter_model.safetensors").exists()


def test_grouped_conv_in_a_mixed_batch(tmp_path):
    """Two adapters on the grouped conv, one batch: each row as its adapter alone (and -1 as the base)."""
    twin = _twin(tmp_path / "a")
    other = _twin(tmp_path / "b", seed=1)
    params = twin.flax_model.params
    both = jlora.load(params, {"a": twin.adapter_dir, "b": other.adapter_dir})
    forward = jax.jit(jlora.wrap(twin.flax_model.__call__))
    pixels = np.concatenate([twin.inputs["pixel_values"]] * 2)[:3]
    mixed = np.asarray(forward(pixel_values=pixels, params=both, adapter_ids=jnp.asarray([0, 1, -1])).logits)
    for row, (source, name) in enumerate([(twin.adapter_dir, "a"), (other.adapter_dir, "b")]):
        alone = np.asarray(forward(pixel_values=pixels[row:row + 1], params=jlora.load(params, source)).logits)
        assert rel_err(mixed[row:row + 1], alone) <= 1e-5, name
        other_adapter = np.asarray(forward(pixel_values=pixels[row:row + 1],
                                           params=jlora.load(params, [other, twin][row].adapter_dir)).logits)
        assert rel_err(mixed[row:row + 1], other_adapter) > 1e-3, name
    base = np.asarray(twin.flax_model(pixel_values=pixels[2:], params=params).logits)
    assert rel_err(mixed[2:], base) <= 1e-5
    with pytest.raises(jlora.UnsupportedAdapterError, match="grouped convolutions") as err:
        jlora.add_weighted(both, {"a": 0.5, "b": 0.5}, method="cat")
    assert err.value.problems == [GROUPED.removeprefix("base_model.model.")]


def test_lora_bias_on_convs_without_a_bias(tmp_path):
    """RegNet's convs have no bias (batch norm follows): PEFT gives lora_B one anyway and runs it unmerged only."""
    twin = _twin(tmp_path, lora_bias=True)
    file = load_file(twin.adapter_dir / "adapter_model.safetensors")
    want = torch_logits(twin.peft_model, twin.inputs)
    lora_params = jlora.load(twin.flax_model.params, twin.adapter_dir)
    assert "bias" not in _grouped_node(lora_params) and "lora_bias" in _grouped_node(lora_params)
    with_bias = flax_logits_wrapped(twin, lora_params)
    assert rel_err(with_bias, want) <= 1e-4
    no_bias = jax.tree_util.tree_map(lambda x: x, lora_params)
    node = _grouped_node(no_bias)
    _grouped_layer(no_bias)["convolution"] = node.replace(lora_bias=jnp.zeros_like(node["lora_bias"]))
    assert rel_err(flax_logits_wrapped(twin, no_bias), with_bias) > 1e-4  # the bias term counts
    with pytest.raises(jlora.UnsupportedAdapterError, match="cannot be merged") as err:
        jlora.merge(lora_params)  # every conv named, the grouped one for both reasons
    assert sum("lora_bias on a module without a bias" in p for p in err.value.problems) == \
        sum(k.endswith("lora_B.bias") for k in file)
    assert [p for p in err.value.problems if "grouped" in p] == \
        [f"{GROUPED.removeprefix('base_model.model.')}: LoRA on a grouped convolution (its lora_A reads every input "
         "channel, the kernel only its group's)"]
    saved = load_file(jlora.save(lora_params, tmp_path / "saved") / "adapter_model.safetensors")
    assert sorted(saved) == sorted(file)
    for key, value in file.items():
        np.testing.assert_array_equal(saved[key].numpy(), value.numpy(), err_msg=key)

    # jlora.init on a variables dict ({"params", "batch_stats"}): PEFT's module names, a file PEFT runs the same
    config = jlora.LoraConfig(r=4, target_modules=["shortcut.convolution"], lora_bias=True, init_lora_weights=False)
    fresh = jlora.init(twin.flax_model.params, config, key=jax.random.key(0))
    pm = peft_loads_cleanly(twin.torch_base, jlora.save(fresh, tmp_path / "fresh"))
    fresh_logits = flax_logits_wrapped(twin, fresh)
    assert rel_err(fresh_logits, flax_logits_plain(twin, twin.flax_model.params)) > 1e-3
    assert rel_err(torch_logits(pm.eval(), twin.inputs), fresh_logits) <= 1e-4


def test_grouped_nnx_conv_matches_peft(tmp_path):
    """An nnx.Conv with feature_group_count=2 and PEFT's LoRA on its torch twin, run unmerged by nnx_model."""
    import peft
    import torch
    from flax import nnx

    class TorchNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(8, 6, 3, padding=1, groups=2)

        def forward(self, x):
            return self.conv(x)

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(8, 6, (3, 3), padding=1, feature_group_count=2, rngs=rngs)

        def __call__(self, x):
            return self.conv(x)

    torch.manual_seed(0)
    torch_net = TorchNet()
    model = Net(nnx.Rngs(0))
    model.conv.kernel = nnx.Param(jnp.asarray(torch_net.conv.weight.detach().numpy().transpose(2, 3, 1, 0)))
    model.conv.bias = nnx.Param(jnp.asarray(torch_net.conv.bias.detach().numpy()))
    pm = peft.get_peft_model(torch_net, peft.LoraConfig(r=4, lora_alpha=6, target_modules=["conv"],
                                                        init_lora_weights=False))
    pm.save_pretrained(tmp_path)
    x = np.random.default_rng(0).standard_normal((2, 8, 5, 5)).astype(np.float32)
    with torch.no_grad():
        want = pm(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
        plain = pm.get_base_model().conv.base_layer(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)

    graphdef, state = nnx.split(model)
    layout = jlora.Layout([jlora.Rule(r"conv", "conv/kernel", "o i kh kw -> kh kw i o")])
    lp = jlora.load(state, tmp_path, layout=layout)
    got = np.asarray(jax.jit(lambda p, x: jlora.nnx_model(graphdef, p)(x))(lp, x.transpose(0, 2, 3, 1)))
    assert rel_err(plain, want) > 1e-2
    assert rel_err(got, want) <= 1e-5
