"""NNX models as objects: ``jlora.load(model, source)`` on an ``nnx.Module``, against the real PEFT.

The returned module is called like the original and runs the adapter unmerged; its adapter is ``nnx.LoRAParam``
variables that ``nnx.Optimizer(..., wrt=nnx.LoRAParam)`` trains alone; the caller's module is left as it was (its
arrays shared); ``jlora.merge`` gives a plain module and ``jlora.save`` PEFT's files. Models: google-tunix's Llama 3
(tests/test_tunix.py's harness), the NNX Llama of tests/llama_variants.py (fused kv kernel, DoRA) and stacked layers
(``nnx.vmap`` + ``nnx.scan``).
"""
from __future__ import annotations

import copy
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from llama_variants import NnxLlama, nnx_pure_params_from_torch
from peft_twin import peft_loads_cleanly, rel_err
from test_layouts import IDS, NNX, _nnx_scanned_net, torch_llama, torch_out
from test_tunix import ALL_LINEAR, TOL, _adapter, _torch_logits, archs  # noqa: F401 (archs: a fixture)

import jlora
from jlora.nnx_module import AdapterConstant, lora_tree
from jlora.tree import adapted_modules


def _snapshot(model: nnx.Module) -> tuple:
    """What must not change in a caller's module: its graph definition and every variable (type, value, buffer)."""
    state = nnx.state(model)
    leaves = jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    return nnx.graphdef(model), [(path, type(v), v[...], np.array(v[...])) for path, v in leaves]


def _assert_unchanged(model: nnx.Module, snapshot: tuple) -> None:
    graphdef, leaves = _snapshot(model)
    assert graphdef == snapshot[0]
    assert len(leaves) == len(snapshot[1])
    for (path, kind, value, _), (path0, kind0, value0, copy0) in zip(leaves, snapshot[1]):
        assert path == path0 and kind is kind0 and value is value0, path
        np.testing.assert_array_equal(np.asarray(value), copy0)


def _base_shared(model: nnx.Module, lora_model: nnx.Module) -> None:
    """Every variable of ``model`` is in ``lora_model`` at the same path, holding the same buffer (except the tensors
    that the adapter file replaces: PEFT saves a targeted head's base weight with the adapter)."""
    mine = nnx.to_pure_dict(nnx.state(lora_model))
    replaced = {path + (child,) for path, node in adapted_modules(lora_tree(lora_model))
                for child, _ in node.spec.file_keys}
    shared = 0
    for path, value in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model))):
        path = tuple(getattr(key, "key", key) for key in path)
        theirs = mine
        for key in path:
            theirs = theirs[key]
        if path not in replaced:
            assert theirs.unsafe_buffer_pointer() == value.unsafe_buffer_pointer(), path
            shared += 1
    assert shared > 0


def _tunix(arch, lm_or_model):
    ids, positions, mask = arch.inputs
    return np.asarray(lm_or_model(ids, positions, None, mask)[0])


def test_tunix_llama_module_matches_peft(archs, tmp_path):
    """tunix's Llama 3 as an object: the new module (called like the original) gives PeftModel's logits and
    jlora.nnx_model's, the caller's module is unchanged and shares its arrays, merge gives merge_and_unload's."""
    arch = archs("llama3")
    judge = _adapter(arch, tmp_path / "adapter", dict(r=4, lora_alpha=8, use_rslora=True,
                                                      target_modules=ALL_LINEAR + ["lm_head"]), seed=11)
    model = nnx.merge(arch.graphdef, arch.state)
    snapshot = _snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # (no jlora warning: everything runs unmerged)
        lora_model = jlora.load(model, tmp_path / "adapter")
        got = _tunix(arch, lora_model)
    assert type(lora_model) is type(model)
    _assert_unchanged(model, snapshot)
    _base_shared(model, lora_model)
    want = _torch_logits(judge, arch)
    assert rel_err(got, want) <= TOL
    lp = jlora.load(arch.state, tmp_path / "adapter")
    ids, positions, mask = arch.inputs
    np.testing.assert_allclose(got, jlora.nnx_model(arch.graphdef, lp)(ids, positions, None, mask)[0],
                               rtol=1e-6, atol=1e-6)
    assert rel_err(nnx.jit(lambda m, ids, pos, mask: m(ids, pos, None, mask)[0])(lora_model, *arch.inputs), want) <= TOL

    loras = jax.tree_util.tree_leaves(nnx.state(lora_model, nnx.LoRAParam))
    assert len(loras) == 2 * 7 * 2 + 2  # lora_A, lora_B of 7 projections in 2 layers, and of the head
    scales = nnx.state(lora_model, AdapterConstant)
    assert all(np.ndim(s) == 0 for s in jax.tree_util.tree_leaves(scales))
    assert not jax.tree_util.tree_leaves(nnx.state(lora_model, lambda path, v: isinstance(v, nnx.LoRAParam)
                                                   and "lora_scale" in str(path)))

    merged = jlora.merge(lora_model)
    assert nnx.graphdef(merged) == nnx.graphdef(model)  # the original classes and variable types
    assert rel_err(_tunix(arch, merged), _torch_logits(judge.merge_and_unload(), arch)) <= TOL
    _assert_unchanged(model, snapshot)


def test_tunix_llama_module_trains_with_nnx_optimizer(archs, tmp_path):
    """nnx.Optimizer(wrt=nnx.LoRAParam) in a jitted step (compiled once) moves only the LoRA leaves; save gives
    PeftModel the trained module's logits with no missing or unexpected keys."""
    arch = archs("llama3")
    _adapter(arch, tmp_path / "adapter", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
             seed=5)
    model = nnx.merge(arch.graphdef, arch.state)
    snapshot = _snapshot(model)
    lora_model = jlora.load(model, tmp_path / "adapter")
    optimizer = nnx.Optimizer(lora_model, optax.adam(1e-2), wrt=nnx.LoRAParam)
    ids, positions, mask = (jnp.asarray(x) for x in arch.inputs)
    traces = []

    @nnx.jit
    def step(m, opt, ids, positions, mask):
        traces.append(1)

        def loss_fn(m):
            logits = m(ids, positions, None, mask)[0][:, :-1]
            return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(m)
        opt.update(m, grads)
        return loss

    before = {p: (type(v), np.array(v[...])) for p, v in _variables(lora_model)}
    losses = [float(step(lora_model, optimizer, ids, positions, mask)) for _ in range(4)]
    assert len(traces) == 1 and losses[-1] < losses[0]
    for path, v in _variables(lora_model):
        kind, old = before[path]
        moved = not np.array_equal(np.asarray(v[...]), old)
        assert moved == (kind is nnx.LoRAParam), path  # base kernels bitwise unchanged, every LoRA factor moved
    _assert_unchanged(model, snapshot)

    out = jlora.save(lora_model, tmp_path / "trained")
    back = peft_loads_cleanly(arch.torch_base, out)
    assert rel_err(_tunix(arch, lora_model), _torch_logits(back, arch)) <= TOL


def _variables(model: nnx.Module) -> list:
    return jax.tree_util.tree_leaves_with_path(nnx.state(model), is_leaf=lambda v: isinstance(v, nnx.Variable))


@pytest.mark.parametrize("adapter", ["patterns", "dora"])
def test_nnx_llama_module_matches_peft(tmp_path, adapter):
    """The NNX Llama of llama_variants (a fused kv kernel, rank patterns, DoRA): unmerged == PeftModel, under
    nnx.jit and jax.jit(split/merge) too; merge == merge_and_unload."""
    from test_layouts import ADAPTERS

    cfg, base, judge = torch_llama(tmp_path, ADAPTERS[adapter])
    model = NnxLlama(cfg, rngs=nnx.Rngs(0))
    nnx.update(model, nnx.State(jax.tree.map(jnp.asarray, nnx_pure_params_from_torch(base.state_dict(), cfg))))
    snapshot = _snapshot(model)
    lora_model = jlora.load(model, tmp_path / "adapter", layout=NNX)
    _base_shared(model, lora_model)  # (before nnx.jit, which hands the module its outputs' arrays)
    want = torch_out(judge, IDS)
    assert rel_err(lora_model(IDS), want) <= 1e-4
    assert rel_err(nnx.jit(lambda m, ids: m(ids))(lora_model, IDS), want) <= 1e-4
    graphdef, state = nnx.split(lora_model)
    assert rel_err(jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids))(state, IDS), want) <= 1e-4
    magnitudes = nnx.state(lora_model, lambda path, v: "lora_magnitude" in str(path[-1]))
    assert all(isinstance(v, nnx.LoRAParam) for v in jax.tree_util.tree_leaves(
        magnitudes, is_leaf=lambda v: isinstance(v, nnx.Variable))) and bool(magnitudes) == (adapter == "dora")
    assert rel_err(jlora.merge(lora_model)(IDS), torch_out(copy.deepcopy(judge).merge_and_unload(), IDS)) <= 1e-4
    _assert_unchanged(model, snapshot)


def test_stacked_layers_module():
    """Stacked layers (nnx.vmap + nnx.scan): the adapter is held with the kernel's layer axis, sliced by the scan;
    the module equals jlora.nnx_model, trains and merges."""
    graphdef, state, layout = _nnx_scanned_net()
    names = [f"blocks.{i}.{m}" for i in range(3) for m in ("up", "down")]
    config = jlora.LoraConfig(r=2, target_modules=["up", "down"], init_lora_weights=False,
                              layers_to_transform=[0, 2], layers_pattern="blocks")
    lp = jlora.init(state, config, key=jax.random.key(0), layout=layout, module_names=names)
    model = nnx.merge(graphdef, state)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 8)), jnp.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # (no jlora warning: everything runs unmerged)
        lora_model = jlora.load(model, jlora.save(lp, _tmp() / "stacked"), layout=layout)
        got = nnx.jit(lambda m, x: m(x))(lora_model, x)
    assert lora_model.blocks.up.jlora_lora_A.shape == (3, 8, 2)
    np.testing.assert_allclose(got, jlora.nnx_model(graphdef, lp)(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jlora.merge(lora_model)(x), got, rtol=1e-5, atol=1e-5)

    optimizer = nnx.Optimizer(lora_model, optax.sgd(0.1), wrt=nnx.LoRAParam)
    grads = nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))), argnums=nnx.DiffState(0, nnx.LoRAParam))(lora_model)
    optimizer.update(lora_model, grads)
    trained = lora_tree(lora_model)
    np.testing.assert_allclose(lora_model(x), jlora.nnx_model(graphdef, trained)(x), rtol=1e-6, atol=1e-6)
    assert not np.allclose(trained["blocks"]["up"]["lora_B"], lp["blocks"]["up"]["lora_B"])


def _tmp():
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp())


def test_module_refusals(tmp_path):
    """Several adapters at once are refused for a module object (they need adapter_ids); merge/save of a module
    without an adapter say so."""
    graphdef, state, layout = _nnx_scanned_net()
    names = [f"blocks.{i}.{m}" for i in range(3) for m in ("up", "down")]
    config = jlora.LoraConfig(r=2, target_modules=["up"], init_lora_weights=False)
    sources = {n: jlora.save(jlora.init(state, config, key=jax.random.key(i), layout=layout, module_names=names),
                             tmp_path / n) for i, n in enumerate("ab")}
    model = nnx.merge(graphdef, state)
    with pytest.raises(jlora.UnsupportedAdapterError, match="several adapters"):
        jlora.load(model, sources, layout=layout)
    with pytest.raises(jlora.AdapterError, match="no jlora adapter"):
        jlora.save(model, tmp_path / "none")
    with pytest.raises(jlora.AdapterError, match="no jlora adapter"):
        jlora.merge(model)
