"""Benchmark (not a test): a mixed batch with 16 adapters vs the same batch with one adapter vs the base.

FlaxLlama (hidden 512, 4 layers, intermediate 1376, vocab 1024, float32), adapters r=16 on all linear
layers, 8 examples per batch, T = 16 and 256 tokens per example. Variants are interleaved in shuffled
order each round; ratios are medians of per-round paired ratios, with an A/A control (the base model
compiled twice). Prints a table and, with --write,
puts it into benchmarks/RESULTS.md (replacing its previous run).

    python benchmarks/bench_multi.py [--repeats 21] [--write]
"""
import argparse
import platform
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import fmt_ratio, interleaved, paired_ratio, write_section  # noqa: E402

import jlora  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()

    cfg = tf.LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)
    model = tf.FlaxLlamaForCausalLM(cfg, seed=0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    singles = {}
    for i in range(args.adapters):
        config = jlora.LoraConfig(r=16, lora_alpha=32, target_modules=targets, init_lora_weights=False)
        singles[f"a{i}"] = jlora.init(model.params, config, key=jax.random.key(i))
    many = jlora.multi.stack_adapters(model.params, singles)
    one = singles["a0"]

    base_fwd = jax.jit(lambda ids, p: model(ids, params=p).logits)
    lora_fwd = jax.jit(jlora.wrap(lambda ids, p: model(ids, params=p).logits))
    mixed_fwd = jax.jit(jlora.wrap(lambda ids, p: model(ids, params=p).logits))

    def mixed(ids, p, a):
        return mixed_fwd(ids, p, adapter_ids=a)

    rng = np.random.default_rng(0)
    rows, mixed_ratios = [], []
    base_again = jax.jit(lambda ids, p: model(ids, params=p).logits)  # A/A control: identical work
    for T in (16, 256):
        ids = jnp.asarray(rng.integers(0, 1024, size=(args.batch, T)), jnp.int32)
        adapter_ids = jnp.asarray(rng.integers(0, args.adapters, size=(args.batch,)), jnp.int32)
        mixed_name = f"{args.adapters} adapters, mixed"
        variants = {"base": lambda: jax.block_until_ready(base_fwd(ids, model.params)),
                    "base again (A/A control)": lambda: jax.block_until_ready(base_again(ids, model.params)),
                    "one adapter": lambda: jax.block_until_ready(lora_fwd(ids, one)),
                    mixed_name: lambda: jax.block_until_ready(mixed(ids, many, adapter_ids))}
        samples = interleaved(variants, rounds=args.repeats)
        for k in variants:
            r = paired_ratio(samples, k, "base")
            rows.append((T, k, statistics.median(samples[k]) * 1e3, fmt_ratio(r)))
            if k == mixed_name:
                mixed_ratios.append(r["median"])

    lines = [f"### Multi-adapter mixed batch (CPU, {platform.processor() or platform.machine()}, "
             f"jax {jax.__version__}, batch {args.batch}, r=16 all linear, {args.repeats} interleaved rounds)", "",
             "Ratio: median of per-round paired ratios to the base [quartiles] (ratio of the fastest samples).", "",
             "| T | variant | median ms | / base |", "|---|---|---|---|"]
    lines += [f"| {T} | {k} | {ms:.2f} | {ratio} |" for T, k, ms, ratio in rows]
    lines += ["", f"Target (issue 6): mixed <= 1.15x base on CPU. Measured: "
                  f"{', '.join(f'{r:.3f}' for r in mixed_ratios)} (T=16, T=256): "
                  f"{'met' if max(mixed_ratios) <= 1.15 else 'missed by ' + f'{max(mixed_ratios) / 1.15 - 1:.0%}'}."]
    print("\n".join(lines))
    if args.write:
        write_section(lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
