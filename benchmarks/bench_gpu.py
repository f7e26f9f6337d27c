"""GPU benchmark (issue 5 part 3, issue 6 on GPU): one prepared script for a lent device.

Needs only jax, flax, optax, numpy and jlora (no transformers Flax classes: the device machine has
transformers v5); torch + peft are used for the PEFT column when importable. The model is a
Llama-shaped linen decoder written here (bf16, hidden 4096, 8 layers, intermediate 11008, vocab 32000;
q/k/v/o/gate/up/down as ``nn.Dense`` under transformers' Flax parameter names, so jlora's "hf" layout
targets them), the adapter r=16 on all seven projections made with ``jlora.init``.

Prints markdown and writes it to ``$OUT/gpu_results.md`` (or ``--out``):
1. base / wrap (unmerged) / merged at T = 1, 16, 256, 4096 tokens (batch 1), ratios as medians of
   per-round paired ratios with an A/A control (target: wrap/base <= 1.05 at every T);
2. mixed batch with 16 adapters vs one adapter vs base, batch 8, T = 16 and 256 (target <= 1.10);
3. PEFT unmerged / torch base on the same shapes (bf16, CUDA), when torch sees a GPU.

    python benchmarks/bench_gpu.py                 # the real run (on the device machine)
    python benchmarks/bench_gpu.py --tiny          # a seconds-long sanity run of the same code on CPU
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import jlora  # noqa: E402
from common import aa_noise, check, fmt_ratio, interleaved, paired_ratio, table  # noqa: E402

FULL = dict(hidden=4096, layers=8, intermediate=11008, heads=32, vocab=32000, tokens=(1, 16, 256, 4096))
TINY = dict(hidden=64, layers=2, intermediate=160, heads=4, vocab=128, tokens=(1, 16, 64))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Attention(nn.Module):
    hidden: int
    heads: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        dense = lambda name: nn.Dense(self.hidden, use_bias=False, dtype=self.dtype, param_dtype=self.dtype,  # noqa: E731
                                      name=name)
        b, t, _ = x.shape
        split = lambda y: y.reshape(b, t, self.heads, self.hidden // self.heads)  # noqa: E731
        q, k, v = split(dense("q_proj")(x)), split(dense("k_proj")(x)), split(dense("v_proj")(x))
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return dense("o_proj")(out.reshape(b, t, self.hidden))


class Mlp(nn.Module):
    hidden: int
    intermediate: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=self.dtype, param_dtype=self.dtype,  # noqa: E731
                                         name=name)
        gate, up = dense(self.intermediate, "gate_proj")(x), dense(self.intermediate, "up_proj")(x)
        return dense(self.hidden, "down_proj")(nn.silu(gate) * up)


class Decoder(nn.Module):
    """Llama-shaped decoder (RMSNorm, attention without rope, SwiGLU MLP) with FlaxLlama's parameter names."""
    hidden: int
    layers: int
    intermediate: int
    heads: int
    vocab: int
    dtype: jnp.dtype = jnp.bfloat16

    @nn.compact
    def __call__(self, ids):
        norm = lambda name: nn.RMSNorm(dtype=self.dtype, param_dtype=self.dtype, name=name)  # noqa: E731
        h = nn.Embed(self.vocab, self.hidden, dtype=self.dtype, param_dtype=self.dtype, name="embed_tokens")(ids)
        for i in range(self.layers):
            h = h + Attention(self.hidden, self.heads, self.dtype, name=f"layers_{i}_self_attn")(
                norm(f"layers_{i}_input_layernorm")(h))
            h = h + Mlp(self.hidden, self.intermediate, self.dtype, name=f"layers_{i}_mlp")(
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


def peft_section(cfg: dict, tokens, rounds: int) -> list[list[str]]:
    """PEFT unmerged / torch base (bf16, CUDA) on the same shapes; [] when torch or a GPU is missing."""
    try:
        import peft
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as err:
        print(f"PEFT column skipped: {err}")
        return []
    if not torch.cuda.is_available():
        print("PEFT column skipped: torch sees no GPU")
        return []
    tcfg = LlamaConfig(hidden_size=cfg["hidden"], num_hidden_layers=cfg["layers"], intermediate_size=cfg["intermediate"],
                       num_attention_heads=cfg["heads"], num_key_value_heads=cfg["heads"], vocab_size=cfg["vocab"],
                       max_position_embeddings=max(tokens), tie_word_embeddings=False)
    base = LlamaForCausalLM(tcfg).to(torch.bfloat16).cuda().eval()
    lora = peft.get_peft_model(LlamaForCausalLM(tcfg).to(torch.bfloat16).cuda().eval(),
                               peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False))
    lora.eval()
    rows = []
    for t in tokens:
        ids = torch.randint(0, cfg["vocab"], (1, t), device="cuda")

        def run(model):
            def go():
                with torch.inference_mode():
                    model(input_ids=ids)
                torch.cuda.synchronize()
            return go

        samples = interleaved({"torch base": run(base), "PEFT": run(lora)}, rounds=rounds)
        rows.append([t, fmt_ratio(paired_ratio(samples, "PEFT", "torch base"))])
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="a small sanity run (CPU is fine)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default=os.environ.get("OUT", str(HERE)))
    args = parser.parse_args()
    cfg = TINY if args.tiny else FULL
    rounds = 3 if args.tiny else args.rounds
    t_start = time.perf_counter()
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}", flush=True)

    model = Decoder(cfg["hidden"], cfg["layers"], cfg["intermediate"], cfg["heads"], cfg["vocab"])
    params = nest(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    config = jlora.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
    lp = jlora.init(params, config, key=jax.random.key(1))
    merged = jlora.merge(lp)
    apply = lambda p, ids: model.apply({"params": flat(p)}, ids)  # noqa: E731
    f_base, f_again, f_wrap = jax.jit(apply), jax.jit(apply), jax.jit(jlora.wrap(apply))

    rows, targets = [], {}
    for t in cfg["tokens"]:
        ids = jnp.asarray(np.random.default_rng(t).integers(0, cfg["vocab"], (1, t)), jnp.int32)
        err = float(jnp.max(jnp.abs(f_wrap(lp, ids).astype(jnp.float32) - f_base(merged, ids).astype(jnp.float32))))
        samples = interleaved({"base": lambda: jax.block_until_ready(f_base(params, ids)),
                               "base again": lambda: jax.block_until_ready(f_again(params, ids)),
                               "wrap": lambda: jax.block_until_ready(f_wrap(lp, ids)),
                               "merged": lambda: jax.block_until_ready(f_base(merged, ids))}, rounds=rounds)
        wrap, aa = paired_ratio(samples, "wrap", "base"), paired_ratio(samples, "base again", "base")
        targets[f"T{t}"] = check(wrap["median"], 1.05, noise=aa_noise(aa))
        rows.append([t, f"{np.median(samples['base']) * 1e3:.3f} ms", fmt_ratio(wrap), targets[f"T{t}"]["text"],
                     fmt_ratio(paired_ratio(samples, "merged", "base")), fmt_ratio(aa), f"{err:.3g}"])
        print(f"  T={t}: wrap/base {fmt_ratio(wrap)}", flush=True)

    singles = {f"a{i}": jlora.init(params, config, key=jax.random.key(100 + i)) for i in range(16)}
    many = jlora.multi.stack_adapters(params, singles)
    f_mixed = jax.jit(jlora.wrap(apply))
    multi_rows = []
    for t in (16, 256) if not args.tiny else (16,):
        ids = jnp.asarray(np.random.default_rng(t).integers(0, cfg["vocab"], (8, t)), jnp.int32)
        which = jnp.asarray(np.random.default_rng(0).integers(0, 16, (8,)), jnp.int32)
        samples = interleaved({"base": lambda: jax.block_until_ready(f_base(params, ids)),
                               "one adapter": lambda: jax.block_until_ready(f_wrap(singles["a0"], ids)),
                               "16 adapters, mixed": lambda: jax.block_until_ready(
                                   f_mixed(many, ids, adapter_ids=which))}, rounds=rounds)
        mixed = paired_ratio(samples, "16 adapters, mixed", "base")
        multi_rows.append([t, fmt_ratio(paired_ratio(samples, "one adapter", "base")), fmt_ratio(mixed),
                           check(mixed["median"], 1.10)["text"]])
        print(f"  mixed T={t}: {fmt_ratio(mixed)}", flush=True)

    peft_rows = peft_section(cfg, cfg["tokens"], rounds)
    md = [f"## GPU: {device.device_kind}", "",
          f"`python benchmarks/bench_gpu.py`{' --tiny' if args.tiny else ''} on {device.device_kind} ({device.platform}), "
          f"jax {jax.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {time.perf_counter() - t_start:.0f} s. "
          f"Decoder bf16, hidden {cfg['hidden']}, {cfg['layers']} layers, intermediate {cfg['intermediate']}, vocab "
          f"{cfg['vocab']}; adapter r=16, all 7 projections; batch 1. Ratios: median of per-round paired ratios "
          "[quartiles] (ratio of the fastest samples), variants interleaved; A/A = the base compiled twice.", "",
          table(["T", "base", "wrap / base", "target <= 1.05", "merged / base", "A/A", "max |wrap - merged|"], rows), "",
          "Mixed batch, 8 examples (issue 6, target <= 1.10x base):", "",
          table(["T", "one adapter / base", "16 adapters mixed / base", "target"], multi_rows), ""]
    if peft_rows:
        md += ["PEFT unmerged / torch base (bf16, CUDA, same shapes, separate phase):", "",
               table(["T", "PEFT / torch base"], peft_rows), ""]
    text = "\n".join(md)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ("gpu_results-tiny.md" if args.tiny else "gpu_results.md")).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
