"""Placement on one device: host -> device copies, derived shardings, device=/sharding= arguments,
the NaN/Inf check, and the one-tensor-at-a-time safetensors writer used by save.
(Multi-device placement: tests/sharded/multidevice.py, run by test_sharding.py.)"""
from __future__ import annotations

import tracemalloc

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from adapter_files import PREFIX, llama_lora_tensors, tiny_llama, write_adapter
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P
from safetensors.torch import load_file

import jlora
from jlora import placement
from jlora.checkpoint import all_finite, read_safetensors, write_safetensors
from jlora.placement import derive, lora_axes, to_device
from jlora.tree import adapted_modules

BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.fixture(scope="module")
def params():
    return tiny_llama().params


def _cases():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 6)).astype(np.float32)
    conv = rng.standard_normal((3, 5, 2, 2)).astype(np.float32)  # PEFT conv lora_A (r, in, kh, kw)
    return [
        ("f32", a, np.float32),
        ("f32 transposed", a.T, np.float32),
        ("bf16 transposed -> f32", a.astype(BF16).T, np.float32),
        ("f32 transposed -> bf16", a.T, BF16),
        ("f16 -> f32", a.astype(np.float16), np.float32),
        ("conv A permuted -> f32", conv.astype(BF16).transpose(2, 3, 1, 0), np.float32),
        ("sliced view", a[1:3, ::2], np.float32),
    ]


@pytest.mark.parametrize("name,host,dtype", _cases(), ids=[c[0] for c in _cases()])
def test_to_device_matches_numpy(name, host, dtype):
    before = np.array(host, copy=True)
    out = to_device(host, SingleDeviceSharding(jax.devices()[0]), dtype)
    assert out.dtype == np.dtype(dtype) and out.shape == host.shape
    np.testing.assert_array_equal(np.asarray(out), host.astype(dtype))
    np.testing.assert_array_equal(host, before)


@pytest.mark.parametrize("on_device", [False, True], ids=["host transposes", "device transposes"])
@pytest.mark.parametrize("name,host,dtype", _cases() + [("scalar", np.asarray(0.5, np.float32), np.float32)],
                         ids=[c[0] for c in _cases()] + ["scalar"])
def test_placer_put_matches_numpy(name, host, dtype, on_device, monkeypatch):
    """One-device leaves: moved in the file's dtype (and, on accelerators, its memory order), then cast and
    transposed in one call at finish. Forcing the accelerator path runs it on the CPU here."""
    monkeypatch.setattr(placement, "transposes_on_device", lambda device: on_device)
    monkeypatch.setattr(placement, "CAST_CHUNK", 1)  # the two leaves below: one compiled call each
    before = np.array(host, copy=True)
    placer = placement.Placer()
    base = jnp.zeros(host.shape, np.float32)
    placed = [placer.put(host, dtype, path=("m", f"x{i}"), base=base, axes=tuple(range(host.ndim))) for i in range(2)]
    placer.finish()
    for out in map(placer.resolve, placed):
        assert isinstance(out, jax.Array) and out.dtype == np.dtype(dtype) and out.shape == host.shape
        np.testing.assert_array_equal(np.asarray(out), host.astype(dtype))
    np.testing.assert_array_equal(host, before)


@pytest.mark.parametrize("on_device", [False, True], ids=["host transposes", "device transposes"])
@pytest.mark.parametrize("name,host,dtype", _cases(), ids=[c[0] for c in _cases()])
def test_placer_names_every_nonfinite_leaf(name, host, dtype, on_device, monkeypatch):
    """NaN/Inf are found on every path: on the host as the leaf is read, or in finish's cast of a pending leaf;
    all the bad leaves in one error, the finite ones not named."""
    monkeypatch.setattr(placement, "transposes_on_device", lambda device: on_device)
    monkeypatch.setattr(placement, "CAST_CHUNK", 2)
    bad = {}
    for i, value in enumerate([np.nan, np.inf, -np.inf]):
        x = host.copy(order="K")  # keeps a transposed leaf's memory order
        x.flat[-1 - i] = value
        bad[f"bad{i}"] = x
    placer = placement.Placer(check_finite=True)
    base = jnp.zeros(host.shape, np.float32)
    for key, x in [("good0", host), *bad.items(), ("good1", host)]:
        placer.put(x, dtype, path=("m", key), base=base, axes=tuple(range(host.ndim)), key=key)
    with pytest.raises(jlora.CheckpointError, match="NaN or Inf") as err:
        placer.finish()
    assert err.value.problems == sorted(bad)


def test_device_transposes_load_the_same_tree(params, tmp_path, monkeypatch):
    tensors = {k: v.astype(BF16) for k, v in llama_lora_tensors().items()}
    folder = write_adapter(tmp_path / "a", tensors=tensors)
    host = jlora.load(params, folder)
    monkeypatch.setattr(placement, "transposes_on_device", lambda device: True)
    moved = jlora.load(params, folder)
    for (path, a), (_, b) in zip(adapted_modules(host), adapted_modules(moved)):
        assert a.spec == b.spec and sorted(a) == sorted(b), path
        for key in a:
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))


def test_lora_axes_follow_the_kernel_layout():
    assert lora_axes("lora_A", 1, (0, 1)) == (0, None)  # Dense kernel (in, out)
    assert lora_axes("lora_B", 1, (0, 1)) == (None, 1)
    assert lora_axes("magnitude", 1, (0, 1)) == (1,)
    assert lora_axes("lora_A", 1, (1, 0)) == (1, None)  # GPT-2 Conv1D kernel (out, in)
    assert lora_axes("lora_B", 1, (1, 0)) == (None, 0)
    assert lora_axes("lora_A", 3, (0, 1, 2, 3)) == (0, 1, 2, None)  # conv (kh, kw, in, out)
    assert lora_axes("lora_B", 3, (0, 1, 2, 3)) == (None, 3)
    assert lora_axes("lora_bias", 2, (2, 0, 1)) == (0,)  # kernel (out, in0, in1): canonical (in0, in1, out)
    assert lora_axes("lora_A", 2, (2, 0, 1)) == (1, 2, None)


def test_derive_from_named_and_single_device_shardings():
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    kernel = NamedSharding(mesh, P("data", "model"))
    assert derive(kernel, 2, (0, None)).spec == P("data", None)
    assert derive(kernel, 2, (None, 1)).spec == P(None, "model")
    assert derive(kernel, 2, (1,)).spec == P("model")
    assert derive(NamedSharding(mesh, P(("data", "model"))), 2, (None, 1)).spec == P(None, None)  # short spec
    assert derive(NamedSharding(mesh, P(("data", "model"), None)), 2, (0, None)).spec == P(("data", "model"), None)
    single = SingleDeviceSharding(jax.devices()[0])
    assert derive(single, 2, (0, None)) is single
    assert derive(None, 2, (0, None)) == SingleDeviceSharding(jax.devices()[0])  # numpy base leaf


def test_load_places_on_the_requested_device(params, tmp_path):
    folder = write_adapter(tmp_path / "a")
    device = jax.devices()[0]
    lp = jlora.load(jax.tree_util.tree_map(np.asarray, params), folder, device=device)
    for _, node in adapted_modules(lp):
        assert node["lora_A"].sharding == SingleDeviceSharding(device)
        assert node["lora_B"].committed
    seen = {}
    lp = jlora.load(params, folder, sharding=lambda path, leaf: seen.__setitem__(path, leaf))
    assert sorted(seen)[:3] == [f"model/layers/0/self_attn/q_proj/{k}" for k in ("lora_A", "lora_B", "lora_scale")]
    a = seen["model/layers/0/self_attn/q_proj/lora_A"]
    assert a.shape == (32, 4) and a.dtype == np.float32 and a.sharding == SingleDeviceSharding(jax.devices()[0])
    assert seen["model/layers/0/self_attn/q_proj/lora_scale"].shape == ()
    assert len(seen) == 12  # 4 modules x (A, B, scale)


def test_bad_placement_arguments(params, tmp_path):
    folder = write_adapter(tmp_path / "a")
    device = jax.devices()[0]
    with pytest.raises(jlora.AdapterError, match="either device= or sharding="):
        jlora.load(params, folder, device=device, sharding="replicated")
    with pytest.raises(jlora.AdapterError, match="'everywhere'"):
        jlora.load(params, folder, sharding="everywhere")
    with pytest.raises(jlora.AdapterError, match="jax.Device"):
        jlora.load(params, folder, device="cpu:0")
    with pytest.raises(jlora.AdapterError, match="returned 3"):
        jlora.load(params, folder, sharding=lambda path, leaf: 3)
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    with pytest.raises(jlora.AdapterError) as err:  # a rank-3 spec fits none of the 2-D factors
        jlora.load(params, folder, sharding=NamedSharding(mesh, P(None, None, "model")))
    assert len(err.value.problems) == 8 and "model/layers/1/self_attn/v_proj/lora_B" in str(err.value)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, BF16, ml_dtypes.float8_e5m2,
                                   ml_dtypes.float8_e4m3fn])
def test_all_finite(dtype):
    x = np.array([[1.0, -2.0, 0.0], [-0.0, 5.0, 240.0]], np.float32).astype(dtype)
    assert all_finite(x) and all_finite(x.T) and all_finite(x[:0])
    for bad in (np.nan, np.inf, -np.inf):
        y = x.astype(np.float32)
        y[1, 2] = bad
        y = y.astype(dtype)
        assert not all_finite(y) and not all_finite(y.T[::-1]), bad


def test_nonfinite_bfloat16_file(params, tmp_path):
    tensors = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in llama_lora_tensors().items()}
    key = sorted(tensors)[5]
    tensors[key][1, 0] = -float("inf")
    from safetensors.torch import save_file
    folder = write_adapter(tmp_path / "a", tensors=False)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    with pytest.raises(jlora.CheckpointError, match="NaN or Inf") as err:
        jlora.load(params, folder)
    assert err.value.problems == [key]
    lp = jlora.load(params, folder, allow_nonfinite=True, dtype="bfloat16")
    assert lp["model"]["layers"]["0"]["self_attn"]["q_proj"]["lora_A"].dtype == BF16


def test_write_safetensors_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"b.weight": rng.standard_normal((3, 4)).astype(np.float32),
               "a.weight": rng.standard_normal((5,)).astype(BF16),
               "scalar": np.array(2.5, np.float64), "empty": np.zeros((0, 3), np.float16)}
    entries = {k: (v.shape, v.dtype) for k, v in tensors.items()}
    produced = []
    path = tmp_path / "x.safetensors"
    write_safetensors(path, entries, lambda k: produced.append(k) or tensors[k].T.T, metadata={"format": "pt"})
    assert produced == list(tensors)
    ours, theirs = read_safetensors(path), load_file(path)
    for k, v in tensors.items():
        np.testing.assert_array_equal(ours[k], v)
        np.testing.assert_array_equal(theirs[k].float().numpy(), v.astype(np.float32))
    with pytest.raises(jlora.CheckpointError, match="announced"):
        write_safetensors(tmp_path / "y.safetensors", entries, lambda k: tensors[k].astype(np.float32))


def test_save_holds_one_tensor_at_a_time(params, tmp_path):
    """save gathers and converts one leaf at a time: peak host memory ~ one tensor, not the adapter."""
    modules = ("q_proj", "k_proj", "v_proj", "o_proj")
    tensors = llama_lora_tensors(r=512, modules=modules)
    config = {"peft_type": "LORA", "r": 512, "lora_alpha": 512, "target_modules": list(modules)}
    lp = jlora.load(params, write_adapter(tmp_path / "a", config, tensors))
    largest = max(v.nbytes for v in tensors.values())  # 16 tensors of 32-64 KiB
    tracemalloc.start()
    try:
        jlora.save(lp, tmp_path / "out")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * largest, (peak, largest)  # numpy allocations (jlora 0.1.0's save: 2.8x)
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert set(saved) == set(tensors)
    for k, v in tensors.items():
        np.testing.assert_array_equal(saved[k].numpy(), v)
    assert all(k.startswith(PREFIX) for k in saved)
