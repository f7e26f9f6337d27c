"""Where the unmerged side path's time goes on a GPU (diagnosis for issue 5; not a benchmark table).

Uses bench_gpu's decoder. Prints, for T in ``--tokens``: interleaved timings of base / jlora.wrap (float32
and bfloat16 adapters) / a hand-written bf16 LoRA dense (``x@W + (s * x@A) @ B`` inside the module, so XLA
may fuse the add into the second matmul), and with ``--profile`` a device-trace summary per variant
(kernels per call, busy time on the GPU per call, wall time per call, the costliest kernels).
Run it under different ``XLA_FLAGS`` to see what command buffers (CUDA graphs) change.

    python benchmarks/diagnose/diagnose_gpu.py --profile
    XLA_FLAGS=--xla_gpu_graph_min_graph_size=1 python benchmarks/diagnose/diagnose_gpu.py
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import sys
import tempfile
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/: bench_gpu, common
import bench_gpu  # noqa: E402
from bench_gpu import ALPHA, FULL, RANK, TARGETS, TINY, Decoder, LoraDensePrototype, flat, nest
from common import fmt_ratio, interleaved, paired_ratio

import jlora


class InlineLoraDense(LoraDensePrototype):
    """Not jlora: the LoRA term written inside the module in the kernel's dtype, scale applied to x@A."""

    def factors(self, x):
        """The kernel, A and B parameters."""
        zeros = nn.initializers.zeros
        return (self.param("kernel", zeros, (x.shape[-1], self.features), self.dtype),
                self.param("lora_A", zeros, (x.shape[-1], self.rank), self.dtype),
                self.param("lora_B", zeros, (self.rank, self.features), self.dtype))

    @nn.compact
    def __call__(self, x):
        w, a, b = self.factors(x)
        return x @ w + ((x @ a) * jnp.asarray(self.scale, self.dtype)) @ b


class ConcatLoraDense(InlineLoraDense):
    """Not jlora: ``[x | s * x@A] @ [W ; B]``, one matmul whose contraction runs over the kernel and B together
    (XLA may fuse both concatenations into the matmul's operand reads)."""

    @nn.compact
    def __call__(self, x):
        w, a, b = self.factors(x)
        xa = (x @ a) * jnp.asarray(self.scale, self.dtype)
        return jnp.concatenate([x, xa], axis=-1) @ jnp.concatenate([w, b], axis=0)


def inline_params(lora_params: dict) -> dict:
    def convert(node):
        if isinstance(node, jlora.tree.AdaptedModule):
            dt = node["kernel"].dtype
            return {"kernel": node["kernel"], "lora_A": node["lora_A"].astype(dt), "lora_B": node["lora_B"].astype(dt)}
        if isinstance(node, dict):
            return {k: convert(v) for k, v in node.items()}
        return node
    return convert(lora_params)


def device_summary(fn, calls: int) -> dict:
    """Run ``fn`` ``calls`` times under the profiler; per-call kernel count, GPU busy time, wall time, top kernels."""
    folder = tempfile.mkdtemp(prefix="jlora-prof-")
    jax.block_until_ready(fn())
    jax.profiler.start_trace(folder)
    t0 = time.perf_counter()
    for _ in range(calls):
        jax.block_until_ready(fn())
    wall = (time.perf_counter() - t0) / calls
    jax.profiler.stop_trace()
    files = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)
    data = jax.profiler.ProfileData.from_file(files[0])
    kernels, busy, by_name = 0, 0.0, collections.Counter()
    planes = [p for p in data.planes if p.name.startswith("/device:GPU")] or \
        [p for p in data.planes if p.name.startswith("/host:CPU")]
    for plane in planes[:1]:
        streams = [line for line in plane.lines if "stream" in line.name.lower() and "memcpy" not in line.name.lower()]
        for line in streams or [line for line in plane.lines if line.name == "XLA Ops"]:
            for event in line.events:
                kernels += 1
                busy += event.duration_ns
                by_name[event.name[:60]] += event.duration_ns
    top = ", ".join(f"{name} {ns / calls / 1e3:.1f}us" for name, ns in by_name.most_common(6))
    return {"kernels": kernels / calls, "busy_ms": busy / calls / 1e6, "wall_ms": wall * 1e3, "top": top,
            "plane": planes[0].name if planes else None, "lines": [line.name for line in planes[0].lines][:8] if planes else []}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--tokens", default="1,256,4096")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--variants", default="base,wrap,wrap bf16,inline bf16,concat bf16")
    args = parser.parse_args()
    cfg = TINY if args.tiny else FULL
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} jax {jax.__version__} {jax.devices()[0].device_kind}", flush=True)
    model = Decoder(cfg["hidden"], cfg["layers"], cfg["intermediate"], cfg["heads"], cfg["vocab"])
    params = nest(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    config = jlora.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False)
    lp = jlora.init(params, config, key=jax.random.key(1))
    lp16 = jlora.init(params, config, key=jax.random.key(1), dtype=jnp.bfloat16)
    apply = lambda p, ids: model.apply({"params": flat(p)}, ids)  # noqa: E731
    f_base, f_wrap = jax.jit(apply), jax.jit(jlora.wrap(apply))
    dense = bench_gpu._dense
    bench_gpu._dense = lambda features, name, dtype, fused_rank, fused_scale: (  # fused_rank selects the inline model
        [None, InlineLoraDense, ConcatLoraDense][fused_rank](features, RANK, ALPHA / RANK, dtype, name=name) if fused_rank
        else dense(features, name, dtype, 0, 0.0))
    inline_model = Decoder(cfg["hidden"], cfg["layers"], cfg["intermediate"], cfg["heads"], cfg["vocab"], fused_rank=1)
    f_inline = jax.jit(lambda p, ids: inline_model.apply({"params": flat(p)}, ids))
    concat_model = Decoder(cfg["hidden"], cfg["layers"], cfg["intermediate"], cfg["heads"], cfg["vocab"], fused_rank=2)
    f_concat = jax.jit(lambda p, ids: concat_model.apply({"params": flat(p)}, ids))
    inline = inline_params(lp16)
    for t in (int(x) for x in args.tokens.split(",")):
        ids = jnp.asarray(np.random.default_rng(t).integers(0, cfg["vocab"], (1, t)), jnp.int32)
        fns = {"base": lambda: f_base(params, ids), "wrap": lambda: f_wrap(lp, ids),
               "wrap bf16": lambda: f_wrap(lp16, ids), "inline bf16": lambda: f_inline(inline, ids),
               "concat bf16": lambda: f_concat(inline, ids)}
        fns = {k: fns[k] for k in fns if k in args.variants.split(",")}
        if t == int(args.tokens.split(",")[0]) and "concat bf16" in fns:
            diff = jnp.abs(fns["concat bf16"]().astype(jnp.float32) - fns["inline bf16"]().astype(jnp.float32))
            print(f"max |concat - inline| {float(diff.max()):.3g}", flush=True)
        samples = interleaved({k: (lambda f=f: jax.block_until_ready(f())) for k, f in fns.items()}, rounds=args.rounds)
        print(f"T={t}: base {np.median(samples['base']) * 1e3:.3f} ms; " + "; ".join(
            f"{k}/base {fmt_ratio(paired_ratio(samples, k, 'base'))}" for k in fns if k != "base"), flush=True)
        if args.profile:
            for k, f in fns.items():
                try:
                    s = device_summary(f, calls=5)
                    print(f"  profile T={t} {k}: {s['kernels']:.0f} kernels, busy {s['busy_ms']:.3f} ms, wall "
                          f"{s['wall_ms']:.3f} ms [{s['plane']}] top: {s['top']}", flush=True)
                    if k == "base" and t == int(args.tokens.split(",")[0]):
                        print(f"  lines: {s['lines']}", flush=True)
                except Exception as err:  # noqa: BLE001 - a diagnostic: report and go on
                    print(f"  profile {k} failed: {err!r}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
