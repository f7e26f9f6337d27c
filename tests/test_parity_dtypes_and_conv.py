"""Parity with PEFT for a bfloat16 base model and for LoRA and DoRA on convolutions (ViT patch embedding)."""
from __future__ import annotations

import copy
import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from peft_twin import build_twin, flax_logits_plain, flax_logits_wrapped, peft_loads_cleanly, rel_err, torch_logits
from safetensors.torch import load_file
from test_parity_models import llama
from test_training import fixed_mask

import jlora


def test_bfloat16_base(tmp_path):
    torch_cls, flax_cls, cfg = llama()
    twin = build_twin(tmp_path, torch_cls, flax_cls, cfg, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                      base_dtype=torch.bfloat16)
    want = torch_logits(twin.peft_model, twin.inputs)
    params = twin.flax_model.to_bf16(twin.flax_model.params)
    lora_params = jlora.load(params, twin.adapter_dir)
    q = lora_params["model"]["layers"]["0"]["self_attn"]["q_proj"]
    assert q["kernel"].dtype == jnp.bfloat16 and q["lora_A"].dtype == jnp.float32  # PEFT keeps adapters in fp32
    wrapped = flax_logits_wrapped(twin, lora_params)
    merged_params = jlora.merge(lora_params)
    merged_q = merged_params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert merged_q.dtype == jnp.bfloat16
    peft_q = copy.deepcopy(twin.peft_model).merge_and_unload().model.layers[0].self_attn.q_proj.weight
    np.testing.assert_array_equal(np.asarray(merged_q.astype(jnp.float32)), peft_q.detach().float().numpy().T)
    merged = flax_logits_plain(twin, merged_params)
    base = flax_logits_plain(twin, params)
    # bf16 rounding differs between torch and XLA; the adapter's effect is far larger than that noise
    assert rel_err(base, want) > 0.1
    assert rel_err(wrapped, want) < 2e-2
    assert rel_err(merged, want) < 2e-2


def test_adapter_dtype_argument(tmp_path):
    torch_cls, flax_cls, cfg = llama()
    twin = build_twin(tmp_path, torch_cls, flax_cls, cfg, dict(r=4, lora_alpha=8, target_modules=["q_proj"]))
    lp = jlora.load(twin.flax_model.params, twin.adapter_dir, dtype=jnp.bfloat16)
    assert lp["model"]["layers"]["1"]["self_attn"]["q_proj"]["lora_B"].dtype == jnp.bfloat16


def _small_ints(gen: torch.Generator, shape: tuple, bound: int) -> torch.Tensor:
    return torch.randint(-bound, bound + 1, shape, generator=gen).to(torch.bfloat16)


class _OneDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(24, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, name="proj")(x)


class _OneLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 24)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("lora_bias", [False, True])
def test_bf16_adapter_rounds_like_peft(tmp_path, lora_bias):
    """A bf16 adapter on a bf16 layer (PEFT's autocast_adapter_dtype=False): PEFT rounds ``lora * scaling`` to bf16
    before adding it to the base output. Small integer weights and inputs make every matmul exact in bf16 on both
    sides and scaling = 1/3 is not, so the order of the roundings shows: equal bit for bit, unmerged and merged."""
    import peft

    gen = torch.Generator().manual_seed(0)
    base = _OneLinear().to(torch.bfloat16)
    with torch.no_grad():
        base.proj.weight.copy_(_small_ints(gen, (24, 16), 3))
        base.proj.bias.copy_(_small_ints(gen, (24,), 3))
    params = {"proj": {"kernel": jnp.asarray(base.proj.weight.detach().float().numpy().T, jnp.bfloat16),
                       "bias": jnp.asarray(base.proj.bias.detach().float().numpy(), jnp.bfloat16)}}
    pm = peft.get_peft_model(base, peft.LoraConfig(r=3, lora_alpha=1, target_modules=["proj"], lora_bias=lora_bias),
                             autocast_adapter_dtype=False)
    layer = pm.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(_small_ints(gen, (3, 16), 2))
        layer.lora_B["default"].weight.copy_(_small_ints(gen, (24, 3), 2))
        if lora_bias:
            layer.lora_B["default"].bias.copy_(_small_ints(gen, (24,), 2))
    pm.save_pretrained(tmp_path)
    x = _small_ints(gen, (2, 7, 16), 1)
    with torch.no_grad():
        want = pm(x).float().numpy()
        plain = base.proj.base_layer(x).float().numpy()

    lora_params = jlora.load(params, tmp_path, dtype=jnp.bfloat16)
    got = jax.jit(jlora.wrap(_OneDense().apply))({"params": lora_params}, jnp.asarray(x.float().numpy(), jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    assert not np.array_equal(plain, want)
    np.testing.assert_array_equal(np.asarray(got, np.float32), want)

    merged = jlora.merge(lora_params)["proj"]  # PEFT's merge rounds s * B @ A (and s * lora_B.bias) to bf16 first
    peft_merged = pm.merge_and_unload().proj
    np.testing.assert_array_equal(np.asarray(merged["kernel"], np.float32),
                                  peft_merged.weight.detach().float().numpy().T)
    np.testing.assert_array_equal(np.asarray(merged["bias"], np.float32), peft_merged.bias.detach().float().numpy())


@pytest.mark.parametrize("adapter_dtype", ["float32", "bfloat16"])
def test_mixed_batch_on_a_bf16_layer_rounds_like_peft(tmp_path, adapter_dtype):
    """PEFT's mixed batches compute each adapter's ``lora_B(lora_A(x)) * scaling`` in the adapter's dtype and round
    it to the layer's dtype before adding it (unlike its single-adapter forward). Exact matmuls as above, two
    adapters of different ranks and scalings plus a base row: equal bit for bit."""
    import peft

    gen = torch.Generator().manual_seed(0)
    base = _OneLinear()
    with torch.no_grad():
        base.proj.weight.copy_(_small_ints(gen, (24, 16), 3))
        base.proj.bias.copy_(_small_ints(gen, (24,), 3))
    folders = []
    for name, r, alpha in (("a", 3, 1), ("b", 2, 5)):
        pm = peft.get_peft_model(_OneLinear(), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"]))
        layer = pm.base_model.model.proj
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(_small_ints(gen, (r, 16), 2))
            layer.lora_B["default"].weight.copy_(_small_ints(gen, (24, r), 2))
        pm.save_pretrained(tmp_path / name)
        folders.append(tmp_path / name)
    keep = adapter_dtype == "float32"  # PEFT's default autocasts adapters to float32
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base).to(torch.bfloat16), folders[0], adapter_name="a",
                                        autocast_adapter_dtype=keep)
    pm.load_adapter(folders[1], adapter_name="b", autocast_adapter_dtype=keep)
    assert pm.base_model.model.proj.lora_A["b"].weight.dtype == getattr(torch, adapter_dtype)
    x = _small_ints(gen, (3, 5, 16), 1)
    with torch.no_grad():
        want = pm.eval()(x, adapter_names=["a", "b", "__base__"]).float().numpy()

    params = {"proj": {"kernel": jnp.asarray(base.proj.weight.detach().numpy().T, jnp.bfloat16),
                       "bias": jnp.asarray(base.proj.bias.detach().numpy(), jnp.bfloat16)}}
    both = jlora.load(params, {"a": folders[0], "b": folders[1]}, dtype=adapter_dtype)
    got = jax.jit(jlora.wrap(_OneDense().apply))({"params": both}, jnp.asarray(x.float().numpy(), jnp.bfloat16),
                                                adapter_ids=jnp.asarray([0, 1, -1]))
    np.testing.assert_array_equal(np.asarray(got, np.float32), want)


def test_vit_conv_and_linear_parity(tmp_path):
    cfg = tf.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=48, num_labels=3)
    pixels = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    twin = build_twin(tmp_path, tf.ViTForImageClassification, tf.FlaxViTForImageClassification, cfg,
                      dict(r=4, lora_alpha=8, target_modules=["projection", "query", "value"],
                           modules_to_save=["classifier"]),
                      inputs={"pixel_values": pixels})
    want = torch_logits(twin.peft_model, twin.inputs)
    lora_params = jlora.load(twin.flax_model.params, twin.adapter_dir)
    proj = lora_params["vit"]["embeddings"]["patch_embeddings"]["projection"]
    assert proj["lora_A"].shape == (4, 4, 3, 4) and proj["lora_B"].shape == (4, 32)
    assert rel_err(flax_logits_plain(twin, twin.flax_model.params), want) > 1e-2
    assert rel_err(flax_logits_wrapped(twin, lora_params), want) <= 1e-4
    merged_want = torch_logits(twin.peft_model.merge_and_unload(), twin.inputs)
    assert rel_err(flax_logits_plain(twin, jlora.merge(lora_params)), merged_want) <= 1e-4


def test_conv_dora_parity_and_round_trip(tmp_path):
    """DoRA on an nn.Conv2d: PEFT keeps the magnitude as the weight norm's shape (1, out, 1, 1). Loaded, run
    (wrapped and merged) against PEFT, saved back tensor for tensor, and a fresh one from init loads in PEFT."""
    cfg = tf.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=48, num_labels=3)
    pixels = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    lora = dict(r=4, lora_alpha=8, target_modules=["projection", "query"], use_dora=True)
    twin = build_twin(tmp_path, tf.ViTForImageClassification, tf.FlaxViTForImageClassification, cfg, lora,
                      inputs={"pixel_values": pixels})
    file = load_file(twin.adapter_dir / "adapter_model.safetensors")
    magnitude_key = "base_model.model.vit.embeddings.patch_embeddings.projection.lora_magnitude_vector"
    assert file[magnitude_key].shape == (1, 32, 1, 1)

    want = torch_logits(twin.peft_model, twin.inputs)
    lora_params = jlora.load(twin.flax_model.params, twin.adapter_dir)
    assert rel_err(flax_logits_wrapped(twin, lora_params), want) <= 1e-4
    merged_want = torch_logits(copy.deepcopy(twin.peft_model).merge_and_unload(), twin.inputs)
    assert rel_err(flax_logits_plain(twin, jlora.merge(lora_params)), merged_want) <= 1e-4

    saved = load_file(jlora.save(lora_params, tmp_path / "again") / "adapter_model.safetensors")
    assert set(saved) == set(file)
    for key, value in file.items():
        np.testing.assert_array_equal(saved[key].numpy(), value.numpy(), err_msg=key)

    fresh = jlora.init(twin.flax_model.params, jlora.LoraConfig(init_lora_weights=False, **lora), key=jax.random.key(0))
    pm = peft_loads_cleanly(twin.torch_base, jlora.save(fresh, tmp_path / "fresh"))
    assert rel_err(flax_logits_wrapped(twin, fresh), torch_logits(pm, twin.inputs)) <= 1e-4


def _nchw_mask(shape: tuple) -> np.ndarray:
    """The dropout mask JAX uses for the same activation: conv inputs are NHWC there, NCHW in torch."""
    if len(shape) == 4:
        n, c, h, w = shape
        return fixed_mask((n, h, w, c)).transpose(0, 3, 1, 2)
    return fixed_mask(shape)


class _FixedConvMask(torch.nn.Module):
    def forward(self, x):
        return x * torch.as_tensor(_nchw_mask(tuple(x.shape)), dtype=x.dtype)


@pytest.mark.parametrize("use_dora, dropout", [(False, 0.0), (True, 0.0), (True, 0.3)],
                         ids=["lora", "dora", "dora_dropout"])
def test_conv_gradients_match_peft(use_dora, dropout, tmp_path, monkeypatch):
    """Gradients of every trainable tensor (conv and linear factors, DoRA magnitudes, the saved classifier)
    for a weighted sum of the logits, against PEFT's backward; with lora_dropout, PEFT in train mode and both
    sides dropping the same entries (DoRA's base term then runs the conv on the dropped input)."""
    import peft

    cfg = tf.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=48, num_labels=3, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    weights = rng.standard_normal((2, 3)).astype(np.float32)
    twin = build_twin(tmp_path, tf.ViTForImageClassification, tf.FlaxViTForImageClassification, cfg,
                      dict(r=4, lora_alpha=8, target_modules=["projection", "query"], use_dora=use_dora,
                           lora_dropout=dropout, modules_to_save=["classifier"]), inputs={"pixel_values": pixels})
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(twin.torch_base), twin.adapter_dir, is_trainable=True)
    pm.train(dropout > 0)
    for module in pm.modules():
        if dropout and isinstance(getattr(module, "lora_dropout", None), torch.nn.ModuleDict):
            module.lora_dropout["default"] = _FixedConvMask()
    loss_t = (pm(pixel_values=torch.as_tensor(pixels)).logits * torch.as_tensor(weights)).sum()
    loss_t.backward()
    grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    want = {k: v.numpy() for k, v in peft.get_peft_model_state_dict(pm, state_dict=grads).items()}

    wrap_module = importlib.import_module("jlora.wrap")
    real_dropout = wrap_module.lora_dropout
    monkeypatch.setattr(wrap_module, "lora_dropout", lambda key, rate, site, name, layer=None: real_dropout(
        key, rate, site, name) if key is None else (lambda x: x * jnp.asarray(fixed_mask(tuple(x.shape)), x.dtype)))
    trainable, frozen = jlora.split(jlora.load(twin.flax_model.params, twin.adapter_dir))
    forward = jlora.wrap(twin.flax_model.__call__)
    key = jax.random.key(0) if dropout else None
    def loss(t):
        return (forward(jnp.asarray(pixels), params=jlora.combine(t, frozen), lora_dropout_key=key).logits
                * weights).sum()
    loss_j, grad = jax.value_and_grad(loss)(trainable)
    got = jlora.to_peft_tensors(jlora.combine(grad, frozen))
    assert rel_err(loss_j, loss_t.item()) <= 1e-5
    assert set(want) <= set(got) and any("projection.lora_A" in k for k in want)
    for key_, value in want.items():
        assert rel_err(got[key_], value) <= 1e-4, key_
