"""Two small Llama-style causal decoders written from scratch in Flax, numerically equivalent to
transformers' PyTorch ``LlamaForCausalLM`` (default rope, no rope scaling, no biases, untied lm_head),
plus converters from a torch ``LlamaForCausalLM.state_dict()``.  Test support only (not collected).

Shapes: D hidden, L layers, N query heads, K key/value heads, H head_dim, F intermediate, V vocab.

Public API
----------
``ScannedLlama(config)``  (flax.linen; MaxText style, layers under ``nn.scan`` with the layer axis at
position 1 of every scanned parameter)
    ``ScannedLlama(config).apply({"params": params}, input_ids) -> logits (B, T, V) float32``
    params paths::

        embed/embedding                       (V, D)
        decoder/layers/attn_norm/scale        (D, L)
        decoder/layers/mlp_norm/scale         (D, L)
        decoder/layers/attn/query/kernel      (D, L, N, H)
        decoder/layers/attn/key/kernel        (D, L, K, H)
        decoder/layers/attn/value/kernel      (D, L, K, H)
        decoder/layers/attn/out/kernel        (N, L, H, D)
        decoder/layers/mlp/wi_0/kernel        (D, L, F)     gate_proj
        decoder/layers/mlp/wi_1/kernel        (D, L, F)     up_proj
        decoder/layers/mlp/wo/kernel          (F, L, D)     down_proj
        final_norm/scale                      (D,)
        lm_head/kernel                        (D, V)

``NnxLlama(config, *, rngs)``  (flax.nnx; layers in ``nnx.List``; FUSED key/value projection)
    ``model(input_ids) -> logits (B, T, V) float32``
    ``nnx.split(model)[1].to_pure_dict()`` paths (i = 0..L-1, int keys)::

        embed/embedding                       (V, D)
        layers/i/attn_norm/scale              (D,)
        layers/i/attn/q/kernel                (D, N*H)
        layers/i/attn/kv/kernel               (D, 2, K, H)  [:, 0] = key, [:, 1] = value
        layers/i/attn/o/kernel                (N*H, D)
        layers/i/mlp_norm/scale               (D,)
        layers/i/mlp/gate/kernel              (D, F)
        layers/i/mlp/up/kernel                (D, F)
        layers/i/mlp/down/kernel              (F, D)
        final_norm/scale                      (D,)
        lm_head/kernel                        (D, V)

``nnx_logits(graphdef, pure_params, input_ids, state=None) -> logits``
    Rebuilds the model from ``graphdef`` and a pure dict and runs it; jit-able with the pure dict as a
    traced argument (``jax.jit(nnx_logits, static_argnums=0)`` or close over ``graphdef``).  If
    ``state`` (an ``nnx.State`` template, e.g. ``nnx.split(model)[1]``) is given the round trip is
    ``nnx.replace_by_pure_dict(state, pure); nnx.merge(graphdef, state)`` on a copy of ``state``, otherwise
    ``nnx.merge(graphdef, pure)`` directly.

``make_nnx_llama(config, seed=0, abstract=False) -> (graphdef, state)``
    convenience: ``nnx.split(NnxLlama(...))``; ``abstract=True`` builds it under ``nnx.eval_shape``.

Converters (torch tensors -> numpy float32 arrays, or ``dtype``):
    ``scanned_params_from_torch(state_dict, config, dtype=np.float32) -> dict``
        the linen ``params`` collection (without the ``{"params": ...}`` wrapper).
    ``nnx_pure_params_from_torch(state_dict, config, template=None, dtype=np.float32) -> dict``
        a pure dict in the layout of ``nnx.split(NnxLlama(config, ...))[1].to_pure_dict()``; if
        ``template`` (a pure dict or an ``nnx.State``) is given, the key set and shapes are checked.

Helpers: ``flatten_paths(tree) -> {"a/b/c": shape}``, ``head_dim(config)``.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "ScannedLlama", "NnxLlama", "nnx_logits", "make_nnx_llama", "scanned_params_from_torch",
    "nnx_pure_params_from_torch", "flatten_paths", "head_dim",
]


# ----------------------------------------------------------------------------------------------------
# shared math (HF Llama semantics)

def head_dim(config) -> int:
    hd = getattr(config, "head_dim", None)
    return int(hd) if hd else config.hidden_size // config.num_attention_heads


def _rms_norm(x, weight, eps):
    """HF LlamaRMSNorm: normalise in float32, cast back to the input dtype, then multiply by weight."""
    in_dtype = x.dtype
    h = x.astype(jnp.float32)
    var = jnp.mean(h * h, axis=-1, keepdims=True)
    h = h * jax.lax.rsqrt(var + eps)
    return weight * h.astype(in_dtype)


def _rope_theta(config) -> float:
    return float(getattr(config, "rope_theta", None) or 10000.0)


def _rope_cos_sin(hd, theta, seq_len):
    """Default Llama rotary embedding: cos/sin of shape (T, H), halves duplicated (rotate_half style)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / hd))
    pos = jnp.arange(seq_len, dtype=jnp.float32)
    freqs = pos[:, None] * jnp.asarray(inv_freq)[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _rotate_half(x):
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def _apply_rope(x, cos, sin):
    """x: (B, T, heads, H); cos/sin: (T, H)."""
    c = cos[None, :, None, :].astype(x.dtype)
    s = sin[None, :, None, :].astype(x.dtype)
    return x * c + _rotate_half(x) * s


def _attention(q, k, v, cos, sin):
    """q: (B, T, N, H), k/v: (B, T, K, H) -> (B, T, N, H); causal, GQA, softmax in float32."""
    q = _apply_rope(q, cos, sin)
    k = _apply_rope(k, cos, sin)
    n, kh = q.shape[2], k.shape[2]
    if n != kh:
        k = jnp.repeat(k, n // kh, axis=2)  # head i uses kv head i // (N // K), as HF repeat_kv
        v = jnp.repeat(v, n // kh, axis=2)
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("btnh,bsnh->bnts", q, k) * scale
    t = q.shape[1]
    mask = jnp.tril(jnp.ones((t, t), dtype=bool))
    scores = jnp.where(mask[None, None], scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
    return jnp.einsum("bnts,bsnh->btnh", probs, v)


# ----------------------------------------------------------------------------------------------------
# linen, scanned (MaxText style)

class LinenRMSNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        return _rms_norm(x, scale, self.eps)


class _ScanAttention(nn.Module):
    config: object

    @nn.compact
    def __call__(self, x, cos, sin):
        c = self.config
        n, k, h = c.num_attention_heads, c.num_key_value_heads, head_dim(c)
        q = nn.DenseGeneral(features=(n, h), axis=-1, use_bias=False, name="query")(x)
        kk = nn.DenseGeneral(features=(k, h), axis=-1, use_bias=False, name="key")(x)
        v = nn.DenseGeneral(features=(k, h), axis=-1, use_bias=False, name="value")(x)
        o = _attention(q, kk, v, cos, sin)
        return nn.DenseGeneral(features=c.hidden_size, axis=(-2, -1), use_bias=False, name="out")(o)


class _ScanMlp(nn.Module):
    config: object

    @nn.compact
    def __call__(self, x):
        f = self.config.intermediate_size
        gate = nn.DenseGeneral(features=f, use_bias=False, name="wi_0")(x)
        up = nn.DenseGeneral(features=f, use_bias=False, name="wi_1")(x)
        return nn.Dense(self.config.hidden_size, use_bias=False, name="wo")(nn.silu(gate) * up)


class _ScanBlock(nn.Module):
    config: object

    @nn.compact
    def __call__(self, x, cos, sin):
        eps = self.config.rms_norm_eps
        x = x + _ScanAttention(self.config, name="attn")(LinenRMSNorm(eps, name="attn_norm")(x), cos, sin)
        x = x + _ScanMlp(self.config, name="mlp")(LinenRMSNorm(eps, name="mlp_norm")(x))
        return x, None


class _ScanDecoder(nn.Module):
    config: object

    @nn.compact
    def __call__(self, x, cos, sin):
        layers = nn.scan(
            _ScanBlock,
            variable_axes={"params": 1},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast),
            length=self.config.num_hidden_layers,
        )(self.config, name="layers")
        x, _ = layers(x, cos, sin)
        return x


class ScannedLlama(nn.Module):
    """``ScannedLlama(config).apply({"params": p}, input_ids) -> (B, T, V) float32 logits``."""
    config: object

    @nn.compact
    def __call__(self, input_ids):
        c = self.config
        x = nn.Embed(c.vocab_size, c.hidden_size, name="embed")(input_ids)
        cos, sin = _rope_cos_sin(head_dim(c), _rope_theta(c), input_ids.shape[1])
        x = _ScanDecoder(c, name="decoder")(x, cos, sin)
        x = LinenRMSNorm(c.rms_norm_eps, name="final_norm")(x)
        return nn.Dense(c.vocab_size, use_bias=False, name="lm_head")(x).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------------
# nnx, list of layers, fused kv

class NnxRMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x):
        return _rms_norm(x, self.scale[...], self.eps)


class NnxAttention(nnx.Module):
    def __init__(self, config, *, rngs: nnx.Rngs):
        d = config.hidden_size
        self.n, self.k, self.h = config.num_attention_heads, config.num_key_value_heads, head_dim(config)
        self.q = nnx.Linear(d, self.n * self.h, use_bias=False, rngs=rngs)
        self.kv = nnx.LinearGeneral(d, (2, self.k, self.h), use_bias=False, rngs=rngs)
        self.o = nnx.Linear(self.n * self.h, d, use_bias=False, rngs=rngs)

    def __call__(self, x, cos, sin):
        b, t, _ = x.shape
        q = self.q(x).reshape(b, t, self.n, self.h)
        kv = self.kv(x)  # (B, T, 2, K, H)
        o = _attention(q, kv[:, :, 0], kv[:, :, 1], cos, sin)
        return self.o(o.reshape(b, t, self.n * self.h))


class NnxMlp(nnx.Module):
    def __init__(self, config, *, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.gate = nnx.Linear(d, f, use_bias=False, rngs=rngs)
        self.up = nnx.Linear(d, f, use_bias=False, rngs=rngs)
        self.down = nnx.Linear(f, d, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.down(nnx.silu(self.gate(x)) * self.up(x))


class NnxBlock(nnx.Module):
    def __init__(self, config, *, rngs: nnx.Rngs):
        self.attn_norm = NnxRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = NnxAttention(config, rngs=rngs)
        self.mlp_norm = NnxRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = NnxMlp(config, rngs=rngs)

    def __call__(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class NnxLlama(nnx.Module):
    """``NnxLlama(config, rngs=nnx.Rngs(0))(input_ids) -> (B, T, V) float32 logits``."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        # keep only hashable scalars as static attributes (a LlamaConfig would make the graphdef unhashable)
        self.head_dim, self.rope_theta = head_dim(config), _rope_theta(config)
        d = config.hidden_size
        self.embed = nnx.Embed(config.vocab_size, d, rngs=rngs)
        self.layers = nnx.List([NnxBlock(config, rngs=rngs) for _ in range(config.num_hidden_layers)])
        self.final_norm = NnxRMSNorm(d, config.rms_norm_eps)
        self.lm_head = nnx.Linear(d, config.vocab_size, use_bias=False, rngs=rngs)

    def __call__(self, input_ids):
        x = self.embed(input_ids)
        cos, sin = _rope_cos_sin(self.head_dim, self.rope_theta, input_ids.shape[1])
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.final_norm(x)).astype(jnp.float32)


def make_nnx_llama(config, seed: int = 0, abstract: bool = False):
    """``nnx.split(NnxLlama(config, rngs=nnx.Rngs(seed)))`` -> (graphdef, state).

    ``abstract=True`` builds it under ``nnx.eval_shape`` (state leaves are ShapeDtypeStructs: no
    compute, enough for a graphdef and a shape template)."""
    if abstract:
        return nnx.split(nnx.eval_shape(lambda: NnxLlama(config, rngs=nnx.Rngs(seed))))
    return nnx.split(NnxLlama(config, rngs=nnx.Rngs(seed)))


def nnx_logits(graphdef, pure_params, input_ids, state=None):
    """Rebuild an NnxLlama from ``graphdef`` + pure dict and return its logits (jit-able)."""
    if state is not None:
        state = jax.tree.map(lambda a: a, state)  # fresh containers: the caller's template is untouched
        if hasattr(nnx, "replace_by_pure_dict"):
            nnx.replace_by_pure_dict(state, pure_params)
        else:  # older flax
            state.replace_by_pure_dict(pure_params)
        model = nnx.merge(graphdef, state)
    else:
        model = nnx.merge(graphdef, pure_params)
    return model(input_ids)


# ----------------------------------------------------------------------------------------------------
# converters

def _np(t, dtype):
    if hasattr(t, "detach"):
        t = t.detach().cpu().float().numpy()
    return np.asarray(t, dtype=dtype)


def _dims(config):
    return (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, head_dim(config), config.intermediate_size, config.vocab_size)


def _lm_head_weight(sd):
    # untied by design; fall back to the embedding if a tied checkpoint omitted lm_head.weight
    return sd["lm_head.weight"] if "lm_head.weight" in sd else sd["model.embed_tokens.weight"]


def scanned_params_from_torch(state_dict, config, dtype=np.float32) -> dict:
    """torch ``LlamaForCausalLM.state_dict()`` -> ScannedLlama ``params`` collection (no wrapper)."""
    d, nl, n, k, h, f, v = _dims(config)
    sd = {name: _np(t, dtype) for name, t in state_dict.items()}

    def per_layer(fmt, fn):
        return np.stack([fn(sd[fmt.format(i)]) for i in range(nl)], axis=1)

    pre = "model.layers.{}."
    return {
        "embed": {"embedding": sd["model.embed_tokens.weight"]},
        "decoder": {"layers": {
            "attn_norm": {"scale": per_layer(pre + "input_layernorm.weight", lambda w: w)},
            "mlp_norm": {"scale": per_layer(pre + "post_attention_layernorm.weight", lambda w: w)},
            "attn": {
                "query": {"kernel": per_layer(pre + "self_attn.q_proj.weight", lambda w: w.T.reshape(d, n, h))},
                "key": {"kernel": per_layer(pre + "self_attn.k_proj.weight", lambda w: w.T.reshape(d, k, h))},
                "value": {"kernel": per_layer(pre + "self_attn.v_proj.weight", lambda w: w.T.reshape(d, k, h))},
                "out": {"kernel": per_layer(pre + "self_attn.o_proj.weight", lambda w: w.T.reshape(n, h, d))},
            },
            "mlp": {
                "wi_0": {"kernel": per_layer(pre + "mlp.gate_proj.weight", lambda w: w.T)},
                "wi_1": {"kernel": per_layer(pre + "mlp.up_proj.weight", lambda w: w.T)},
                "wo": {"kernel": per_layer(pre + "mlp.down_proj.weight", lambda w: w.T)},
            },
        }},
        "final_norm": {"scale": sd["model.norm.weight"]},
        "lm_head": {"kernel": np.ascontiguousarray(_lm_head_weight(sd).T)},
    }


def nnx_pure_params_from_torch(state_dict, config, template=None, dtype=np.float32) -> dict:
    """torch ``LlamaForCausalLM.state_dict()`` -> NnxLlama pure dict (``to_pure_dict()`` layout).

    ``template``: optional pure dict or ``nnx.State`` of an NnxLlama for ``config``; when given, the
    result's paths and shapes are checked against it (ValueError on mismatch)."""
    d, nl, n, k, h, f, v = _dims(config)
    sd = {name: _np(t, dtype) for name, t in state_dict.items()}
    layers = {}
    for i in range(nl):
        p = f"model.layers.{i}."
        kw = sd[p + "self_attn.k_proj.weight"].T.reshape(d, k, h)
        vw = sd[p + "self_attn.v_proj.weight"].T.reshape(d, k, h)
        layers[i] = {
            "attn_norm": {"scale": sd[p + "input_layernorm.weight"]},
            "attn": {
                "q": {"kernel": np.ascontiguousarray(sd[p + "self_attn.q_proj.weight"].T)},
                "kv": {"kernel": np.stack([kw, vw], axis=1)},
                "o": {"kernel": np.ascontiguousarray(sd[p + "self_attn.o_proj.weight"].T)},
            },
            "mlp_norm": {"scale": sd[p + "post_attention_layernorm.weight"]},
            "mlp": {
                "gate": {"kernel": np.ascontiguousarray(sd[p + "mlp.gate_proj.weight"].T)},
                "up": {"kernel": np.ascontiguousarray(sd[p + "mlp.up_proj.weight"].T)},
                "down": {"kernel": np.ascontiguousarray(sd[p + "mlp.down_proj.weight"].T)},
            },
        }
    pure = {
        "embed": {"embedding": sd["model.embed_tokens.weight"]},
        "layers": layers,
        "final_norm": {"scale": sd["model.norm.weight"]},
        "lm_head": {"kernel": np.ascontiguousarray(_lm_head_weight(sd).T)},
    }
    if template is not None:
        want, got = flatten_paths(template), flatten_paths(pure)
        if want != got:
            raise ValueError(f"converted tree does not match template:\n want {want}\n got  {got}")
    return pure


def _pure(tree):
    if isinstance(tree, nnx.State):
        return nnx.to_pure_dict(tree) if hasattr(nnx, "to_pure_dict") else tree.to_pure_dict()
    return tree


def flatten_paths(tree) -> dict:
    """Nested dict / State -> {"a/0/b": shape tuple}, sorted by path."""
    tree = _pure(tree)
    out = {}

    def walk(node, prefix):
        if isinstance(node, dict) or hasattr(node, "items") and not hasattr(node, "shape"):
            for key, val in node.items():
                walk(val, f"{prefix}/{key}" if prefix else str(key))
        else:
            out[prefix] = tuple(np.shape(node))

    walk(tree, "")
    return dict(sorted(out.items()))
