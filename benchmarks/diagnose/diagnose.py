"""Where the time goes for the targets benchmarks/run.py reports as missed (evidence for DIAGNOSIS.md).

    python benchmarks/diagnose/diagnose.py [--steady] [load] [loadfloor] [ops] [layer] [hfuse] [model] [cast] [aa] [host] [train] [profile]   (default: all)

``--steady``: pin to one core and time with this process's CPU time (on a busy shared machine this
removes most of the noise other processes add; ratios then describe single-threaded execution).

Measures jlora as it is (nothing under jlora/ is modified) and prototypes of alternatives written here,
each timed side by side with the current code (interleaved rounds, median of paired ratios).
"""
from __future__ import annotations

import collections
import importlib
import os
import re
import sys
import tempfile
import time
from pathlib import Path

STEADY = "--steady" in sys.argv
if STEADY:  # before jax/torch size their thread pools, and before common reads the clock
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:1])
    os.environ["JLORA_BENCH_CLOCK"] = "cpu"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/, for common

from common import fmt_ratio, fmt_time, interleaved, median_s, now, paired_ratio, table  # noqa: E402


def section(title: str) -> None:
    print(f"\n## {title}\n", flush=True)


# ------------------------------------------------------------------------------------------------
# load: the stages of jlora.load, and a device-side conversion prototype

def diag_load() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from bench_load import flax_params, make_adapter
    from safetensors.torch import load_file
    from transformers import LlamaConfig

    import jlora
    L = importlib.import_module("jlora.load")  # the module (jlora.load is also the function)
    from jlora.checkpoint import read_safetensors
    from jlora.config import LoraConfig, read_json
    from jlora.inject import inject
    from jlora.layout_registry import get_layout
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

    # inside inject: the host conversion vs the host -> device copy (and a zero-copy hand-over instead)
    mm0 = read_safetensors(path)
    keys0 = sorted(mm0)
    split = {"host cast + transpose (np.asarray(a.T, float32))": [], "jnp.asarray copy to the device": [],
             "jax.dlpack.from_dlpack instead (zero-copy)": []}
    for i in range(9):
        t0 = now()
        host = [np.asarray(mm0[k].T, dtype=np.float32) for k in keys0]
        t1 = now()
        dev = jax.block_until_ready([jnp.asarray(h) for h in host]) if i % 2 else None
        t2 = now()
        dl = jax.block_until_ready([jax.dlpack.from_dlpack(h) for h in host]) if not i % 2 else None
        t3 = now()
        split["host cast + transpose (np.asarray(a.T, float32))"].append(t1 - t0)
        (split["jnp.asarray copy to the device"] if i % 2 else split["jax.dlpack.from_dlpack instead (zero-copy)"]).append(
            t2 - t1 if i % 2 else t3 - t2)
        del host, dev, dl
    print("Inside inject (default float32), all 224 factors, median of repeated runs:\n")
    print(table(["step", "median"], [[k, fmt_time(float(np.median(v[1:] if len(v) > 4 else v)))] for k, v in split.items()]))
    print()

    # prototypes. (Tried and dropped: transposes inside a jit on the device, and one batched
    # jax.device_put of the host arrays: both slower than jlora.load here; XLA:CPU transposes are slow.)
    tensors_mm = read_safetensors(path)
    keys = sorted(tensors_mm)

    @jax.jit
    def cast_check(arrays):
        out = [a.astype(jnp.float32) for a in arrays]
        return out, jnp.all(jnp.stack([jnp.isfinite(o).all() for o in out]))

    def finish(dev):
        out, ok = cast_check(dev)
        jax.block_until_ready(out)
        if not bool(ok):
            raise ValueError("non-finite")
        return out

    def proto_peft_layout():  # no transposes at all: PEFT's layout kept
        mm = read_safetensors(path)
        return finish([jnp.asarray(mm[k]) for k in keys])

    def floor():
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return sum(float(v.sum()) for v in load_file(str(path)).values())
        finally:
            torch.set_num_threads(n)

    def proto_dlpack():  # jlora's host conversion, finite check on its result, arrays handed over without a copy
        mm = read_safetensors(path)
        host = [np.asarray(mm[k].T, dtype=np.float32) for k in keys]
        if not all(np.isfinite(h).all() for h in host):
            raise ValueError("non-finite")
        return jax.block_until_ready([jax.dlpack.from_dlpack(h) for h in host])  # zero-copy on CPU

    fns = {"floor": floor, "jlora.load": lambda: jax.block_until_ready(jlora.load(params, folder)),
           "prototype: host cast+T as now, finite check on its result, jax.dlpack.from_dlpack (no copy)": proto_dlpack,
           "jlora.load(dtype=bf16)": lambda: jax.block_until_ready(jlora.load(params, folder, dtype=jnp.bfloat16)),
           "prototype: PEFT layout kept (no transposes) + device cast/check": proto_peft_layout}
    samples = interleaved(fns, rounds=9, warmup=1, inner=1)
    med = median_s(samples)
    print("End to end (the prototypes skip config/target resolution, ~20 ms of jlora.load above):\n")
    print(table(["variant", "median", "/ floor (paired)"],
                [[k, fmt_time(med[k]), fmt_ratio(paired_ratio(samples, k, "floor"))] for k in fns]))
    # the prototype's arrays are jlora's
    lp = jlora.load(params, folder)
    out = proto_dlpack()
    node = lp["model"]["layers"]["3"]["mlp"]["down_proj"]
    base = "base_model.model.model.layers.3.mlp.down_proj"
    same = all(bool(np.array_equal(np.asarray(out[keys.index(f"{base}.{k}.weight")]), np.asarray(node[k])))
               for k in ("lora_A", "lora_B"))
    print(f"\n(prototype output equals jlora.load's, layer 3 down_proj A and B: {same})")


# ------------------------------------------------------------------------------------------------
# load, continued: the cost of writing the output at all, and where target resolution spends its time

def diag_loadfloor() -> None:
    import cProfile
    import pstats

    import jax.numpy as jnp
    import numpy as np
    from bench_load import flax_params, make_adapter
    from transformers import LlamaConfig

    from jlora.checkpoint import read_safetensors
    from jlora.config import LoraConfig, read_json
    from jlora.layout_registry import get_layout
    from jlora.spec import build_targets, group_keys

    section("loadfloor: writing the output's bytes to fresh memory (what any load must do at least once)")
    rows = []
    for label, nbytes in (("float32 factors (2x the file)", 146.8e6), ("bf16 factors (the file's bytes)", 73.4e6)):
        n = int(nbytes // 4)
        runs = []
        for _ in range(9):
            t0 = now()
            np.empty(n, np.float32).fill(1.0)  # fresh pages each time (large allocations are mmap'd)
            runs.append(now() - t0)
        rows.append([label, fmt_time(float(np.median(runs[1:])))])
    print(table(["fresh write of", "median"], rows))

    section("loadfloor: target resolution under cProfile (group_keys + bind + build_targets, 5 calls)")
    cfg = LlamaConfig(hidden_size=2048, num_hidden_layers=16, intermediate_size=5632, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)
    folder = make_adapter(Path(tempfile.mkdtemp()) / "a", cfg, 64)
    path = folder / "adapter_model.safetensors"
    params = flax_params(cfg, jnp.bfloat16)
    config = LoraConfig.from_dict(read_json(folder / "adapter_config.json"))
    tensors = read_safetensors(path)

    def resolve():
        names = list(group_keys(tensors.keys(), str(path)))
        return build_targets(config, tensors, get_layout("hf").bind(params, names), str(path))

    resolve()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(5):
        resolve()
    prof.disable()
    stats = pstats.Stats(prof)
    total = max(v[3] for k, v in stats.stats.items() if k[2] == "resolve")
    rows = []
    for (file, line, func), v in stats.stats.items():
        if "jlora" in file and func in ("bind", "__init__", "iter_modules", "build_targets", "group_keys", "_find", "place"):
            rows.append([f"{Path(file).name}:{line} {func}", v[0], f"{100 * v[3] / total:.0f}%"])
    rows.sort(key=lambda r: -float(r[2][:-1]))
    print(table(["function (cumulative)", "calls", "share of resolution time"], rows))
    print("\n(layout.py __init__ is HfLayout.__init__: it walks the whole params tree with iter_modules to set "
          "gpt2_style, and bind() builds one HfLayout per candidate prefix mode.)")


# ------------------------------------------------------------------------------------------------
# shared model for the inference diagnostics

def _model(model_kwargs=None):
    from bench_infer import CPU_MODEL, build

    import jlora

    cfg, tbase, pm, fm, body, adapter = build(Path(tempfile.mkdtemp()), model_kwargs or CPU_MODEL, 16)
    lp = jlora.load(fm.params, adapter)
    return cfg, fm, lp


def _ops(text: str) -> collections.Counter:
    return collections.Counter(re.findall(r"= \S+ (\w[\w-]*)\(", text))


def diag_ops() -> None:
    import jax
    import jax.numpy as jnp
    from bench_infer import cost

    import jlora

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
    for d_in, d_out, Ts in ((512, 1376, (1, 16, 256, 2048)), (2048, 5632, (1, 256))):
        _layer(d_in, d_out, Ts)


def _layer(d_in: int, d_out: int, Ts) -> None:
    import jax
    import jax.numpy as jnp

    section(f"layer: one adapted Dense ({d_in} -> {d_out}, r=16, float32), alternatives, ratio to x@W")
    key = jax.random.key(0)
    r, s = 16, 2.0
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
        "x@A alone": (lambda x, W, A, B, WA, WB: x @ A),
        "(x@A)@B alone (x@A given)": (lambda x, W, A, B, WA, WB: x[..., :r] @ B),
    }
    rows, rate = [], []
    for T in Ts:
        x = jax.random.normal(k4, (T, d_in))
        exe = {k: jax.jit(f).lower(x, W, A, B, WA, WB).compile() for k, f in variants.items()}
        fns = {k: (lambda e=e: e(x, W, A, B, WA, WB).block_until_ready()) for k, e in exe.items()}
        samples = interleaved(fns, rounds=15, warmup=3, min_sample_s=0.02, seed=T)
        med = median_s(samples)
        rows.append([T, fmt_time(med["base x@W"])] + [fmt_ratio(paired_ratio(samples, k, "base x@W"), with_min=False)
                                                      for k in list(variants)[1:]])
        flops = {"base x@W": 2 * T * d_in * d_out, "x@A alone": 2 * T * d_in * r, "(x@A)@B alone (x@A given)": 2 * T * r * d_out}
        rate.append([T] + [f"{flops[k] / med[k] / 1e9:.1f}" for k in flops])
    print(table(["T", "x@W"] + list(variants)[1:], rows))
    print("\nAchieved GFLOP/s of each matmul alone (the side path's two skinny matmuls vs the base GEMM):\n")
    print(table(["T", f"x@W ({d_in}x{d_out})", "x@A (N=16)", "(xA)@B (K=16)"], rate))
    print(f"\nflop share of the side path: r*(1/d_in + 1/d_out) = {100 * r * (1 / d_in + 1 / d_out):.1f}%")


# ------------------------------------------------------------------------------------------------
# whole model: jlora.wrap vs a prototype side path that runs one matmul against a precomputed [W|A]

def _proto_forward(fm, scale: float, mode: str):
    """A forward over plain params + per-Dense extra entries, via a Flax interceptor (no jlora).

    mode "concat_out": each adapted Dense computes z = x @ [W|A] once and adds s * z[..., out:] @ B.
    mode "separate": x @ W + s * (x @ A) @ B (jlora's math, without jlora's wrapping).
    """
    import flax.linen as nn

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
    scale = next(float(n["lora_scale"]) for _, n in jlora.tree.adapted_modules(lp))
    f = lambda i, p: fm(i, params=p).logits  # noqa: E731
    p_sep, p_cat = _proto_params(lp, "separate"), _proto_params(lp, "concat_out")
    g_sep, g_cat = _proto_forward(fm, scale, "separate"), _proto_forward(fm, scale, "concat_out")
    rows = []
    for T in (1, 256, 2048):
        ids = jnp.asarray(np.random.default_rng(T).integers(0, cfg.vocab_size, (1, T)), jnp.int32)
        exe = {"base": (jax.jit(f).lower(ids, fm.params).compile(), fm.params),
               "jlora.wrap": (jax.jit(jlora.wrap(f)).lower(ids, lp).compile(), lp),
               "same math, plain interceptor": (jax.jit(g_sep).lower(ids, p_sep).compile(), p_sep),
               "concat [W|A], one matmul": (jax.jit(g_cat).lower(ids, p_cat).compile(), p_cat),
               "merge inside the call": (jax.jit(lambda i, p: f(i, jlora.merge(p))).lower(ids, lp).compile(), lp)}
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
                 "merge inside the call", "max rel diff vs wrap"], rows))


# ------------------------------------------------------------------------------------------------
# horizontal fusion: the A matmuls of modules that share an input (q/k/v, gate/up) as one matmul

def diag_hfuse() -> None:
    import jax
    import jax.numpy as jnp

    section("hfuse: three LoRA-A matmuls on the same input (q, k, v) vs one against [Aq|Ak|Av] (r=16, in 512)")
    k1, k2 = jax.random.split(jax.random.key(0))
    As = [jax.random.normal(k, (512, 16)) for k in jax.random.split(k1, 3)]
    A3 = jnp.concatenate(As, axis=1)
    sep = jax.jit(lambda x, a, b, c: (x @ a, x @ b, x @ c))
    one = jax.jit(lambda x, a3: (lambda z: (z[..., :16], z[..., 16:32], z[..., 32:]))(x @ a3))

    def loss_sep(a, b, c, x, g):
        return sum(jnp.vdot(x @ m, g) for m in (a, b, c))

    def loss_one(a3, x, g):
        z = x @ a3
        return sum(jnp.vdot(z[..., 16 * i:16 * (i + 1)], g) for i in range(3))

    gsep = jax.jit(jax.grad(loss_sep, argnums=(0, 1, 2)))
    gone = jax.jit(jax.grad(loss_one))
    rows = []
    for T in (1, 256, 1024):
        x = jax.random.normal(k2, (T, 512))
        g = jnp.ones((T, 16))
        fns = {"3 x (x@A)": lambda: jax.block_until_ready(sep(x, *As)),
               "x@[A|A|A]": lambda: jax.block_until_ready(one(x, A3)),
               "grad, 3 x": lambda: jax.block_until_ready(gsep(*As, x, g)),
               "grad, fused": lambda: jax.block_until_ready(gone(A3, x, g))}
        samples = interleaved(fns, rounds=15, warmup=3, min_sample_s=0.02, seed=T)
        med = median_s(samples)
        rows.append([T, fmt_time(med["3 x (x@A)"]), fmt_ratio(paired_ratio(samples, "x@[A|A|A]", "3 x (x@A)"), with_min=False),
                     fmt_time(med["grad, 3 x"]), fmt_ratio(paired_ratio(samples, "grad, fused", "grad, 3 x"), with_min=False)])
    print(table(["T", "3 separate x@A", "one x@[Aq|Ak|Av] / separate", "grad wrt A (x^T g), 3 separate",
                 "fused / separate"], rows))


# ------------------------------------------------------------------------------------------------
# casting: a bf16 base with the default float32 adapter (PEFT's precision) vs a bf16 adapter

def diag_cast() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from bench_infer import CPU_MODEL, build

    import jlora

    section("cast: bf16 base model, adapter float32 (default, PEFT's precision) vs dtype=bf16 (ratio to bf16 base)")
    cfg, _, _, fm, _, adapter = build(Path(tempfile.mkdtemp()), CPU_MODEL, 16, flax_dtype=jnp.bfloat16)
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), fm.params)
    lp32 = jlora.load(params, adapter)
    lp16 = jlora.load(params, adapter, dtype=jnp.bfloat16)
    f = lambda i, p: fm(i, params=p).logits  # noqa: E731
    rows = []
    for T in (1, 256):
        ids = jnp.asarray(np.random.default_rng(T).integers(0, cfg.vocab_size, (1, T)), jnp.int32)
        eb = jax.jit(f).lower(ids, params).compile()
        ew = jax.jit(jlora.wrap(f))
        e32, e16 = ew.lower(ids, lp32).compile(), ew.lower(ids, lp16).compile()
        fns = {"base": lambda: eb(ids, params).block_until_ready(), "f32 adapter": lambda: e32(ids, lp32).block_until_ready(),
               "bf16 adapter": lambda: e16(ids, lp16).block_until_ready()}
        samples = interleaved(fns, rounds=15, warmup=2, min_sample_s=0.02, seed=T)
        med = median_s(samples)
        ref = np.asarray(e32(ids, lp32), np.float32)
        diff = float(np.max(np.abs(np.asarray(e16(ids, lp16), np.float32) - ref)) / np.max(np.abs(ref)))
        rows.append([T, fmt_time(med["base"]), fmt_ratio(paired_ratio(samples, "f32 adapter", "base")),
                     fmt_ratio(paired_ratio(samples, "bf16 adapter", "base")), f"{diff:.1e}"])
    print(table(["T", "bf16 base", "wrap, f32 adapter / base", "wrap, bf16 adapter / base",
                 "max rel diff bf16 vs f32 adapter"], rows))


# ------------------------------------------------------------------------------------------------
# A/A: the same executable on differently allocated copies of the same kind of weights

def diag_aa() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jlora

    section("A/A: one compiled base forward, parameter trees allocated in different ways (ratio to base)")
    cfg, fm, lp = _model()
    f = lambda i, p: fm(i, params=p).logits  # noqa: E731
    merged = jlora.merge(lp)
    trees = {"base (from_pretrained)": fm.params,
             "base, jnp.copy of every leaf": jax.tree_util.tree_map(jnp.copy, fm.params),
             "merged (jlora.merge)": merged,
             "merged, via numpy and back": jax.tree_util.tree_map(lambda x: jnp.asarray(np.array(x)), merged)}
    jax.block_until_ready(list(trees.values()))
    rows = []
    for T in (1, 256):
        ids = jnp.asarray(np.random.default_rng(T).integers(0, cfg.vocab_size, (1, T)), jnp.int32)
        exe = jax.jit(f).lower(ids, fm.params).compile()
        fns = {k: (lambda p=p: exe(ids, p).block_until_ready()) for k, p in trees.items()}
        samples = interleaved(fns, rounds=25, warmup=2, min_sample_s=0.02, seed=T)
        first = next(iter(trees))
        rows.append([T] + [fmt_ratio(paired_ratio(samples, k, first)) for k in list(trees)[1:]])
    print(table(["T"] + list(trees)[1:], rows))


# ------------------------------------------------------------------------------------------------
# host side: trace / compile time (the eval_shape probe) and per-call dispatch (pytree flattening)

class _FastNode:
    """Prototype of a node JAX flattens without calling Python: a dataclass registered with
    ``jax.tree_util.register_dataclass`` (children dict as data, the spec as static metadata)."""

    def __init__(self, children, spec):
        self.children = children
        self.spec = spec


def _register_fast_node() -> None:
    import jax
    try:
        jax.tree_util.register_dataclass(_FastNode, data_fields=["children"], meta_fields=["spec"])
    except ValueError:
        pass


def diag_host() -> None:
    import jax
    import jax.numpy as jnp

    import jlora

    section("host: tracing, compiling, dispatching")
    _register_fast_node()
    cfg, fm, lp = _model()
    f = lambda i, p: fm(i, params=p).logits  # noqa: E731
    ids = jnp.zeros((1, 16), jnp.int32)
    rows = []
    for name, make, p in (("base", lambda: (lambda i, q: fm(i, params=q).logits), fm.params),
                          ("jlora.wrap", lambda: jlora.wrap(lambda i, q: fm(i, params=q).logits), lp)):
        trace, comp = [], []
        for _ in range(3):
            jax.clear_caches()
            fn = make()  # a new function object and no caches: trace and compile from scratch
            t0 = time.perf_counter()
            low = jax.jit(fn).lower(ids, p)
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
    plain = _proto_params(lp, "separate")  # the same number of leaves (95), in plain dicts
    noop_p = jax.jit(lambda i, p: i.sum()).lower(ids, plain).compile()
    fast = jlora.tree.map_adapted(lambda n: _FastNode(dict(n), n.spec), lp)
    noop_f = jax.jit(lambda i, p: i.sum()).lower(ids, fast).compile()
    samples = interleaved({"params": lambda: noop_b(ids, fm.params).block_until_ready(),
                           "lora params": lambda: noop_w(ids, lp).block_until_ready(),
                           "plain": lambda: noop_p(ids, plain).block_until_ready(),
                           "fast": lambda: noop_f(ids, fast).block_until_ready()},
                          rounds=15, warmup=3, min_sample_s=0.02)
    med = median_s(samples)
    print()
    print(table(["argument tree of a compiled no-op", "leaves", "dispatch per call"], [
        ["model.params (plain dicts)", len(jax.tree_util.tree_leaves(fm.params)), fmt_time(med["params"])],
        ["lora params (AdaptedModule nodes, Python flatten)", len(jax.tree_util.tree_leaves(lp)), fmt_time(med["lora params"])],
        ["the same arrays in plain dicts", len(jax.tree_util.tree_leaves(plain)), fmt_time(med["plain"])],
        ["prototype node: dataclass (children dict + static spec) via register_dataclass",
         len(jax.tree_util.tree_leaves(fast)), fmt_time(med["fast"])]]))
    del exe_b, exe_w


# ------------------------------------------------------------------------------------------------
# training: forward-only / gradient-only ratios, op counts, and a per-op profile breakdown

def diag_train() -> None:
    from bench_infer import CPU_MODEL

    for kw in (CPU_MODEL, dict(CPU_MODEL, hidden_size=1024, intermediate_size=2752, num_hidden_layers=2,
                               num_attention_heads=16, num_key_value_heads=16)):
        _train(kw)


def _train(model_kwargs) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from bench_infer import cost

    import jlora

    section(f"train: LoRA grad vs full grad, batch 4 x 256, hidden {model_kwargs['hidden_size']}, "
            f"{model_kwargs['num_hidden_layers']} layers")
    cfg, fm, lp = _model(model_kwargs)
    params = fm.params
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 256)), jnp.int32)

    def xent(logits, ids):
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), ids[:, 1:]).mean()

    fwd = jlora.wrap(lambda i, p: fm(i, params=p).logits)
    lora_loss = lambda t, fr, i: xent(fwd(i, jlora.combine(t, fr)), i)  # noqa: E731
    full_loss = lambda p, i: xent(fm(i, params=p).logits, i)  # noqa: E731
    trainable, frozen = jlora.split(lp)
    # prototype: the same LoRA loss with plain params + a plain interceptor (no jlora)
    scale = next(float(n["lora_scale"]) for _, n in jlora.tree.adapted_modules(lp))
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


# ------------------------------------------------------------------------------------------------
# profile: per-kernel times from jax.profiler, grouped by what each kernel does

_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$")
_INST = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\((.*)$")


def _shape(text: str) -> tuple[int, ...]:
    m = re.search(r"\[([0-9,]*)\]", text)
    return tuple(int(d) for d in m.group(1).split(",") if d) if m else ()


def _hlo_index(text: str) -> tuple[dict, dict]:
    """(instruction -> (opcode, shape text, rest), computation -> [instruction names])."""
    inst, comps, current = {}, {}, None
    for line in text.splitlines():
        m = _COMP.match(line.strip()) if line and not line.startswith(" ") else None
        if m:
            current = m.group(1)
            comps[current] = []
            continue
        m = _INST.match(line)
        if m and current is not None:
            inst[m.group(1)] = (m.group(3), m.group(2), m.group(4))
            comps[current].append(m.group(1))
    return inst, comps


def _classify(name: str, inst: dict, comps: dict, r: int, kernel_shapes: set) -> str:
    opcode, shape, rest = inst[name]
    body = [name]
    if opcode == "fusion":
        m = re.search(r"calls=%([\w.\-]+)", rest)
        body = comps.get(m.group(1), []) if m else []
    dots = [b for b in body if inst[b][0] in ("dot", "convolution")]
    if dots:
        d = dots[0]
        _, dshape, drest = inst[d]
        ops = re.findall(r"%([\w.\-]+)", drest.split(")")[0])
        lhs = _shape(inst[ops[0]][1]) if ops and ops[0] in inst else ()
        cd = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", drest)
        k = 1
        for i in (int(x) for x in cd.group(1).split(",") if x) if cd else ():
            k *= lhs[i] if i < len(lhs) else 1
        out = _shape(dshape)
        if "lhs_batch_dims={0" in drest or len(out) >= 3 and re.search(r"lhs_batch_dims=\{\d", drest):
            return "dot: attention (batched)"
        if k == r or (out and out[-1] == r) or (len(out) >= 2 and out[-2] == r):
            return "dot: LoRA side path (K or N = r)"
        if out in kernel_shapes:
            return "dot: weight gradient (kernel-shaped output)"
        return "dot: dense (x@W, dY@W^T, lm_head)"
    if opcode in ("copy", "transpose") or re.search(r"transpose|copy", name):
        return "copy / transpose"
    return "elementwise / reduce / other"


def _profile(compiled, args, n: int, r: int, kernel_shapes: set) -> dict[str, tuple[float, int]]:
    import glob
    import gzip
    import json

    import jax

    inst, comps = _hlo_index(compiled.as_text())
    jax.block_until_ready(compiled(*args))
    logdir = tempfile.mkdtemp(prefix="jlora-prof-")
    jax.profiler.start_trace(logdir, create_perfetto_trace=True)
    for _ in range(n):
        jax.block_until_ready(compiled(*args))
    jax.profiler.stop_trace()
    path = glob.glob(f"{logdir}/**/perfetto_trace.json.gz", recursive=True)[0]
    events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    out: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("ph") == "X" and e.get("name") in inst:
            cat = _classify(e["name"], inst, comps, r, kernel_shapes)
            out[cat][0] += e.get("dur", 0.0) / 1e6 / n
            out[cat][1] += 1
    return {k: (v[0], v[1] // n) for k, v in out.items()}


def diag_profile() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import jlora

    section("profile: kernel time by kind (jax.profiler trace, per call)")
    cfg, fm, lp = _model()
    params = fm.params
    kernel_shapes = {tuple(x.shape) for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
                     if getattr(path[-1], "key", None) == "kernel"}  # Dense kernels (not the embedding)
    f = lambda i, p: fm(i, params=p).logits  # noqa: E731

    def xent(logits, ids):
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), ids[:, 1:]).mean()

    fwd = jlora.wrap(f)
    trainable, frozen = jlora.split(lp)
    lora_grad = jax.jit(jax.value_and_grad(lambda t, fr, i: xent(fwd(i, jlora.combine(t, fr)), i)))
    full_grad = jax.jit(jax.value_and_grad(lambda p, i: xent(f(i, p), i)))
    ids = {T: jnp.asarray(np.random.default_rng(T).integers(0, cfg.vocab_size, (b, T)), jnp.int32)
           for b, T in ((1, 1), (1, 256), (4, 256))}
    ids1, ids256, ids4 = ids[1], jnp.asarray(ids[256][:1]), ids[256]
    cases = [
        ("forward T=1", (jax.jit(f), (ids1, params)), (jax.jit(fwd), (ids1, lp)), 40),
        ("forward T=256", (jax.jit(f), (ids256, params)), (jax.jit(fwd), (ids256, lp)), 5),
        ("value_and_grad 4x256", (full_grad, (params, ids4)), (lora_grad, (trainable, frozen, ids4)), 2),
    ]
    for title, (fb, ab), (fl, al), n in cases:
        pb = _profile(fb.lower(*ab).compile(), ab, n, 16, kernel_shapes)
        pl = _profile(fl.lower(*al).compile(), al, n, 16, kernel_shapes)
        cats = sorted(set(pb) | set(pl), key=lambda c: -max(pb.get(c, (0, 0))[0], pl.get(c, (0, 0))[0]))
        rows = [[c, f"{fmt_time(pb[c][0])} ({pb[c][1]})" if c in pb else "-",
                 f"{fmt_time(pl[c][0])} ({pl[c][1]})" if c in pl else "-",
                 fmt_time(pl.get(c, (0, 0))[0] - pb.get(c, (0, 0))[0])] for c in cats]
        tb, tl = sum(v[0] for v in pb.values()), sum(v[0] for v in pl.values())
        rows.append(["**all kernels**", f"{fmt_time(tb)} ({sum(v[1] for v in pb.values())})",
                     f"{fmt_time(tl)} ({sum(v[1] for v in pl.values())})", f"{fmt_time(tl - tb)} ({tl / tb:.3f}x)"])
        left = "full fine-tuning" if "grad" in title else "base"
        right = "LoRA (jlora split + wrap)" if "grad" in title else "jlora.wrap"
        print(f"{title}:\n")
        print(table(["kernel kind", f"{left}: time (kernels)", f"{right}: time (kernels)", "difference"], rows))
        print()


def main() -> int:
    import warnings
    warnings.filterwarnings("ignore")
    which = [a for a in sys.argv[1:] if not a.startswith("--")] or ["load", "loadfloor", "ops", "layer", "hfuse", "model", "cast", "aa", "host", "train", "profile"]
    print(f"clock: {os.environ.get('JLORA_BENCH_CLOCK', 'wall')}, cores: {sorted(os.sched_getaffinity(0))}, "
          f"load average {os.getloadavg()[0]:.1f}")
    for name in which:
        globals()[f"diag_{name}"]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
