"""wrap on plain flax.linen models: DenseGeneral, Einsum, Dense side paths, the merge fallback for a
module class without one, module.apply with nested params, and agreement with jlora.merge."""
from __future__ import annotations

import dataclasses
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.tree import AdaptedModule, ModuleSpec


class RawMatmul(nn.Module):
    """A module that uses a kernel directly: it has no side path."""

    @nn.compact
    def __call__(self, x):
        return x @ self.param("kernel", nn.initializers.normal(), (x.shape[-1], 8))


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):  # x (B, T, 8)
        h = nn.DenseGeneral(features=(2, 4), name="dg")(x)  # kernel (8, 2, 4)
        h = h.reshape(h.shape[:-2] + (8,))
        h = nn.Einsum((2, 8, 4), "btd,ndh->btnh", name="es")(h)  # kernel (N=2, D=8, H=4)
        h = jnp.tanh(h.reshape(h.shape[:-2] + (8,)))
        h = RawMatmul(name="raw")(h)
        return nn.Dense(3, name="out")(h)


def _adapted(module: dict, a, b, scale, perm, name) -> AdaptedModule:
    spec = ModuleSpec(peft_name=name, kind="linear", kernel_perm=perm, trainable=("lora_A", "lora_B"))
    return AdaptedModule({**module, "lora_A": jnp.asarray(a), "lora_B": jnp.asarray(b),
                          "lora_scale": jnp.asarray(scale, jnp.float32)}, spec)


@pytest.fixture
def setup():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32)
    params = Net().init(jax.random.key(0), x)["params"]
    r = 3
    f = {n: (rng.standard_normal(s_a).astype(np.float32), rng.standard_normal(s_b).astype(np.float32))
         for n, s_a, s_b in [("dg", (8, r), (r, 2, 4)), ("es", (8, r), (r, 2, 4)), ("raw", (8, r), (r, 8)),
                             ("out", (8, r), (r, 3))]}
    lp = dict(params)
    lp["dg"] = _adapted(params["dg"], *f["dg"], 0.5, (0, 1, 2), "dg")
    lp["es"] = _adapted(params["es"], *f["es"], 2.0, (1, 0, 2), "es")  # canonical (d, n, h) -> kernel (n, d, h)
    lp["raw"] = _adapted(params["raw"], *f["raw"], 1.5, (0, 1), "raw")
    lp["out"] = _adapted(params["out"], *f["out"], 1.0, (0, 1), "out")
    # the merged kernels, computed independently with numpy
    expected = dict(params)
    expected["dg"] = {**params["dg"], "kernel": params["dg"]["kernel"] + 0.5 * np.einsum("ir,rnh->inh", *f["dg"])}
    expected["es"] = {**params["es"], "kernel": params["es"]["kernel"] + 2.0 * np.einsum("dr,rnh->ndh", *f["es"])}
    expected["raw"] = {"kernel": params["raw"]["kernel"] + 1.5 * f["raw"][0] @ f["raw"][1]}
    expected["out"] = {**params["out"], "kernel": params["out"]["kernel"] + f["out"][0] @ f["out"][1]}
    return x, params, lp, expected


def test_wrap_matches_merged_kernels(setup):
    x, params, lp, expected = setup
    want = Net().apply({"params": expected}, x)
    base = Net().apply({"params": params}, x)
    assert float(jnp.max(jnp.abs(want - base))) > 1e-2
    with pytest.warns(UserWarning, match="no unmerged side path for \\['raw'\\]"):
        got = jax.jit(jlora.wrap(Net().apply))({"params": lp}, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(Net().apply({"params": jlora.merge(lp)}, x), want, rtol=1e-5, atol=1e-5)


def test_fallback_warning_is_given_once(setup):
    x, _, lp, _ = setup
    fwd = jlora.wrap(Net().apply)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fwd({"params": lp}, x)
        fwd({"params": lp}, x)
    assert sum("no unmerged side path" in str(w.message) for w in caught) == 1


def test_a_side_path_that_raises_is_merged_and_named(setup, monkeypatch):
    """A side path failing inside the call (a bug, or a case it cannot run) is not hidden behind the "module class
    without one" warning: the warning names the error, and that module is merged in the call instead."""
    x, _, lp, expected = setup

    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(jlora.side_paths, "dense_side", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = jax.jit(jlora.wrap(Net().apply))({"params": lp}, x)
    messages = [str(w.message) for w in caught]
    assert any("side path raised for out (RuntimeError: boom)" in m for m in messages), messages
    assert any("no unmerged side path for ['raw']" in m for m in messages)  # the module class without one
    np.testing.assert_allclose(got, Net().apply({"params": expected}, x), rtol=1e-5, atol=1e-5)


def test_a_function_that_refuses_side_paths_is_named_in_the_warning(setup):
    """When the function itself raises in wrap's trace with side paths in place (a strict parameter check, NNX's
    merge), every module is merged in the call and the warning quotes the error, not "module class without one"."""
    x, _, lp, expected = setup

    def strict_apply(variables, x):
        extra = [k for k in variables["params"]["out"] if k not in ("kernel", "bias")]
        if extra:
            raise KeyError(f"unexpected entries {extra}")
        return Net().apply(variables, x)

    with pytest.warns(UserWarning, match=r"function raised when traced with side paths \(KeyError: .*unexpected entri"):
        got = jlora.wrap(strict_apply)({"params": lp}, x)
    np.testing.assert_allclose(got, Net().apply({"params": expected}, x), rtol=1e-5, atol=1e-5)


def test_dropout_on_merged_fallback_is_reported(setup):
    x, _, lp, _ = setup
    lp = dict(lp, raw=AdaptedModule(dict(lp["raw"]), dataclasses.replace(lp["raw"].spec, dropout=0.1)))
    fwd = jlora.wrap(Net().apply)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fwd({"params": lp}, x)  # no key: no dropout anywhere, nothing to report
        fwd({"params": lp}, x, lora_dropout_key=jax.random.key(0))
        fwd({"params": lp}, x, lora_dropout_key=jax.random.key(1))
    assert [str(w.message) for w in caught if "lora_dropout is not applied" in str(w.message)] == [
        "jlora.wrap: lora_dropout is not applied to ['raw']: their kernels are merged inside the call, where the "
        "LoRA branch has no input of its own to drop"]


def test_side_path_does_not_form_merged_kernel(setup):
    """The compiled forward holds no (8, 2, 4)-sized sum for the DenseGeneral: only the fallback merges."""
    x, _, lp, _ = setup
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        jaxpr = jax.make_jaxpr(jlora.wrap(Net().apply))({"params": lp}, x)
    adds = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "add"
            and tuple(e.outvars[0].aval.shape) in {(8, 2, 4), (2, 8, 4)}]
    assert adds == []


def test_wrap_without_adapter_is_identity(setup):
    x, params, _, _ = setup
    np.testing.assert_array_equal(jlora.wrap(Net().apply)({"params": params}, x), Net().apply({"params": params}, x))


class Mixed(nn.Module):
    @nn.compact
    def __call__(self, x):  # x (B, T, 8)
        h = nn.DenseGeneral(features=(2, 4), name="dg")(x)  # kernel (8, 2, 4)
        h = nn.Einsum((2, 8, 4), "btd,ndh->btnh", name="es")(h.reshape(h.shape[:-2] + (8,)))  # kernel (N, D, H)
        return nn.Dense(3, name="out")(jnp.tanh(h.reshape(h.shape[:-2] + (8,))))


def test_mixed_batch_on_einsum_and_dense_general(tmp_path):
    """Two adapters of different ranks on DenseGeneral, Einsum and Dense kernels, one mixed batch: each row
    equals its adapter alone, the -1 row the base model."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5, 8)), jnp.float32)
    params = Mixed().init(jax.random.key(0), x)["params"]
    layout = jlora.Layout([jlora.Rule(r"dg", "dg/kernel", "(n h) i -> i n h", n=2),
                           jlora.Rule(r"es", "es/kernel", "(n h) d -> n d h", n=2),
                           jlora.Rule(r"out", "out/kernel", "o i -> i o")])
    sources = {}
    for seed, (rank, targets) in enumerate([(2, ["dg", "es", "out"]), (3, ["es", "out"])]):
        config = jlora.LoraConfig(r=rank, lora_alpha=4, target_modules=targets, init_lora_weights=False)
        lp = jlora.init(params, config, key=jax.random.key(seed), layout=layout, module_names=["dg", "es", "out"])
        sources[f"r{rank}"] = jlora.save(lp, tmp_path / f"r{rank}")
    lp = jlora.load(params, sources, layout=layout)
    fwd = jax.jit(jlora.wrap(Mixed().apply))
    got = np.asarray(fwd({"params": lp}, x, adapter_ids=jnp.array([1, -1, 0])))
    base = np.asarray(Mixed().apply({"params": params}, x))
    for row, name in ((0, "r3"), (2, "r2")):
        alone = np.asarray(fwd({"params": jlora.load(params, sources[name], layout=layout)}, x))
        np.testing.assert_allclose(got[row], alone[row], rtol=1e-5, atol=1e-6)
        assert np.max(np.abs(alone[row] - base[row])) > 1e-2
    np.testing.assert_allclose(got[1], base[1], rtol=1e-6, atol=1e-7)


def test_lora_dropout_draws_a_mask_per_scanned_layer():
    """lora_dropout inside nn.scan: every layer of a stacked kernel draws its own mask, as PEFT's per-layer
    dropout modules do. Two layers x + drop(x) @ I @ I on ones (rate 0.5, kernel zero): with one mask for both
    layers the outputs could only be 1 or 9; independent masks also give 3."""
    dim = 64

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return x + nn.Dense(dim, use_bias=False, kernel_init=nn.initializers.zeros, name="lin")(x), None

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            scanned = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
            return scanned(name="blocks")(x, None)[0]

    x = jnp.ones((1, dim))
    params = Stack().init(jax.random.key(0), x)["params"]
    layout = jlora.Layout([jlora.Rule(r"blocks\.(?P<layer>\d+)\.lin", "blocks/lin/kernel", "o i -> layer i o")])
    config = jlora.LoraConfig(r=dim, lora_alpha=dim, lora_dropout=0.5, target_modules=["lin"])
    lp = jlora.init(params, config, key=jax.random.key(1), layout=layout, module_names=["blocks.0.lin", "blocks.1.lin"])
    eye = jnp.broadcast_to(jnp.eye(dim), (2, dim, dim))
    lp["blocks"]["lin"] = lp["blocks"]["lin"].replace(lora_A=eye, lora_B=eye)
    out = np.asarray(jax.jit(jlora.wrap(Stack().apply))({"params": lp}, x, lora_dropout_key=jax.random.key(2)))
    assert set(np.unique(out)) <= {1.0, 3.0, 9.0} and 3.0 in out
