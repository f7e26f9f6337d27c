"""Model-zoo dense layers that name their input axes (MaxText's ``DenseGeneral``: ``axis``, ``in_features_shape``,
``out_features_shape``, ``kernel``) run unmerged in ``jlora.nnx_model``: unstacked ones inside the model's own
``nnx.split`` / ``nnx.merge`` under remat, stacked ones (layers at kernel axis 1) inside its own ``jax.lax.scan`` over
moved parameters, as MaxText's decoder runs them. Needs no MaxText (the .ci/run MaxText stage runs the real one)."""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlora
from jlora.side_paths import is_axis_dense

LAYERS, D, N, H = 2, 8, 2, 4


class AxisDense(nnx.Module):
    """MaxText's DenseGeneral's structure: a kernel ``in_features_shape + out_features_shape`` over input ``axis``."""

    def __init__(self, ins: tuple, outs: tuple, axis: tuple, *, rngs: nnx.Rngs):
        self.in_features_shape, self.out_features_shape, self.axis = ins, outs, axis
        self.kernel = nnx.Param(0.3 * jax.random.normal(rngs.params(), ins + outs))

    def __call__(self, x: jax.Array, out_sharding=None) -> jax.Array:
        axes = tuple(a % x.ndim for a in self.axis)
        return jax.lax.dot_general(x, self.kernel[...], ((axes, tuple(range(len(axes)))), ((), ())))


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.query = AxisDense((D,), (N, H), (-1,), rngs=rngs)
        self.out = AxisDense((N, H), (D,), (-2, -1), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.out(jnp.tanh(self.query(x)))


class Model(nnx.Module):
    """Two blocks: ``layers`` stacked at parameter axis 1 and scanned, or ``layers_0`` / ``layers_1``, each run
    through ``nnx.split`` / ``nnx.merge`` under ``jax.checkpoint`` (MaxText's decoder loops)."""

    def __init__(self, scanned: bool, rngs: nnx.Rngs):
        self.scanned = scanned
        blocks = [Block(rngs) for _ in range(LAYERS)]
        if scanned:
            graphdef = nnx.split(blocks[0])[0]
            states = [nnx.split(block)[1] for block in blocks]
            self.layers = nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs, axis=1), *states))
        else:
            self.layers_0, self.layers_1 = blocks

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.scanned:
            graphdef, params, rest = nnx.split(self.layers, nnx.Param, ...)
            params = jax.tree.map(lambda v: jnp.moveaxis(v, 1, 0) if v.ndim > 1 else v, params)
            params = jax.tree.map(lambda v: jnp.broadcast_to(v, (LAYERS,)) if v.ndim == 0 else v, params)
            body = jax.checkpoint(lambda h, p: (nnx.merge(graphdef, p, rest)(h), None))
            return jax.lax.scan(body, x, params)[0]
        for layer in (self.layers_0, self.layers_1):
            graphdef, state = nnx.split(layer)
            x = jax.checkpoint(lambda s, h, g=graphdef: nnx.merge(g, s)(h))(state, x)
        return x


def _layout(scanned: bool) -> jlora.Layout:
    if scanned:
        return jlora.Layout([jlora.Rule(r"layers\.(?P<layer>\d+)\.q", "layers/query/kernel", "(n h) i -> i layer n h",
                                        n=N),
                             jlora.Rule(r"layers\.(?P<layer>\d+)\.o", "layers/out/kernel", "o (n h) -> n layer h o",
                                        n=N)])
    layer = r"layers\.(?P<layer>\d+)"
    return jlora.Layout([jlora.Rule(layer + r"\.q", "layers_{layer}/query/kernel", "(n h) i -> i n h", n=N),
                         jlora.Rule(layer + r"\.o", "layers_{layer}/out/kernel", "o (n h) -> n h o", n=N)])


@pytest.mark.parametrize("scanned", [True, False], ids=["scanned", "unscanned"])
def test_axis_dense_runs_unmerged(scanned):
    """Every projection adds its side path (no jlora warning, no kernel-sized sum in the program), and the
    output equals the merged kernels' (rank-stacked scale per layer too: a rank pattern)."""
    model = Model(scanned, nnx.Rngs(0))
    assert is_axis_dense(model.layers.query if scanned else model.layers_0.query)
    graphdef, state = nnx.split(model)
    names = [f"layers.{i}.{m}" for i in range(LAYERS) for m in ("q", "o")]
    config = jlora.LoraConfig(r=2, lora_alpha=4, target_modules=["q", "o"], rank_pattern={"layers.1.q": 3},
                              init_lora_weights=False)
    lp = jlora.init(nnx.to_pure_dict(state), config, key=jax.random.key(1), layout=_layout(scanned),
                    module_names=names)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, D)), jnp.float32)
    forward = lambda lp: jlora.nnx_model(graphdef, lp)(x)  # noqa: E731
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="jlora")
        got = np.asarray(jax.jit(forward)(lp))
        program = jax.make_jaxpr(forward)(lp)
    want = np.asarray(nnx.merge(graphdef, jlora.merge(lp))(x))
    base = np.asarray(nnx.merge(graphdef, nnx.to_pure_dict(state))(x))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(want - base).max() > 1e-2
    kernels = {(D, N, H), (N, H, D), (D, N * H), (N * H, D), (D, LAYERS, N, H), (N, LAYERS, H, D)}
    sums = [eqn for eqn in _eqns(program.jaxpr) if eqn.primitive.name in ("add", "add_any", "dot_general")
            and tuple(eqn.outvars[0].aval.shape) in kernels]
    assert sums == []


def _eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)
