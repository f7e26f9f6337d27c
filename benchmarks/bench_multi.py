"""Benchmark (not a test): a mixed batch with 16 adapters vs the same batch with one adapter vs the base.

FlaxLlama (hidden 512, 4 layers, intermediate 1376, vocab 1024, float32), adapters r=16 on all linear
layers, 8 examples per batch, T = 16 and 256 tokens per example. Variants are interleaved and timed
with block_until_ready; medians over repeats. Prints a table and appends it to benchmarks/RESULTS.md
when run with --write.

    python benchmarks/bench_multi.py [--repeats 15] [--write]
"""
import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import jlora  # noqa: E402


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args, **kwargs))
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
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
    rows = []
    for T in (16, 256):
        ids = jnp.asarray(rng.integers(0, 1024, size=(args.batch, T)), jnp.int32)
        adapter_ids = jnp.asarray(rng.integers(0, args.adapters, size=(args.batch,)), jnp.int32)
        variants = {"base": lambda: base_fwd(ids, model.params), "one adapter": lambda: lora_fwd(ids, one),
                    f"{args.adapters} adapters, mixed": lambda: mixed(ids, many, adapter_ids)}
        for f in variants.values():  # compile and warm up
            jax.block_until_ready(f())
            jax.block_until_ready(f())
        times = {k: [] for k in variants}
        for _ in range(args.repeats):
            for k, f in variants.items():
                times[k].append(timed(f))
        med = {k: statistics.median(v) for k, v in times.items()}
        for k in variants:
            rows.append((T, k, med[k] * 1e3, med[k] / med["base"]))

    lines = [f"### Multi-adapter mixed batch (CPU, {platform.processor() or platform.machine()}, "
             f"jax {jax.__version__}, batch {args.batch}, r=16 all linear, median of {args.repeats})", "",
             "| T | variant | ms | / base |", "|---|---|---|---|"]
    lines += [f"| {T} | {k} | {ms:.2f} | {ratio:.3f} |" for T, k, ms, ratio in rows]
    mixed_ratios = [r for T, k, ms, r in rows if "mixed" in k]
    lines += ["", f"Target (issue 6): mixed <= 1.15x base on CPU. Measured: "
                  f"{', '.join(f'{r:.3f}' for r in mixed_ratios)} (T=16, T=256): "
                  f"{'met' if max(mixed_ratios) <= 1.15 else 'missed by ' + f'{max(mixed_ratios) / 1.15 - 1:.0%}'}."]
    print("\n".join(lines))
    if args.write:
        path = Path(__file__).resolve().parent / "RESULTS.md"
        with open(path, "a", encoding="utf-8") as f:
            f.write("\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
