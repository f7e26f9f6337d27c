"""GPU benchmark (issue 5 part 3, issue 6 on GPU): one prepared script for a lent device.

Needs only jax, flax, optax, numpy and jlora (no transformers Flax classes: the device machine has
transformers v5); torch + peft + transformers' torch Llama are used for the PEFT rows when a GPU is
visible to torch. The model is a Llama-shaped linen decoder written here (bf16, hidden 4096, 8 layers,
intermediate 11008, vocab 32000; q/k/v/o/gate/up/down as ``nn.Dense`` under transformers' Flax parameter
names, so jlora's "hf" layout targets them), the adapter r=16 on all seven projections made with ``jlora.init``.

Sections, in order of priority (each guarded: a failing one is reported and the next runs; results are
written to ``$OUT/gpu_results.md`` (or ``--out``) after every section, so a run cut short keeps what it got):
1. base / wrap (unmerged; float32 LoRA branch as PEFT, and a bfloat16 adapter) / merged at T = 1, 16, 256,
   4096 tokens (batch 1), ratios as medians of per-round paired ratios with an A/A control (target:
   wrap/base <= 1.05 at every T), plus a prototype that is not jlora: A concatenated onto the kernel ahead
   of time (one matmul gives x@W and x@A), to measure what that design would buy, and ``jlora.wrap(fused=True)``
   (jlora's Pallas kernel computing x@W and the LoRA term in one pass);
2. mixed batch with 16 adapters vs one adapter vs base, batch 8, T = 16 and 256 (target <= 1.10);
3. PEFT unmerged / torch base on the same shapes (bf16 model, float32 adapter, CUDA);
4. load (benchmark 1 of ``run.py``, quick) with the jax arrays and PEFT's model on the GPU.

    python benchmarks/bench_gpu.py                 # the real run (on the device machine)
    python benchmarks/bench_gpu.py --tiny          # a seconds-long sanity run of the same code on CPU
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from common import aa_noise, check, fmt_ratio, interleaved, paired_ratio, table  # noqa: E402

import jlora  # noqa: E402

FULL = dict(hidden=4096, layers=8, intermediate=11008, heads=32, vocab=32000, tokens=(1, 16, 256, 4096))
TINY = dict(hidden=64, layers=2, intermediate=160, heads=4, vocab=128, tokens=(1, 16, 64))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32


class LoraDensePrototype(nn.Module):
    """The fields of the hand-written LoRA layers these benchmarks compare jlora with (not jlora)."""
    features: int
    rank: int
    scale: float
    dtype: jnp.dtype


class FusedLoraDense(LoraDensePrototype):
    """Prototype, not jlora: ``kernel`` is ``[W | A]`` (in, out + r), concatenated ahead of time, so one
    matmul gives ``x @ W`` and ``x @ A``; then ``y = z[:, :out] + s * z[:, out:] @ B`` (bfloat16 throughout)."""

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.zeros, (x.shape[-1], self.features + self.rank), self.dtype)
        b = self.param("lora_B", nn.initializers.zeros, (self.rank, self.features), self.dtype)
        z = x @ kernel
        return z[..., :self.features] + (self.scale * z[..., self.features:]) @ b


def _dense(features: int, name: str, dtype, fused_rank: int, fused_scale: float) -> nn.Module:
    if fused_rank:
        return FusedLoraDense(features, fused_rank, fused_scale, dtype, name=name)
    return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=dtype, name=name)


class Attention(nn.Module):
    hidden: int
    heads: int
    dtype: jnp.dtype
    fused_rank: int = 0
    fused_scale: float = 0.0

    @nn.compact
    def __call__(self, x):
        dense = lambda name: _dense(self.hidden, name, self.dtype, self.fused_rank, self.fused_scale)  # noqa: E731
        b, t, _ = x.shape
        split = lambda y: y.reshape(b, t, self.heads, self.hidden // self.heads)  # noqa: E731
        q, k, v = split(dense("q_proj")(x)), split(dense("k_proj")(x)), split(dense("v_proj")(x))
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return dense("o_proj")(out.reshape(b, t, self.hidden))


class Mlp(nn.Module):
    hidden: int
    intermediate: int
    dtype: jnp.dtype
    fused_rank: int = 0
    fused_scale: float = 0.0

    @nn.compact
    def __call__(self, x):
        dense = lambda n, name: _dense(n, name, self.dtype, self.fused_rank, self.fused_scale)  # noqa: E731
        gate, up = dense(self.intermediate, "gate_proj")(x), dense(self.intermediate, "up_proj")(x)
        return dense(self.hidden, "down_proj")(nn.silu(gate) * up)


class Decoder(nn.Module):
    """Llama-shaped decoder (RMSNorm, attention without rope, SwiGLU MLP) with FlaxLlama's parameter names.
    ``fused_rank`` > 0 builds the :class:`FusedLoraDense` prototype in place of the seven projections."""
    hidden: int
    layers: int
    intermediate: int
    heads: int
    vocab: int
    dtype: jnp.dtype = jnp.bfloat16
    fused_rank: int = 0
    fused_scale: float = 0.0

    @nn.compact
    def __call__(self, ids):
        norm = lambda name: nn.RMSNorm(dtype=self.dtype, param_dtype=self.dtype, name=name)  # noqa: E731
        fused = dict(fused_rank=self.fused_rank, fused_scale=self.fused_scale)
        h = nn.Embed(self.vocab, self.hidden, dtype=self.dtype, param_dtype=self.dtype, name="embed_tokens")(ids)
        for i in range(self.layers):
            h = h + Attention(self.hidden, self.heads, self.dtype, **fused, name=f"layers_{i}_self_attn")(
                norm(f"layers_{i}_input_layernorm")(h))
            h = h + Mlp(self.hidden, self.intermediate, self.dtype, **fused, name=f"layers_{i}_mlp")(
                norm(f"layers_{i}_post_attention_layernorm")(h))
        h = norm("norm")(h)
        return nn.Dense(self.vocab, use_bias=False, dtype=self.dtype, param_dtype=self.dtype, name="lm_head")(h)


def nest(params: dict) -> dict:
    """``layers_{i}_{module}`` -> ``model/layers/{i}/{module}`` (FlaxLlama's tree), and back with :func:`flat`."""
    out: dict = {"model": {"layers": {}}}
    for key, value in params.items():
        if key.startswith("layers_"):
            _, i, module = key.split("_", 2)
            out["model"]["layers"].setdefault(i, {})[module] = value
        elif key == "lm_head":
            out["lm_head"] = value
        else:
            out["model"][key] = value
    return out


def flat(tree: dict) -> dict:
    out = {k: v for k, v in tree["model"].items() if k != "layers"}
    for i, layer in tree["model"]["layers"].items():
        for module, value in layer.items():
            out[f"layers_{i}_{module}"] = value
    if "lm_head" in tree:
        out["lm_head"] = tree["lm_head"]
    return out


def fused_params(lora_params: dict) -> dict:
    """The prototype's tree from a jlora tree: ``[W | A]`` and B per adapted projection, in the kernel's dtype."""
    def convert(node):
        if isinstance(node, jlora.tree.AdaptedModule):
            kernel = node["kernel"]
            return {"kernel": jnp.concatenate([kernel, node["lora_A"].astype(kernel.dtype)], axis=1),
                    "lora_B": node["lora_B"].astype(kernel.dtype)}
        if isinstance(node, dict):
            return {k: convert(v) for k, v in node.items()}
        return node
    return convert(lora_params)


def kernel_count(jitted, *args) -> int:
    """Fusions + library calls (cuBLAS, cuDNN, ...) in the compiled program: roughly the kernels one call launches."""
    text = jitted.lower(*args).compile().as_text()
    return len(re.findall(r"=\s*\S+\s+(?:fusion|custom-call)\(", text))


def inference_section(cfg: dict, rounds: int, md: list[str], raw: dict) -> None:
    model = Decoder(cfg["hidden"], cfg["layers"], cfg["intermediate"], cfg["heads"], cfg["vocab"])
    params = nest(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    config = jlora.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False)
    lp = jlora.init(params, config, key=jax.random.key(1))
    lp16 = jlora.init(params, config, key=jax.random.key(1), dtype=jnp.bfloat16)
    merged = jlora.merge(lp)
    fused_model = Decoder(cfg["hidden"], cfg["layers"], cfg["intermediate"], cfg["heads"], cfg["vocab"],
                          fused_rank=RANK, fused_scale=ALPHA / RANK)
    fused = fused_params(lp16)
    apply = lambda p, ids: model.apply({"params": flat(p)}, ids)  # noqa: E731
    f_base, f_again, f_wrap = jax.jit(apply), jax.jit(apply), jax.jit(jlora.wrap(apply))
    f_kernel = jax.jit(jlora.wrap(apply, fused=True))  # jlora's fused LoRA matmul (Pallas)
    try:  # (a Pallas kernel that does not compile here must not cost the rest of the table)
        jax.block_until_ready(f_kernel(lp16, jnp.zeros((1, cfg["tokens"][0]), jnp.int32)))
        kernel_error = ""
    except Exception as err:  # noqa: BLE001 - reported in the table's notes
        kernel_error = f"{type(err).__name__}: {str(err)[:500]}"
        print(f"  wrap(fused=True) failed: {kernel_error}", flush=True)
    on = lambda variant: {} if kernel_error else variant  # noqa: E731
    f_fused = jax.jit(lambda p, ids: fused_model.apply({"params": flat(p)}, ids))

    rows, counts = [], {}
    for t in cfg["tokens"]:
        ids = jnp.asarray(np.random.default_rng(t).integers(0, cfg["vocab"], (1, t)), jnp.int32)
        ref = f_base(merged, ids).astype(jnp.float32)
        err = lambda out: float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))  # noqa: E731
        errs = (err(f_wrap(lp, ids)), err(f_wrap(lp16, ids)), err(f_fused(fused, ids)),
                *([] if kernel_error else [err(f_kernel(lp16, ids))]))
        if t == cfg["tokens"][0]:
            counts = {name: kernel_count(fn, tree, ids) for name, fn, tree in
                      [("base", f_base, params), ("wrap", f_wrap, lp), ("wrap (bf16 adapter)", f_wrap, lp16),
                       ("[W|A] prototype", f_fused, fused), *([] if kernel_error else
                                                               [("wrap(fused=True)", f_kernel, lp16)])]}
        samples = interleaved({"base": lambda: jax.block_until_ready(f_base(params, ids)),
                               "base again": lambda: jax.block_until_ready(f_again(params, ids)),
                               "wrap": lambda: jax.block_until_ready(f_wrap(lp, ids)),
                               "wrap bf16": lambda: jax.block_until_ready(f_wrap(lp16, ids)),
                               "fused": lambda: jax.block_until_ready(f_fused(fused, ids)),
                               **on({"wrap fused": lambda: jax.block_until_ready(f_kernel(lp16, ids))}),
                               "merged": lambda: jax.block_until_ready(f_base(merged, ids))}, rounds=rounds)
        raw[f"inference T={t}"] = samples
        wrap, aa = paired_ratio(samples, "wrap", "base"), paired_ratio(samples, "base again", "base")
        wrap16 = paired_ratio(samples, "wrap bf16", "base")
        rows.append([t, f"{np.median(samples['base']) * 1e3:.3f} ms", fmt_ratio(wrap),
                     check(wrap["median"], 1.05, noise=aa_noise(aa))["text"], fmt_ratio(wrap16),
                     fmt_ratio(paired_ratio(samples, "fused", "base")),
                     "failed" if kernel_error else fmt_ratio(paired_ratio(samples, "wrap fused", "base")),
                     fmt_ratio(paired_ratio(samples, "merged", "base")),
                     fmt_ratio(aa), " / ".join(f"{e:.3g}" for e in errs)])
        print(f"  T={t}: wrap/base {fmt_ratio(wrap)}, bf16 adapter {fmt_ratio(wrap16)}", flush=True)
    md += [f"Decoder bf16, hidden {cfg['hidden']}, {cfg['layers']} layers, intermediate {cfg['intermediate']}, vocab "
           f"{cfg['vocab']}; adapter r={RANK} on all 7 projections (`jlora.init`, B nonzero); batch 1. `wrap` = "
           "jlora.wrap with the default float32 adapter (PEFT's precision: the LoRA branch in float32); `bf16 "
           "adapter` = `dtype=bfloat16`; `[W|A]` = a prototype, not jlora (`FusedLoraDense` in bench_gpu.py: A concatenated onto the kernel ahead of time, one matmul gives x@W and x@A; bf16); `wrap(fused=True)` = jlora's fused LoRA matmul (one Pallas kernel per projection, bf16 adapter). Ratios: median of "
           "per-round paired ratios [quartiles] (ratio of the fastest samples), variants interleaved; A/A = the base "
           "compiled twice. Max |difference| from the merged model's logits, for wrap / bf16 adapter / [W|A] / fused.", "",
           table(["T", "base", "wrap / base", "target <= 1.05", "bf16 adapter / base", "[W|A] / base",
                  "wrap(fused=True) / base", "merged / base", "A/A", "max |x - merged|"], rows), "",
           f"Kernels per call at T={cfg['tokens'][0]} (fusions + library calls in the compiled program): "
           + ", ".join(f"{k} {v}" for k, v in counts.items()) + ".", ""]
    if kernel_error:
        md += [f"`wrap(fused=True)` failed: `{kernel_error}`", ""]


def mixed_section(cfg: dict, rounds: int, tiny: bool, md: list[str], raw: dict) -> None:
    model = Decoder(cfg["hidden"], cfg["layers"], cfg["intermediate"], cfg["heads"], cfg["vocab"])
    params = nest(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    config = jlora.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False)
    apply = lambda p, ids: model.apply({"params": flat(p)}, ids)  # noqa: E731
    f_base, f_wrap, f_mixed = jax.jit(apply), jax.jit(jlora.wrap(apply)), jax.jit(jlora.wrap(apply))
    singles = {f"a{i}": jlora.init(params, config, key=jax.random.key(100 + i)) for i in range(16)}
    many = jlora.multi.stack_adapters(params, singles)
    many16 = jlora.multi.stack_adapters(params, {name: jlora.init(params, config, key=jax.random.key(100 + i),
                                                                  dtype=jnp.bfloat16) for i, name in enumerate(singles)})
    f_kernel = jax.jit(jlora.wrap(apply, fused=True))  # the grouped fused LoRA matmul (Pallas)
    which = jnp.asarray(np.random.default_rng(0).integers(0, 16, (8,)), jnp.int32)
    try:  # (a Pallas kernel that does not compile here must not cost the rest of the table)
        jax.block_until_ready(f_kernel(many16, jnp.zeros((8, 16), jnp.int32), adapter_ids=which))
        kernel_error = ""
    except Exception as err:  # noqa: BLE001 - reported in the table's notes
        kernel_error = f"{type(err).__name__}: {str(err)[:500]}"
        print(f"  mixed wrap(fused=True) failed: {kernel_error}", flush=True)
    rows = []
    for t in (1, 16) if tiny else (1, 16, 256):  # (T=1: decoding, every row its own adapter; issue 6 sets T >= 16)
        ids = jnp.asarray(np.random.default_rng(t).integers(0, cfg["vocab"], (8, t)), jnp.int32)
        fused = {} if kernel_error else {"16 bf16 adapters, mixed, fused": lambda: jax.block_until_ready(
            f_kernel(many16, ids, adapter_ids=which))}
        samples = interleaved({"base": lambda: jax.block_until_ready(f_base(params, ids)),
                               "one adapter": lambda: jax.block_until_ready(f_wrap(singles["a0"], ids)),
                               "16 adapters, mixed": lambda: jax.block_until_ready(
                                   f_mixed(many, ids, adapter_ids=which)),
                               "16 bf16 adapters, mixed": lambda: jax.block_until_ready(
                                   f_mixed(many16, ids, adapter_ids=which)), **fused}, rounds=rounds)
        raw[f"mixed T={t}"] = samples
        mixed = paired_ratio(samples, "16 adapters, mixed", "base")
        rows.append([t, f"{np.median(samples['base']) * 1e3:.3f} ms",
                     fmt_ratio(paired_ratio(samples, "one adapter", "base")), fmt_ratio(mixed),
                     check(mixed["median"], 1.10)["text"] if t > 1 else "(no target)",
                     fmt_ratio(paired_ratio(samples, "16 bf16 adapters, mixed", "base")),
                     "failed" if kernel_error else fmt_ratio(paired_ratio(samples, "16 bf16 adapters, mixed, fused",
                                                                          "base"))])
        print(f"  mixed T={t}: {fmt_ratio(mixed)}", flush=True)
    md += ["Mixed batch, 8 examples, 16 adapters (float32, r=16, uniform random ids; issue 6, target <= 1.10x base); "
           "`fused` = `jlora.wrap(fn, fused=True)`, the grouped fused LoRA matmul (one Pallas kernel per projection):",
           "", table(["T", "base", "one adapter / base", "16 adapters mixed / base", "target",
                      "16 bf16 adapters mixed / base", "16 bf16 adapters mixed, fused / base"], rows), ""]
    if kernel_error:
        md += [f"Mixed `wrap(fused=True)` failed: `{kernel_error}`", ""]


def peft_section(cfg: dict, rounds: int, md: list[str], raw: dict) -> None:
    """PEFT unmerged / torch base (bf16 model, float32 adapter as PEFT makes it), on the GPU when torch sees one."""
    import peft
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tcfg = LlamaConfig(hidden_size=cfg["hidden"], num_hidden_layers=cfg["layers"], intermediate_size=cfg["intermediate"],
                       num_attention_heads=cfg["heads"], num_key_value_heads=cfg["heads"], vocab_size=cfg["vocab"],
                       max_position_embeddings=max(cfg["tokens"]), tie_word_embeddings=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            base, lora = LlamaForCausalLM(tcfg).eval(), LlamaForCausalLM(tcfg).eval()
    finally:
        torch.set_default_dtype(default)
    lora = peft.get_peft_model(lora, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS,
                                                     init_lora_weights=False)).eval()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for t in cfg["tokens"]:
        ids = torch.randint(0, cfg["vocab"], (1, t), device=device)

        def run(model):
            def go():
                with torch.inference_mode():
                    model(input_ids=ids)
                sync()
            return go

        samples = interleaved({"torch base": run(base), "PEFT": run(lora)}, rounds=rounds)
        raw[f"peft T={t}"] = samples
        rows.append([t, f"{np.median(samples['torch base']) * 1e3:.3f} ms",
                     fmt_ratio(paired_ratio(samples, "PEFT", "torch base"))])
        print(f"  PEFT T={t}: {rows[-1][-1]}", flush=True)
    md += [f"PEFT {peft.__version__} unmerged / torch {torch.__version__} base ({device}, transformers' LlamaForCausalLM "
           "of the same shapes with rope and its own attention; bf16 model, PEFT's float32 adapter; eager; a separate "
           "phase, so compare the ratios, not the milliseconds, with the tables above):", "",
           table(["T", "torch base", "PEFT / torch base"], rows), ""]


def load_section(md: list[str], raw: dict) -> None:
    import bench_load
    import torch

    out = bench_load.run(quick=True, torch_device="cuda" if torch.cuda.is_available() else None)
    raw["load"] = out["data"]["samples"]
    md += [f"Load (benchmark 1, `--quick`: 3 rounds), jax arrays on `{jax.devices()[0]}`, PEFT's base model on "
           f"{'cuda' if torch.cuda.is_available() else 'cpu'}:", "", out["markdown"], ""]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="a small sanity run (CPU is fine)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--budget", type=float, default=420.0,
                        help="seconds: a section is not started after this much time has passed")
    parser.add_argument("--sections", default="inference,mixed batch,PEFT,load",
                        help="comma-separated: inference, mixed batch, PEFT, load")
    parser.add_argument("--out", default=os.environ.get("OUT", str(HERE)))
    args = parser.parse_args()
    cfg = TINY if args.tiny else FULL
    rounds = 3 if args.tiny else args.rounds
    t_start = time.perf_counter()
    device = jax.devices()[0]
    import flax
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}, flax {flax.__version__}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "gpu_results-tiny" if args.tiny else "gpu_results"
    md = [f"## GPU: {device.device_kind}", "",
          f"`python benchmarks/bench_gpu.py`{' --tiny' if args.tiny else ''} on {device.device_kind} ({device.platform}), "
          f"jax {jax.__version__}, flax {flax.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", ""]
    raw: dict = {}
    sections = [("inference", lambda: inference_section(cfg, rounds, md, raw)),
                ("mixed batch", lambda: mixed_section(cfg, rounds, args.tiny, md, raw)),
                ("PEFT", lambda: peft_section(cfg, rounds, md, raw)),
                ("load", lambda: load_section(md, raw))]
    for title, section in sections:
        if title not in args.sections.split(","):
            continue
        elapsed = time.perf_counter() - t_start
        if elapsed > args.budget:
            md += [f"({title}: not run, {elapsed:.0f} s had passed)", ""]
            continue
        print(f"[{elapsed:.0f} s] {title}", flush=True)
        try:
            section()
        except Exception:  # noqa: BLE001 - report it and run the next section
            traceback.print_exc()
            md += [f"({title} failed: {traceback.format_exc().strip().splitlines()[-1]})", ""]
        (out / f"{name}.md").write_text("\n".join(md) + "\n")
        (out / f"{name}.json").write_text(json.dumps(raw))
    md.append(f"Whole run: {time.perf_counter() - t_start:.0f} s.")
    text = "\n".join(md)
    print(text)
    (out / f"{name}.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
