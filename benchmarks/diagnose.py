"""Where the time goes for the targets benchmarks/run.py reports as missed (evidence for DIAGNOSIS.md).

    python benchmarks/diagnose.py [load] [ops] [layer] [model] [host] [train]   (default: all)

Measures jlora as it is (nothing under jlora/ is modified) and prototypes of alternatives written here,
each timed side by side with the current code (interleaved rounds, median of paired ratios).
"""
from __future__ import annotations

import collections
import re
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import fmt_ratio, fmt_time, interleaved, median_s, paired_ratio, table  # noqa: E402


def section(title: str) -> None:
    print(f"\n## {title}\n", flush=True)


# ------------------------------------------------------------------------------------------------
# load: the stages of jlora.load, and a device-side conversion prototype

def diag_load() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaConfig

    import jlora
    from bench_load import flax_params, make_adapter
    from jlora import load as L
    from jlora.checkpoint import read_safetensors
    from jlora.config import LoraConfig, read_json
    from jlora.inject import inject
    from jlora.layout import get_layout
    from jlora.spec import build_targets, group_keys

    section("load: stages of jlora.load (Llama-shaped r=64 bf16 adapter, 73 MB)")
    cfg = LlamaConfig(hidden_size=2048, num_hidden_layers=16, intermediate_size=5632, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)
    folder = make_adapter(Path(tempfile.mkdtemp()) / "a", cfg, 64)
    path = folder / "adapter_model.safetensors"
    params = flax_params(cfg, jnp.bfloat16)
    path.read_bytes()

    def staged(dtype=None):
        t = [time.perf_counter()]
        config = LoraConfig.from_dict(read_json(folder / "adapter_config.json"))
        tensors = read_safetensors(path)
        t.append(time.perf_counter())
        L._check_values(tensors, str(path), False)
        t.append(time.perf_counter())
        names = list(group_keys(tensors.keys(), str(path)))
        bound = get_layout("hf").bind(params, names)
        targets = build_targets(config, tensors, bound, str(path))
        t.append(time.perf_counter())
        lp = inject(params, config, tensors, targets, bound, dtype=dtype)
        t.append(time.perf_counter())
        jax.block_until_ready(lp)
        t.append(time.perf_counter())
        return np.diff(t)

    stages = ["config + header + memmap", "_check_values (isfinite on float32 copies)",
              "group_keys + bind + build_targets", "inject (host cast + transpose + jnp.asarray)", "block_until_ready"]
    for dtype in (None, jnp.bfloat16):
        staged(dtype)
        runs = np.array([staged(dtype) for _ in range(7)])
        med = np.median(runs, axis=0)
        print(f"jlora.load stages, dtype={'float32 (default)' if dtype is None else 'bfloat16'}: total {fmt_time(med.sum())}")
        print(table(["stage", "median", "share"], [[s, fmt_time(m), f"{100 * m / med.sum():.0f}%"]
                                                   for s, m in zip(stages, med)]))
        print()

    # prototype: hand the memory-mapped bytes to the device as they are (bf16), then one jitted pass does
    # the transposes, the float32 cast and the finite check for all tensors at once
    tensors_mm = read_safetensors(path)
    keys = sorted(tensors_mm)

    @jax.jit
    def convert(arrays):
        out = [a.T.astype(jnp.float32) for a in arrays]
        ok = jnp.all(jnp.stack([jnp.isfinite(o).all() for o in out]))
        return out, ok

    def proto(dtype=jnp.float32):
        mm = read_safetensors(path)
        dev = [jnp.asarray(mm[k]) for k in keys]  # host bytes -> device, no host-side conversion
        out, ok = convert(dev)
        jax.block_until_ready(out)
        if not bool(ok):
            raise ValueError("non-finite")
        return out

    def proto_device_put():
        mm = read_safetensors(path)
        dev = jax.device_put([mm[k] for k in keys])  # one batched transfer
        out, ok = convert(dev)
        jax.block_until_ready(out)
        return bool(ok)

    def floor():
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return sum(float(v.sum()) for v in load_file(str(path)).values())
        finally:
            torch.set_num_threads(n)

    fns = {"floor": floor, "jlora.load": lambda: jax.block_until_ready(jlora.load(params, folder)),
           "prototype: jnp.asarray(bf16 mmap) + one jit (T, f32, isfinite)": proto,
           "prototype: jax.device_put(list) + one jit": proto_device_put}
    samples = interleaved(fns, rounds=9, warmup=1, inner=1)
    med = median_s(samples)
    print(table(["variant", "median", "/ floor (paired)"],
                [[k, fmt_time(med[k]), fmt_ratio(paired_ratio(samples, k, "floor"))] for k in fns]))
    # the prototype's arrays are jlora's
    lp = jlora.load(params, folder)
    out = proto()
    node = lp["model"]["layers"]["3"]["mlp"]["down_proj"]
    base = "base_model.model.model.layers.3.mlp.down_proj"
    same = all(bool(np.array_equal(np.asarray(out[keys.index(f"{base}.{k}.weight")]), np.asarray(node[k])))
               for k in ("lora_A", "lora_B"))
    print(f"\n(prototype output equals jlora.load's, layer 3 down_proj A and B: {same})")


# ------------------------------------------------------------------------------------------------
# shared model for the inference diagnostics

def _model():
    import jlora
    from bench_infer import CPU_MODEL, build

    cfg, tbase, pm, fm, body, adapter = build(Path(tempfile.mkdtemp()), CPU_MODEL, 16)
    lp = jlora.load(fm.params, adapter)
    return cfg, fm, lp


def _ops(text: str) -> collections.Counter:
    return collections.Counter(re.findall(r"= \S+ (\w[\w-]*)\(", text))


def diag_ops() -> None:
    import jax
    import jax.numpy as jnp

    import jlora
    from bench_infer import cost

    section("ops: compiled forward, base vs jlora.wrap (optimized HLO, ENTRY + fused computations)")
    cfg, fm, lp = _model()
    f = lambda i, p: fm(i, params=p).logits  # noqa: E731
    rows = []
    for T in (1, 256, 2048):
        ids = jnp.zeros((1, T), jnp.int32)
        cb = jax.jit(f).lower(ids, fm.params).compile()
        cw = jax.jit(jlora.wrap(f)).lower(ids, lp).compile()
        ob, ow = _ops(cb.as_text()), _ops(cw.as_text())
        kb, kw = cost(cb), cost(cw)
        entry_b = cb.as_text().split("ENTRY")[1]
        entry_w = cw.as_text().split("ENTRY")[1]
        rows.append([T, f"{ob['dot']} -> {ow['dot']}", f"{_ops(entry_b)['fusion']} -> {_ops(entry_w)['fusion']}",
                     f"{kb['flops'] / 1e9:.3f} -> {kw['flops'] / 1e9:.3f} G ({kw['flops'] / kb['flops']:.3f})",
                     f"{kb['bytes'] / 1e6:.1f} -> {kw['bytes'] / 1e6:.1f} MB ({kw['bytes'] / kb['bytes']:.3f})"])
    print(table(["T", "dot ops", "top-level kernels (ENTRY fusions)", "flops", "bytes accessed"], rows))
    print("\n28 adapted linear layers: the side path adds 2 dots each (x@A, (xA)@B); the add of the LoRA term is "
          "fused into the consumer of y (checked in the HLO: no separate add kernel).")


# ------------------------------------------------------------------------------------------------
# one layer: the side path's shape of work vs alternatives (precomputed concatenations)

def diag_layer() -> None:
    import jax
    import jax.numpy as jnp

    section("layer: one adapted Dense (512 -> 1376, r=16, float32), alternatives, ratio to x@W")
    key = jax.random.key(0)
    d_in, d_out, r, s = 512, 1376, 16, 2.0
    k1, k2, k3, k4 = jax.random.split(key, 4)
    W = jax.random.normal(k1, (d_in, d_out)) * 0.02
    A = jax.random.normal(k2, (d_in, r)) * 0.02
    B = jax.random.normal(k3, (r, d_out)) * 0.02
    WA = jnp.concatenate([W, A], axis=1)          # (in, out + r): one matmul gives x@W and x@A
    WB = jnp.concatenate([W, s * B], axis=0)      # (in + r, out): [x, x@A] @ [W; sB]

    variants = {
        "base x@W": (lambda x, W, A, B, WA, WB: x @ W),
        "jlora now: x@W + s*(x@A)@B": (lambda x, W, A, B, WA, WB: x @ W + s * ((x @ A) @ B)),
        "concat out: z=x@[W|A]; z[:, :out] + s*z[:, out:]@B": (
            lambda x, W, A, B, WA, WB: (lambda z: z[..., :d_out] + s * (z[..., d_out:] @ B))(x @ WA)),
        "concat in: [x, x@A] @ [W; sB]": (lambda x, W, A, B, WA, WB: jnp.concatenate([x, x @ A], -1) @ WB),
        "merge in the call: x@(W + s*A@B)": (lambda x, W, A, B, WA, WB: x @ (W + s * (A @ B))),
    }
    rows = []
    for T in (1, 16, 256, 2048):
        x = jax.random.normal(k4, (T, d_in))
        exe = {k: jax.jit(f).lower(x, W, A, B, WA, WB).compile() for k, f in variants.items()}
        fns = {k: (lambda e=e: e(x, W, A, B, WA, WB).block_until_ready()) for k, e in exe.items()}
        samples = interleaved(fns, rounds=15, warmup=3, min_sample_s=0.02, seed=T)
        med = median_s(samples)
        rows.append([T, fmt_time(med["base x@W"])] + [fmt_ratio(paired_ratio(samples, k, "base x@W"), with_min=False)
                                                      for k in list(variants)[1:]])
    print(table(["T", "x@W"] + list(variants)[1:], rows))


# ------------------------------------------------------------------------------------------------
# whole model: jlora.wrap vs a prototype side path that runs one matmul against a precomputed [W|A]

def _proto_forward(fm, scale: float, mode: str):
    """A forward over plain params + per-Dense extra entries, via a Flax interceptor (no jlora).

    mode "concat_out": each adapted Dense computes z = x @ [W|A] once and adds s * z[..., out:] @ B.
    mode "separate": x @ W + s * (x @ A) @ B (jlora's math, without jlora's wrapping).
    """
    import flax.linen as nn
    import jax.numpy as jnp

    def intercept(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name != "__call__" or not isinstance(mod, nn.Dense):
            return next_fun(*args, **kwargs)
        p = mod.scope.variables().get("params", {})
        if "__proto_B" not in p:
            return next_fun(*args, **kwargs)
        x = args[0]
        if mode == "concat_out":
            z = x @ p["__proto_WA"]
            out = p["__proto_B"].shape[1]
            return z[..., :out] + scale * (z[..., out:] @ p["__proto_B"])
        return next_fun(*args, **kwargs) + scale * ((x @ p["__proto_A"]) @ p["__proto_B"])

    def forward(ids, params):
        with nn.intercept_methods(intercept):
            return fm(ids, params=params).logits

    return forward


def _proto_params(lp, mode: str):
    import jax
    import jax.numpy as jnp

    from jlora.tree import is_adapted

    def convert(node):
        if not is_adapted(node):
            return node
        out = dict(node.base_children())
        if mode == "concat_out":
            out["__proto_WA"] = jnp.concatenate([node["kernel"], node["lora_A"]], axis=1)
        else:
            out["__proto_A"] = node["lora_A"]
        out["__proto_B"] = node["lora_B"]
        return out

    return jax.tree_util.tree_map(convert, lp, is_leaf=is_adapted)


def diag_model() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jlora

    section("model: jlora.wrap vs prototypes on the benchmark model (ratio to base)")
    cfg, fm, lp = _model()
    scale = next(n.spec.scale for _, n in jlora.tree.adapted_modules(lp))
    f = lambda i, p: fm(i, params=p).logits  # noqa: E731
    p_sep, p_cat = _proto_params(lp, "separate"), _proto_params(lp, "concat_out")
    g_sep, g_cat = _proto_forward(fm, scale, "separate"), _proto_forward(fm, scale, "concat_out")
    rows = []
    for T in (1, 256, 2048):
        ids = jnp.asarray(np.random.default_rng(T).integers(0, cfg.vocab_size, (1, T)), jnp.int32)
        exe = {"base": (jax.jit(f).lower(ids, fm.params).compile(), fm.params),
               "jlora.wrap": (jax.jit(jlora.wrap(f)).lower(ids, lp).compile(), lp),
               "same math, plain interceptor": (jax.jit(g_sep).lower(ids, p_sep).compile(), p_sep),
               "concat [W|A], one matmul": (jax.jit(g_cat).lower(ids, p_cat).compile(), p_cat)}
        ref = np.asarray(exe["jlora.wrap"][0](ids, lp))
        err = max(float(np.max(np.abs(np.asarray(e(ids, p)) - ref))) / float(np.max(np.abs(ref)))
                  for e, p in exe.values() if p is not fm.params)
        fns = {k: (lambda e=e, p=p: e(ids, p).block_until_ready()) for k, (e, p) in exe.items()}
        rounds, min_s = (21, 0.03) if T < 2048 else (5, 0.0)
        samples = interleaved(fns, rounds=rounds, warmup=2, min_sample_s=min_s, seed=T)
        med = median_s(samples)
        rows.append([T, fmt_time(med["base"])] + [fmt_ratio(paired_ratio(samples, k, "base")) for k in list(exe)[1:]]
                    + [f"{err:.1e}"])
    print(table(["T", "base", "jlora.wrap", "same math, plain interceptor", "concat [W|A] (precomputed), one matmul",
                 "max rel diff vs wrap"], rows))


# ------------------------------------------------------------------------------------------------
# host side: trace / compile time (the eval_shape probe) and per-call dispatch (pytree flattening)

def diag_host() -> None:
    import jax
    import jax.numpy as jnp

    import jlora

    section("host: tracing, compiling, dispatching")
    cfg, fm, lp = _model()
    f = lambda i, p: fm(i, params=p).logits  # noqa: E731
    ids = jnp.zeros((1, 16), jnp.int32)
    rows = []
    for name, fn, p in (("base", f, fm.params), ("jlora.wrap", jlora.wrap(f), lp)):
        trace, comp = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            low = jax.jit(fn).lower(ids, p)  # a fresh jit each time: trace from scratch
            t1 = time.perf_counter()
            low.compile()
            t2 = time.perf_counter()
            trace.append(t1 - t0)
            comp.append(t2 - t1)
        rows.append([name, fmt_time(sorted(trace)[1]), fmt_time(sorted(comp)[1])])
    print(table(["", "trace + lower (fresh jit)", "XLA compile"], rows))
    print("\n(jlora.wrap's first trace includes a jax.eval_shape probe of the whole function, i.e. a second trace; "
          "it is cached per argument structure, so only the first call pays it.)\n")

    n = 2000
    rows = []
    for name, tree in (("model.params", fm.params), ("lora params (AdaptedModule nodes)", lp)):
        t0 = time.perf_counter()
        for _ in range(n):
            jax.tree_util.tree_flatten(tree)
        rows.append([name, len(jax.tree_util.tree_leaves(tree)), fmt_time((time.perf_counter() - t0) / n)])
    print(table(["tree", "leaves", "tree_flatten per call"], rows))
    exe_b = jax.jit(f).lower(ids, fm.params).compile()
    exe_w = jax.jit(jlora.wrap(f)).lower(ids, lp).compile()
    noop_b = jax.jit(lambda i, p: i.sum()).lower(ids, fm.params).compile()
    noop_w = jax.jit(lambda i, p: i.sum()).lower(ids, lp).compile()
    samples = interleaved({"no-op, params": lambda: noop_b(ids, fm.params).block_until_ready(),
                           "no-op, lora params": lambda: noop_w(ids, lp).block_until_ready()},
                          rounds=15, warmup=3, min_sample_s=0.02)
    med = median_s(samples)
    print(f"\nDispatch of a compiled no-op taking the tree: params {fmt_time(med['no-op, params'])}, lora params "
          f"{fmt_time(med['no-op, lora params'])} per call.")
    del exe_b, exe_w


# ------------------------------------------------------------------------------------------------
# training: forward-only / gradient-only ratios, op counts, and a per-op profile breakdown

def diag_train() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import jlora
    from bench_infer import cost

    section("train: LoRA step vs full step, batch 4 x 256")
    cfg, fm, lp = _model()
    params = fm.params
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 256)), jnp.int32)

    def xent(logits, ids):
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), ids[:, 1:]).mean()

    fwd = jlora.wrap(lambda i, p: fm(i, params=p).logits)
    lora_loss = lambda t, fr, i: xent(fwd(i, jlora.combine(t, fr)), i)  # noqa: E731
    full_loss = lambda p, i: xent(fm(i, params=p).logits, i)  # noqa: E731
    trainable, frozen = jlora.split(lp)
    # prototype: the same LoRA loss with plain params + a plain interceptor (no jlora)
    scale = next(n.spec.scale for _, n in jlora.tree.adapted_modules(lp))
    g_sep = _proto_forward(fm, scale, "separate")
    p_sep = _proto_params(lp, "separate")
    is_proto = lambda path: any(getattr(k, "key", None) in ("__proto_A", "__proto_B") for k in path)  # noqa: E731
    flat, treedef = jax.tree_util.tree_flatten_with_path(p_sep)
    t_mask = [is_proto(path) for path, _ in flat]
    leaves = [x for _, x in flat]
    p_train = [x for x, m in zip(leaves, t_mask) if m]
    p_frozen = [x for x, m in zip(leaves, t_mask) if not m]

    def proto_loss(tr, fr, i):
        it_t, it_f = iter(tr), iter(fr)
        full = jax.tree_util.tree_unflatten(treedef, [next(it_t) if m else next(it_f) for m in t_mask])
        return xent(g_sep(i, full), i)

    cases = {
        "forward only": ((jax.jit(lora_loss), (trainable, frozen, ids)), (jax.jit(full_loss), (params, ids))),
        "value_and_grad": ((jax.jit(jax.value_and_grad(lora_loss)), (trainable, frozen, ids)),
                           (jax.jit(jax.value_and_grad(full_loss)), (params, ids))),
        "value_and_grad, prototype plain interceptor": ((jax.jit(jax.value_and_grad(proto_loss)), (p_train, p_frozen, ids)),
                                                        (jax.jit(jax.value_and_grad(full_loss)), (params, ids))),
    }
    rows = []
    for name, ((fl, al), (ff, af)) in cases.items():
        cl, cf = fl.lower(*al).compile(), ff.lower(*af).compile()
        kl, kf = cost(cl), cost(cf)
        ol, of = _ops(cl.as_text()), _ops(cf.as_text())
        samples = interleaved({"lora": lambda: jax.block_until_ready(cl(*al)),
                               "full": lambda: jax.block_until_ready(cf(*af))}, rounds=7, warmup=2, inner=1)
        med = median_s(samples)
        rows.append([name, fmt_time(med["lora"]), fmt_time(med["full"]), fmt_ratio(paired_ratio(samples, "lora", "full")),
                     f"{kl['flops'] / kf['flops']:.3f}", f"{kl['bytes'] / kf['bytes']:.3f}",
                     f"{ol['dot']} / {of['dot']}", f"{ol['transpose'] + ol['copy']} / {of['transpose'] + of['copy']}"])
    print(table(["", "LoRA", "full", "LoRA / full (paired)", "flops ratio", "bytes ratio", "dots LoRA / full",
                 "transpose+copy LoRA / full"], rows))


def main() -> int:
    import warnings
    warnings.filterwarnings("ignore")
    which = sys.argv[1:] or ["load", "ops", "layer", "model", "host", "train"]
    for name in which:
        globals()[f"diag_{name}"]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
