"""The fused LoRA matmul (one Pallas kernel for x@W + s*(x@A)@B) and jlora.wrap(fused=True). On the CPU the kernel
runs in Pallas' interpreter here: these tests check its numbers, not its speed (benchmarks/bench_gpu.py does that).
Off a GPU, wrap(fused=True) itself runs the kernel's formula as plain XLA matmuls (tested too)."""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from adapter_files import tiny_llama, write_adapter
from peft_twin import rel_err

import jlora
from jlora import side_paths
from jlora.fused_matmul import block_sizes, lora_matmul, lora_matmul_grouped

IDS = np.array([[1, 5, 9, 3, 60, 2, 7], [4, 4, 8, 11, 0, 33, 12]], np.int32)


@pytest.fixture
def interpreted(monkeypatch):
    """wrap(fused=True) runs the kernel itself (in Pallas' interpreter) instead of its plain-XLA form."""
    monkeypatch.setattr(side_paths, "FUSED_IN_INTERPRETER", True)


def _reference(x, w, a, b, scale):
    f = lambda v: np.asarray(v, np.float64)  # noqa: E731
    return f(x) @ f(w) + scale * (f(x) @ f(a)) @ f(b)


@pytest.mark.parametrize("m,k,n,r,dtype", [(1, 256, 128, 8, np.float32), (5, 128, 64, 16, np.float32),
                                           (130, 128, 256, 20, np.float32), (40, 256, 96, 4, ml_dtypes.bfloat16)],
                         ids=["one row", "ragged rows", "several row blocks, rank padded to 32", "bf16"])
def test_lora_matmul_matches_the_formula(m, k, n, r, dtype):
    rng = np.random.default_rng(0)
    x, w, a, b = (rng.standard_normal(s).astype(dtype) for s in ((m, k), (k, n), (k, r), (r, n)))
    want = _reference(x, w, a, b, 0.3)
    tolerance = 1e-6 if dtype == np.float32 else 2 ** -7  # bf16: (x@A)*s and the output rounded once each
    for interpret in (True, False):  # the kernel (interpreted), and its plain-XLA form used off a GPU
        got = lora_matmul(*map(jnp.asarray, (x, w, a, b)), jnp.float32(0.3), interpret)
        assert got.shape == (m, n) and got.dtype == np.dtype(dtype)
        assert float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()) <= tolerance


@pytest.mark.parametrize("scale", [0.7, np.array([0.5, -1.0, 2.0, 0.25], np.float32)], ids=["scalar", "per column"])
def test_lora_matmul_gradients_match_the_formula(scale):
    rng = np.random.default_rng(1)
    args = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((5, 128), (128, 64), (128, 4), (4, 64))]
    args.append(jnp.asarray(scale, jnp.float32))
    loss = lambda f: lambda *v: jnp.sum(jnp.sin(f(*v)))  # noqa: E731
    got = jax.grad(loss(lambda *v: lora_matmul(*v, True)), argnums=range(5))(*args)
    want = jax.grad(loss(lambda x, w, a, b, s: x @ w + ((x @ a) * s) @ b), argnums=range(5))(*args)
    # float32 both ways; sin' = cos of outputs near 10 turns their last-bit differences (the two compute x @ w in
    # other orders) into ~2e-5 of the gradient on some CPUs; a wrong formula is off by O(1)
    for g, h in zip(got, want, strict=True):
        assert g.shape == h.shape and rel_err(g, h) <= 1e-4


@pytest.mark.parametrize("m,n", [(1, 11008), (16, 4096), (256, 4096), (1000, 11008)])
def test_lora_matmul_lowers_to_a_triton_kernel(m, n):
    """The GPU form (not the interpreter) lowers to one Triton kernel for Llama-sized shapes: checked here without
    a GPU by exporting it for CUDA (Triton's IR is built; compiling it to PTX needs the GPU)."""
    from jax import export

    shapes = [((m, 4096), jnp.bfloat16), ((4096, n), jnp.bfloat16), ((4096, 16), jnp.bfloat16), ((16, n), jnp.bfloat16),
              ((), jnp.float32)]
    exported = export.export(jax.jit(lambda *v: lora_matmul(*v, False)), platforms=["cuda"],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
        *(jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes))
    module = exported.mlir_module()
    assert module.count("xla.gpu.triton") == 1 and "jlora_lora_matmul" in module


@pytest.mark.parametrize("scale,dtype,rows", [(np.array([0.5, 0.0, 2.0], np.float32), np.float32, 32),
                                              (np.array([[0.5, 1.0, -1.0], [0.0] * 3, [2.0, 2.0, 0.25]], np.float32),
                                               np.float32, 32),
                                              (np.array([0.5, 0.0, 2.0], np.float32), ml_dtypes.bfloat16, 32),
                                              (np.linspace(-1.0, 2.0, 20).astype(np.float32), np.float32, 1),
                                              (np.linspace(-1.0, 2.0, 20).astype(np.float32), ml_dtypes.bfloat16, 1)],
                         ids=["one scale per group", "per column", "bf16", "one row per group, ragged blocks",
                              "one row per group, bf16"])
def test_lora_matmul_grouped_matches_the_formula(scale, dtype, rows):
    """Each group of rows (an example of a mixed batch) with its own A, B and scale; scale 0 = the base model. Groups
    of one row (decoding) take the kernel's per-row form; 20 rows leave the second row block partly empty."""
    rng = np.random.default_rng(3)
    groups, k, n, r = len(scale), 128, 64, 3
    x, w = rng.standard_normal((groups * rows, k)).astype(dtype), rng.standard_normal((k, n)).astype(dtype)
    a, b = rng.standard_normal((groups, k, r)).astype(dtype), rng.standard_normal((groups, r, n)).astype(dtype)
    want = np.concatenate([_reference(x[g * rows:(g + 1) * rows], w, a[g], b[g], scale[g]) for g in range(groups)])
    tolerance = 1e-6 if dtype == np.float32 else 2 ** -7
    for interpret in (True, False):
        got = lora_matmul_grouped(*map(jnp.asarray, (x, w, a, b, scale)), rows, interpret)
        assert got.shape == (groups * rows, n) and got.dtype == np.dtype(dtype)
        assert float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()) <= tolerance


@pytest.mark.parametrize("groups,rows", [(2, 16), (5, 1)])
def test_lora_matmul_grouped_gradients_match_the_formula(groups, rows):
    rng = np.random.default_rng(4)
    args = [jnp.asarray(rng.standard_normal(s), jnp.float32)
            for s in ((groups * rows, 128), (128, 64), (groups, 128, 4), (groups, 4, 64), (groups,))]

    def formula(x, w, a, b, s):
        xa = jnp.einsum("gmk,gkr->gmr", x.reshape(groups, rows, -1), a) * s[:, None, None]
        return x @ w + jnp.einsum("gmr,grn->gmn", xa, b).reshape(groups * rows, -1)

    loss = lambda f: lambda *v: jnp.sum(jnp.sin(0.1 * f(*v)))  # noqa: E731 (0.1: tames the outputs ~10)
    got = jax.grad(loss(lambda *v: lora_matmul_grouped(*v, rows, True)), argnums=range(5))(*args)
    for g, h in zip(got, jax.grad(loss(formula), argnums=range(5))(*args), strict=True):
        assert g.shape == h.shape and rel_err(g, h) <= 1e-5


@pytest.mark.parametrize("tokens", [1, 16, 256])
def test_lora_matmul_grouped_lowers_to_a_triton_kernel(tokens):
    """The mixed-batch form for 8 examples of ``tokens`` tokens, exported for CUDA as above: one Triton kernel."""
    from jax import export

    shapes = [((8 * tokens, 4096), jnp.bfloat16), ((4096, 4096), jnp.bfloat16), ((8, 4096, 16), jnp.bfloat16),
              ((8, 16, 4096), jnp.bfloat16), ((8,), jnp.float32)]
    exported = export.export(jax.jit(lambda *v: lora_matmul_grouped(*v, tokens, False)), platforms=["cuda"],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
        *(jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes))
    assert exported.mlir_module().count("xla.gpu.triton") == 1


def test_block_sizes_refuse_shapes_the_blocks_do_not_divide():
    assert block_sizes(1, 4096, 4096) == (16, 32, 128)
    assert block_sizes(1000, 4096, 11008) == (64, 128, 64)
    assert block_sizes(3, 24, 40) is None  # 24 columns: no block of 16 or more divides them
    assert block_sizes(8 * 256, 4096, 4096, group_rows=256)[0] == 64
    assert block_sizes(8 * 48, 4096, 4096, group_rows=48)[0] == 16  # row blocks stay inside one example
    assert block_sizes(8 * 7, 4096, 4096, group_rows=7) is None  # 7 tokens per example: no row block of 16 divides
    assert block_sizes(8, 4096, 4096, group_rows=1) == (16, 32, 32)  # one token per example: the per-row form


def _pallas_calls(fn, *args, **kwargs) -> int:
    return str(jax.make_jaxpr(fn)(*args, **kwargs)).count("pallas_call")


def test_wrap_fused_equals_unfused(tmp_path, interpreted):
    """Every adapted Dense of a tiny Llama runs in the fused kernel; logits equal the unfused path's, and the
    gradients of a loss with respect to the adapter too."""
    model = tiny_llama()
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 3, "target_modules": ["q_proj", "v_proj"]}  # scale 3/4
    lp = jlora.load(model.params, write_adapter(tmp_path / "a", config))
    fused = jlora.wrap(model.__call__, fused=True)
    want = jax.jit(jlora.wrap(model.__call__))(IDS, params=lp).logits
    got = jax.jit(fused)(IDS, params=lp).logits
    assert rel_err(got, want) <= 1e-5 and rel_err(want, model(IDS, params=model.params).logits) > 1e-3
    adapted = len(list(jlora.tree.adapted_modules(lp)))
    assert adapted >= 2 and _pallas_calls(fused, IDS, params=lp) == adapted

    trainable, frozen = jlora.split(lp)

    def loss(t, wrapped):
        return jnp.sum(jnp.tanh(wrapped(IDS, params=jlora.combine(t, frozen)).logits))

    for g, h in zip(jax.tree_util.tree_leaves(jax.grad(loss)(trainable, fused)),
                    jax.tree_util.tree_leaves(jax.grad(loss)(trainable, jlora.wrap(model.__call__))), strict=True):
        assert rel_err(g, h) <= 1e-5


def test_wrap_fused_in_scanned_layers(interpreted):
    """A Dense inside nn.scan (a stacked kernel: per-column scales, one layer's slice per step) runs fused, equal to
    the side path, including a layer the adapter leaves alone (zero factors there)."""
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return x + jnp.tanh(nn.Dense(64, use_bias=False, name="lin")(x)), None

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)(name="blocks")(
                x, None)[0]

    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 5, 64)), jnp.float32)
    params = Stack().init(jax.random.key(0), x)["params"]
    layout = jlora.Layout([jlora.Rule(r"blocks\.(?P<layer>\d+)\.lin", "blocks/lin/kernel", "o i -> layer i o")])
    config = jlora.LoraConfig(r=3, lora_alpha=5, target_modules=["lin"], init_lora_weights=False,
                              layers_to_transform=[0, 2], layers_pattern="blocks")
    lp = jlora.init(params, config, key=jax.random.key(1), layout=layout,
                    module_names=[f"blocks.{i}.lin" for i in range(3)])
    assert lp["blocks"]["lin"]["lora_scale"].ndim > 0
    fused = jlora.wrap(Stack().apply, fused=True)
    want = jax.jit(jlora.wrap(Stack().apply))({"params": lp}, x)
    assert rel_err(jax.jit(fused)({"params": lp}, x), want) <= 1e-5
    assert rel_err(want, Stack().apply({"params": params}, x)) > 1e-3
    assert _pallas_calls(fused, {"params": lp}, x) == 1  # (the scan's body)


@pytest.mark.parametrize("tokens", [16, 1])
def test_wrap_fused_mixed_batch_equals_unfused(tokens, interpreted):
    """A mixed batch (three adapters of other ranks and targets, one with a replaced lm_head, and a base-model row),
    16 tokens or one per example: every LoRA Dense runs as one grouped kernel (the lm_head as usual); logits and
    gradients equal the side path's."""
    model = tiny_llama()

    def made(seed, r, targets, **extra):
        config = jlora.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, **extra)
        return jlora.init(model.params, config, key=jax.random.key(seed))

    mixed = jlora.multi.stack_adapters(model.params, {"a": made(1, 4, ["q_proj", "v_proj"],
                                                                modules_to_save=["lm_head"]),
                                                      "b": made(2, 2, ["v_proj", "down_proj"]),
                                                      "c": made(3, 8, ["q_proj"])})
    ids = jnp.asarray(np.random.default_rng(5).integers(0, 64, (4, tokens)), jnp.int32)
    which = jnp.array([2, -1, 0, 1])
    fused = jlora.wrap(model.__call__, fused=True)
    want = jax.jit(jlora.wrap(model.__call__))(ids, params=mixed, adapter_ids=which).logits
    assert rel_err(jax.jit(fused)(ids, params=mixed, adapter_ids=which).logits, want) <= 1e-5
    assert rel_err(want[1], model(ids[1:2], params=model.params).logits[0]) <= 1e-5  # (-1: the base model)
    lora_modules = [n for _, n in jlora.tree.adapted_modules(mixed) if n.spec.has_lora]
    assert _pallas_calls(fused, ids, params=mixed, adapter_ids=which) == len(lora_modules) >= 4

    trainable, frozen = jlora.split(mixed)

    def loss(t, wrapped):
        return jnp.sum(jnp.tanh(wrapped(ids, params=jlora.combine(t, frozen), adapter_ids=which).logits))

    for g, h in zip(jax.tree_util.tree_leaves(jax.grad(loss)(trainable, fused)),
                    jax.tree_util.tree_leaves(jax.grad(loss)(trainable, jlora.wrap(model.__call__))), strict=True):
        assert rel_err(g, h) <= 1e-5


def test_generate_fused_with_mixed_adapters_equals_unfused(interpreted):
    """Greedy generation with a KV cache, one adapter per row: the 16-token prompt runs in the grouped kernel, each
    one-token step in its per-row form; the tokens are the unfused run's."""
    model = tiny_llama()

    def made(seed, r):
        config = jlora.LoraConfig(r=r, lora_alpha=4 * r, target_modules=["q_proj", "v_proj", "down_proj"],
                                  init_lora_weights=False)
        return jlora.init(model.params, config, key=jax.random.key(seed))

    mixed = jlora.multi.stack_adapters(model.params, {"a": made(1, 4), "b": made(2, 8)})
    prompt = jnp.asarray(np.random.default_rng(6).integers(0, 64, (3, 16)), jnp.int32)
    kw = dict(adapter_ids=jnp.array([1, -1, 0]), max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    want = np.asarray(jlora.wrap(model.generate)(prompt, params=mixed, **kw).sequences)
    got = np.asarray(jlora.wrap(model.generate, fused=True)(prompt, params=mixed, **kw).sequences)
    np.testing.assert_array_equal(got, want)
    base = np.asarray(model.generate(prompt, params=model.params, **{k: v for k, v in kw.items()
                                                                     if k != "adapter_ids"}).sequences)
    np.testing.assert_array_equal(want[1], base[1])
    assert (want[[0, 2], 16:] != base[[0, 2], 16:]).any()  # the adapters change the tokens


def test_wrap_fused_leaves_other_adapters_to_the_side_path(interpreted):
    """DoRA, and mixed batches whose examples' token counts no row block divides (7 here), do not fit the kernel:
    they run unfused, with the same results as without fused."""
    model = tiny_llama()

    def made(seed, **config):
        config = jlora.LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False, **config)
        return jlora.init(model.params, config, key=jax.random.key(seed))

    dora = made(0, r=4, use_dora=True)
    fused = jlora.wrap(model.__call__, fused=True)
    assert _pallas_calls(fused, IDS, params=dora) == 0
    np.testing.assert_array_equal(fused(IDS, params=dora).logits, jlora.wrap(model.__call__)(IDS, params=dora).logits)
    mixed = jlora.multi.stack_adapters(model.params, {"a": made(1, r=4), "b": made(2, r=2)})
    assert _pallas_calls(fused, IDS, params=mixed, adapter_ids=jnp.array([1, 0])) == 0
    assert _pallas_calls(fused, IDS, params=made(3, r=4)) == 4  # (the same model with a plain adapter: fused)


def test_wrap_fused_off_a_gpu_runs_plain_matmuls(tmp_path, monkeypatch):
    """Lowered for the CPU, wrap(fused=True) runs the kernel's formula as XLA matmuls (no interpreter loop in the
    program), equal to the side path; with the kernel itself (interpreted) the program has the grid's loop."""
    model = tiny_llama()
    lp = jlora.load(model.params, write_adapter(tmp_path / "a"))
    fused = jax.jit(jlora.wrap(model.__call__, fused=True))
    want = jax.jit(jlora.wrap(model.__call__))(IDS, params=lp).logits
    assert rel_err(fused(IDS, params=lp).logits, want) <= 1e-5
    assert "stablehlo.while" not in fused.lower(IDS, params=lp).as_text()
    monkeypatch.setattr(side_paths, "FUSED_IN_INTERPRETER", True)
    assert "stablehlo.while" in jax.jit(jlora.wrap(model.__call__, fused=True)).lower(IDS, params=lp).as_text()


def _nnx_net(dtype=None):
    """An NNX net of two adapted-to-be nnx.Linear layers whose sizes the kernel's blocks divide, split."""
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(64, 128, dtype=dtype, rngs=rngs)
            self.down = nnx.Linear(128, 64, use_bias=False, dtype=dtype, rngs=rngs)

        def __call__(self, x):
            return self.down(jnp.tanh(self.up(x)))

    return nnx.split(Net(nnx.Rngs(0)))


@pytest.mark.parametrize("stacked", [False, True], ids=["plain", "stacked layers (nnx.scan)"])
def test_nnx_model_fused_equals_unfused(stacked, interpreted):
    """nnx_model(fused=True): every adapted nnx.Linear runs in the fused kernel (in a scan's body too: one layer's
    slice, per-column scales), with the logits and adapter gradients of the unfused side path."""
    from flax import nnx
    from test_layouts import _nnx_scanned_net

    if stacked:
        graphdef, state, layout = _nnx_scanned_net(dim=32)
        names = [f"blocks.{i}.{m}" for i in range(3) for m in ("up", "down")]
        extra = dict(layers_to_transform=[0, 2], layers_pattern="blocks")
    else:
        graphdef, state = _nnx_net()
        layout = jlora.Layout([jlora.Rule(r"(?P<m>up|down)", "{m}/kernel", "o i -> i o")])
        names, extra = ["up", "down"], {}
    config = jlora.LoraConfig(r=4, lora_alpha=6, target_modules=["up", "down"], init_lora_weights=False, **extra)
    lp = jlora.init(state, config, key=jax.random.key(1), layout=layout, module_names=names)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 5, 32 if stacked else 64)), jnp.float32)
    run = lambda fused: lambda p: jlora.nnx_model(graphdef, p, fused=fused)(x)  # noqa: E731
    want = jax.jit(run(False))(lp)
    assert rel_err(jax.jit(run(True))(lp), want) <= 1e-5
    assert rel_err(want, nnx.merge(graphdef, state)(x)) > 1e-3
    assert _pallas_calls(run(True), lp) == 2 and _pallas_calls(run(False), lp) == 0

    trainable, frozen = jlora.split(lp)
    loss = lambda t, fused: jnp.sum(jnp.sin(run(fused)(jlora.combine(t, frozen))))  # noqa: E731
    for g, h in zip(jax.tree_util.tree_leaves(jax.grad(loss)(trainable, True)),
                    jax.tree_util.tree_leaves(jax.grad(loss)(trainable, False)), strict=True):
        assert rel_err(g, h) <= 1e-5


def test_nnx_model_fused_mixed_batch_equals_unfused(interpreted):
    """nnx_model(fused=True, adapter_ids=...): the grouped kernel on nnx.Linear, equal to the side path."""
    graphdef, state = _nnx_net()
    layout = jlora.Layout([jlora.Rule(r"(?P<m>up|down)", "{m}/kernel", "o i -> i o")])

    def made(seed, r, targets):
        config = jlora.LoraConfig(r=r, lora_alpha=6, target_modules=targets, init_lora_weights=False)
        return jlora.init(state, config, key=jax.random.key(seed), layout=layout, module_names=targets)

    mixed = jlora.multi.stack_adapters(state.to_pure_dict(), {"a": made(1, 4, ["up", "down"]), "b": made(2, 2, ["up"])})
    x = jnp.asarray(np.random.default_rng(3).standard_normal((3, 16, 64)), jnp.float32)
    which = jnp.array([1, -1, 0])
    run = lambda fused: lambda p: jlora.nnx_model(graphdef, p, adapter_ids=which, fused=fused)(x)  # noqa: E731
    want = jax.jit(run(False))(mixed)
    assert rel_err(jax.jit(run(True))(mixed), want) <= 1e-5
    assert _pallas_calls(run(True), mixed) == 2 and _pallas_calls(run(False), mixed) == 0


def test_fused_warns_when_the_adapter_is_cast_every_call():
    """A float32 adapter on modules computing in bf16 is cast on every call: fused=True says so (once), and a bf16
    adapter runs without a warning."""
    graphdef, state = _nnx_net(jnp.bfloat16)
    layout = jlora.Layout([jlora.Rule(r"(?P<m>up|down)", "{m}/kernel", "o i -> i o")])
    config = jlora.LoraConfig(r=4, target_modules=["up", "down"], init_lora_weights=False)
    lp = jlora.init(state, config, key=jax.random.key(1), layout=layout, module_names=["up", "down"])
    x = jnp.ones((3, 64), jnp.bfloat16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # (Python's own: a warning once per place)
        jlora.nnx_model(graphdef, lp, fused=True)(x)
    cast = [w for w in caught if "is cast on every call" in str(w.message)]
    assert len(cast) == 1 and "an adapter in float32 on modules computing in bfloat16" in str(cast[0].message)
    bf16 = jax.tree_util.tree_map(lambda v: v.astype(jnp.bfloat16) if v.dtype == jnp.float32 else v, lp)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jlora.nnx_model(graphdef, bf16, fused=True)(x)
