"""A new user's first hour: a model called without ``jlora.wrap`` says that it ignores the adapter (and the wrapped
path pays nothing for that check), and the README's training loop compiles its step once, because adapter leaves
are committed to a device only where their base leaves are (or where ``device=`` / ``sharding=`` ask for it)."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from adapter_files import llama_lora_tensors, tiny_llama, write_adapter
from flax import nnx

import jlora
from jlora import placement
from jlora.merge import merged_module
from jlora.tree import AdaptedModule, adapted_modules, map_adapted

IDS = jnp.array([[1, 5, 9, 2, 7, 3, 11, 4]])
CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.1}


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    return write_adapter(tmp_path_factory.mktemp("first_hour") / "adapter", CONFIG)


def unwrapped_warnings(record) -> list[warnings.WarningMessage]:
    return [w for w in record if issubclass(w.category, jlora.UnwrappedAdapterWarning)]


def primitives(jaxpr) -> list[str]:
    return [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns]


# ---------------------------------------------------------------- 1. forgetting jlora.wrap is not silent


def test_a_model_called_without_wrap_warns_and_says_what_to_do(model, adapter):
    lp = jlora.load(model.params, adapter)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")
        ignored = model(IDS, params=lp).logits
    (warning,) = unwrapped_warnings(record)  # once for the call, not once per adapted module
    assert warning.filename == __file__  # it points at the call, not into Flax
    message = str(warning.message)
    assert "jlora.wrap(model.__call__)" in message and "jlora.merge(lora_params)" in message
    np.testing.assert_array_equal(ignored, model(IDS, params=model.params).logits)  # what it warns about
    wrapped = jax.jit(jlora.wrap(model.__call__))(IDS, params=lp).logits
    assert float(jnp.max(jnp.abs(wrapped - ignored))) > 1e-3


def test_under_jit_it_warns_when_tracing_only(model, adapter):
    lp = jlora.load(model.params, adapter)
    forward = jax.jit(lambda p, ids: model(ids, params=p).logits)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        forward(lp, IDS)
        traced = len(unwrapped_warnings(record))
        forward(lp, IDS + 1)  # the compiled function again: no Python runs, nothing to say
    assert traced >= 1 and len(unwrapped_warnings(record)) == traced


def test_a_linen_apply_without_wrap_warns():
    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4, name="down")(nn.relu(nn.Dense(8, name="up")(x)))

    x = jnp.ones((2, 6))
    params = Mlp().init(jax.random.key(0), x)["params"]
    lp = jlora.init(params, jlora.LoraConfig(r=2, target_modules=["up"], init_lora_weights=False),
                    key=jax.random.key(1))
    with pytest.warns(jlora.UnwrappedAdapterWarning, match=r"jlora\.wrap\(module\.apply\)"):
        Mlp().apply({"params": lp}, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", jlora.UnwrappedAdapterWarning)
        jlora.wrap(Mlp().apply)({"params": lp}, x)
        jax.jit(jlora.wrap(Mlp().apply))({"params": lp}, x)


def test_the_check_adds_nothing_to_traced_programs(model, adapter):
    """The check runs in Python while Flax reads the tree: the unwrapped program is the base model's, op for op,
    and the wrapped path never hands Flax an AdaptedModule, so it neither warns nor gains an operation."""
    lp = jlora.load(model.params, adapter)
    call = lambda p: model(IDS, params=p).logits  # noqa: E731
    with pytest.warns(jlora.UnwrappedAdapterWarning):
        unwrapped = jax.make_jaxpr(call)(lp)
    assert primitives(unwrapped) == primitives(jax.make_jaxpr(call)(model.params))
    forward = jlora.wrap(model.__call__)
    with warnings.catch_warnings():
        warnings.simplefilter("error", jlora.UnwrappedAdapterWarning)
        wrapped = jax.make_jaxpr(lambda p: forward(IDS, params=p).logits)(lp)
        jax.jit(forward)(IDS, params=lp)
    assert not any("callback" in name for name in primitives(wrapped))


def test_replaced_tensors_alone_are_read_correctly_and_do_not_warn(model):
    """A module whose adapter only replaces tensors (modules_to_save) runs right when Flax reads it as it is."""
    config = jlora.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    lp = jlora.init(model.params, config, key=jax.random.key(0))
    head = lp["lm_head"]
    assert not head.needs_wrap and lp["model"]["layers"]["0"]["self_attn"]["q_proj"].needs_wrap
    lp = {**lp, "lm_head": head.replace(kernel=head["kernel"] + 0.5)}
    partly_merged = map_adapted(lambda n: merged_module(n) if n.spec.has_lora else n, lp)
    assert isinstance(partly_merged["lm_head"], AdaptedModule)
    with warnings.catch_warnings():
        warnings.simplefilter("error", jlora.UnwrappedAdapterWarning)
        plain = model(IDS, params=partly_merged).logits
    wrapped = jlora.wrap(model.__call__)(IDS, params=lp).logits
    np.testing.assert_allclose(plain, wrapped, rtol=1e-5, atol=1e-5)


def test_nnx_merge_of_a_lora_tree_raises_rather_than_dropping_the_adapter():
    """NNX is not silent: nnx.merge and nnx.replace_by_pure_dict refuse the adapter's extra leaves (flax's own
    errors); jlora.nnx_model(graphdef, lora_params) is the NNX path."""
    class Two(nnx.Module):
        def __init__(self, rngs):
            self.q_proj = nnx.Linear(8, 8, rngs=rngs)
            self.o_proj = nnx.Linear(8, 8, rngs=rngs)

        def __call__(self, x):
            return self.o_proj(self.q_proj(x))

    graphdef, state = nnx.split(Two(nnx.Rngs(0)))
    lp = jlora.init(state, jlora.LoraConfig(r=2, target_modules=["q_proj"]), key=jax.random.key(0))
    with pytest.raises(ValueError):
        nnx.merge(graphdef, lp)
    with pytest.raises(ValueError, match="lora_A"):
        nnx.replace_by_pure_dict(state, lp)
    jlora.nnx_model(graphdef, lp)(jnp.ones((1, 8)))


# ---------------------------------------------------------------- 2. the README's training loop compiles once


def readme_training(model, lora_params, steps: int = 3, device: jax.Device | None = None):
    """The README's "Continue training" loop (split, optax AdamW, combine, lora_dropout_key) as a jitted step:
    ``(compilations of the step, trainable, opt_state)`` after ``steps`` steps. ``device``: the optimizer state is
    committed to it (optax's init leaves its step count uncommitted, whatever the parameters)."""
    forward = jlora.wrap(model.__call__)
    trainable, frozen = jlora.split(lora_params)
    tx = optax.adamw(1e-2)
    opt_state = tx.init(trainable) if device is None else jax.device_put(tx.init(trainable), device)

    def loss_fn(trainable, frozen, ids, key):
        logits = forward(ids, params=jlora.combine(trainable, frozen), lora_dropout_key=key).logits[:, :-1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    @jax.jit
    def step(trainable, frozen, opt_state, ids, key):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, ids, key)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    for i in range(steps):
        trainable, opt_state, loss = step(trainable, frozen, opt_state, IDS, jax.random.key(i))
    assert np.isfinite(float(loss))
    return step._cache_size(), trainable, opt_state


@pytest.mark.parametrize("base", ["as transformers gives it", "committed to a device"])
def test_readme_training_loop_compiles_once(model, adapter, base):
    """Uncommitted base params (transformers', linen's init): the README's loop as written. Params committed to a
    device: a loop that commits its optimizer state there too; the adapter follows the base either way."""
    device = None if base.startswith("as") else jax.devices()[0]
    params = model.params if device is None else jax.device_put(model.params, device)
    compilations, trainable, opt_state = readme_training(model, jlora.load(params, adapter), device=device)
    assert compilations == 1
    assert committedness((trainable, opt_state)) == {device is not None}


def committedness(tree) -> set[bool]:
    return {bool(leaf.committed) for leaf in jax.tree_util.tree_leaves(tree) if isinstance(leaf, jax.Array)}


BASES = {
    "uncommitted": lambda params: params,
    "numpy": lambda params: jax.tree_util.tree_map(np.asarray, params),
    "committed": lambda params: jax.device_put(params, jax.devices()[0]),
}


@pytest.mark.parametrize("base", list(BASES))
def test_new_leaves_are_committed_as_their_base_leaves(model, adapter, tmp_path, base):
    params = BASES[base](model.params)
    want = {base == "committed"}
    other = write_adapter(tmp_path / "b", {**CONFIG, "r": 2}, llama_lora_tensors(r=2, seed=1))
    config = jlora.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True, modules_to_save=["lm_head"])
    lp = jlora.load(params, adapter)
    multi = jlora.load(params, {"a": adapter, "b": other})
    made = {
        "load": lp, "load pad_rank": jlora.load(params, adapter, pad_rank=8), "merge": jlora.merge(lp),
        "init": jlora.init(params, config, key=jax.random.key(0)), "several adapters": multi,
        "select": jlora.select(multi, "b"), "add_weighted cat": jlora.add_weighted(multi, {"a": 0.7, "b": 0.3}),
        "add_weighted svd": jlora.add_weighted(multi, {"a": 0.7, "b": 0.3}, method="svd", rank=3),
    }
    for what, tree in made.items():
        assert adapted_modules(tree) or what == "merge"
        if base == "numpy":  # the base leaves stay numpy; every array jlora made is uncommitted
            assert committedness(tree) <= want, what
        else:
            assert committedness(tree) == want, what


@pytest.mark.parametrize("on_device", [False, True], ids=["host transposes", "device transposes"])
def test_cast_and_transposed_leaves_keep_their_bases_committedness(on_device, monkeypatch):
    """A bfloat16 file's transposed tensor, cast and transposed in Placer.finish: beside an uncommitted and a
    committed base in one load, each comes out as its base is (one compiled cast would commit both)."""
    monkeypatch.setattr(placement, "transposes_on_device", lambda device: on_device)
    host = np.arange(12, dtype=np.float32).reshape(3, 4).astype(ml_dtypes.bfloat16).T
    bases = {False: jnp.zeros((4, 3)), True: jax.device_put(jnp.zeros((4, 3)), jax.devices()[0])}
    placer = placement.Placer()
    placed = {c: placer.put(host, np.float32, path=("m", str(c)), base=b, axes=(0, 1)) for c, b in bases.items()}
    placer.finish()
    for committed, value in placed.items():
        out = placer.resolve(value)
        assert out.committed == committed and out.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(out), host.astype(np.float32))


def test_device_and_sharding_arguments_commit(model, adapter):
    device = jax.devices()[0]
    for kwargs in ({"device": device}, {"sharding": "replicated"},
                   {"sharding": lambda path, leaf: jax.sharding.SingleDeviceSharding(device)}):
        lp = jlora.load(model.params, adapter, **kwargs)
        for _, node in adapted_modules(lp):
            assert node["lora_A"].committed and node["lora_scale"].committed, kwargs
            assert not node["kernel"].committed  # the base leaves are the caller's, untouched
    lp = jlora.load(model.params, adapter, sharding=lambda path, leaf: None)  # None keeps the derived placement
    assert committedness(lp) == {False}


SHARDED_ADD_WEIGHTED = '''
import sys
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import jlora
from adapter_files import llama_like_params, llama_lora_tensors, write_adapter
from jlora.tree import adapted_modules
from pathlib import Path
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
params = llama_like_params()
sharded = jax.tree_util.tree_map(lambda x: jax.device_put(x, NamedSharding(mesh, P("data", "model"))), params)
config = lambda r: {"peft_type": "LORA", "r": r, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
sources = {"a": write_adapter(Path(sys.argv[1]) / "a", config(4), llama_lora_tensors(r=4)),
           "b": write_adapter(Path(sys.argv[1]) / "b", config(2), llama_lora_tensors(r=2, seed=1))}
single = jlora.load(sharded, sources["a"])
for method in ("cat", "svd"):
    blend = jlora.add_weighted(jlora.load(sharded, sources), {"a": 0.7, "b": 0.3}, method=method)
    for (path, node), (_, one) in zip(adapted_modules(blend), adapted_modules(single)):
        for key in ("lora_A", "lora_B", "lora_scale"):
            assert node[key].committed, (method, path, key)
            assert node[key].sharding.is_equivalent_to(one[key].sharding, node[key].ndim), (method, path, key)
print("OK")
'''


def test_add_weighted_keeps_a_sharded_trees_shardings(tmp_path):
    """On a 2x4 mesh (8 host devices, in a subprocess): add_weighted's factors take the single adapter's derived
    shardings (they were uncommitted single-device arrays beside a sharded base before)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[1])])}
    proc = subprocess.run([sys.executable, "-c", SHARDED_ADD_WEIGHTED, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
