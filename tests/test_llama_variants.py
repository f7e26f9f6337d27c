"""The from-scratch Flax Llama variants in llama_variants.py match transformers' torch LlamaForCausalLM."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from flax import nnx
from llama_variants import (
    NnxLlama,
    ScannedLlama,
    flatten_paths,
    make_nnx_llama,
    nnx_logits,
    nnx_pure_params_from_torch,
    scanned_params_from_torch,
)

TOL = 1e-5
V, D, F, L, N, K, H = 64, 32, 48, 2, 4, 2, 8


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def setup():
    config = tf.LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
                            num_attention_heads=N, num_key_value_heads=K, head_dim=H,
                            max_position_embeddings=64, tie_word_embeddings=False, torch_dtype="float32")
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # norm weights default to ones: make them non-trivial
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    ids = np.random.default_rng(0).integers(0, V, size=(2, 7)).astype(np.int64)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.float().numpy()
    return config, model.state_dict(), ids, ref


def test_scanned_param_shapes(setup):
    config, sd, ids, _ = setup
    params = scanned_params_from_torch(sd, config)
    want = {
        "embed/embedding": (V, D),
        "decoder/layers/attn_norm/scale": (D, L),
        "decoder/layers/mlp_norm/scale": (D, L),
        "decoder/layers/attn/query/kernel": (D, L, N, H),
        "decoder/layers/attn/key/kernel": (D, L, K, H),
        "decoder/layers/attn/value/kernel": (D, L, K, H),
        "decoder/layers/attn/out/kernel": (N, L, H, D),
        "decoder/layers/mlp/wi_0/kernel": (D, L, F),
        "decoder/layers/mlp/wi_1/kernel": (D, L, F),
        "decoder/layers/mlp/wo/kernel": (F, L, D),
        "final_norm/scale": (D,),
        "lm_head/kernel": (D, V),
    }
    assert flatten_paths(params) == dict(sorted(want.items()))
    # the converter's layout is exactly what the linen module initialises
    init = jax.eval_shape(lambda: ScannedLlama(config).init(jax.random.key(0), jnp.asarray(ids))["params"])
    assert flatten_paths(init) == flatten_paths(params)


def test_nnx_param_shapes(setup):
    config, sd, _, _ = setup
    _, state = make_nnx_llama(config, abstract=True)
    template = nnx.to_pure_dict(state)
    assert 0 in template["layers"] and 1 in template["layers"]  # int keys from nnx.List
    want = {"embed/embedding": (V, D), "final_norm/scale": (D,), "lm_head/kernel": (D, V)}
    for i in range(L):
        want.update({
            f"layers/{i}/attn_norm/scale": (D,),
            f"layers/{i}/mlp_norm/scale": (D,),
            f"layers/{i}/attn/q/kernel": (D, N * H),
            f"layers/{i}/attn/kv/kernel": (D, 2, K, H),
            f"layers/{i}/attn/o/kernel": (N * H, D),
            f"layers/{i}/mlp/gate/kernel": (D, F),
            f"layers/{i}/mlp/up/kernel": (D, F),
            f"layers/{i}/mlp/down/kernel": (F, D),
        })
    assert flatten_paths(template) == dict(sorted(want.items()))
    pure = nnx_pure_params_from_torch(sd, config, template)
    assert flatten_paths(pure) == flatten_paths(template)
    kv = pure["layers"][1]["attn"]["kv"]["kernel"]
    np.testing.assert_array_equal(kv[:, 0], sd["model.layers.1.self_attn.k_proj.weight"].numpy().T.reshape(D, K, H))
    np.testing.assert_array_equal(kv[:, 1], sd["model.layers.1.self_attn.v_proj.weight"].numpy().T.reshape(D, K, H))


def test_scanned_logits_match_torch(setup):
    config, sd, ids, ref = setup
    params = jax.tree.map(jnp.asarray, scanned_params_from_torch(sd, config))
    out = jax.jit(ScannedLlama(config).apply)({"params": params}, jnp.asarray(ids))
    assert out.shape == (2, 7, V) and out.dtype == jnp.float32
    assert rel_err(out, ref) <= TOL


def test_nnx_logits_match_torch(setup):
    config, sd, ids, ref = setup
    graphdef, state = make_nnx_llama(config, abstract=True)  # eager random init is slow on CPU
    model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, nnx_pure_params_from_torch(sd, config, state)))
    assert isinstance(model, NnxLlama)
    out = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids))  # model(input_ids), compiled once
    assert out.shape == (2, 7, V) and out.dtype == jnp.float32
    assert rel_err(out, ref) <= TOL


def test_nnx_logits_under_jit(setup):
    config, sd, ids, ref = setup
    graphdef, state = make_nnx_llama(config, abstract=True)
    pure = jax.tree.map(jnp.asarray, nnx_pure_params_from_torch(sd, config, state))

    @jax.jit
    def both(pure_params, input_ids):  # the pure dict is a traced argument
        direct = nnx_logits(graphdef, pure_params, input_ids)
        # explicit template round trip: copy of state -> replace_by_pure_dict -> merge
        via_state = nnx_logits(graphdef, pure_params, input_ids, state=state)
        return direct, via_state

    direct, via_state = both(pure, jnp.asarray(ids))
    assert rel_err(direct, ref) <= TOL
    assert rel_err(via_state, ref) <= TOL
    # the template was not mutated
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.to_pure_dict(state)))
    # also jit-able with the graphdef as a static argument
    out = jax.jit(nnx_logits, static_argnums=0)(graphdef, pure, jnp.asarray(ids))
    assert rel_err(out, ref) <= TOL
