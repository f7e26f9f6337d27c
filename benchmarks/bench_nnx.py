"""Benchmark (not a test): an NNX Llama with a LoRA adapter, run by ``jlora.nnx_model`` (side paths,
unmerged) and by ``jlora.wrap`` around ``nnx.merge`` (NNX has no method interceptors, so every kernel
is merged inside the call), against the base model.

The NNX decoder is the one the tests use (``tests/llama_variants.py``: separate q/o/MLP ``nnx.Linear``s,
a fused kv ``nnx.LinearGeneral``), hidden 512, 4 layers, intermediate 1376, vocab 1024, float32;
adapter r=16 on all seven projections. Variants are interleaved in shuffled order each round; ratios are
medians of per-round paired ratios. Prints a table and, with --write,
puts it into benchmarks/RESULTS.md (replacing its previous run).

    python benchmarks/bench_nnx.py [--repeats 21] [--write]
"""
import argparse
import platform
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import transformers as tf
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from common import fmt_ratio, interleaved, paired_ratio, write_section  # noqa: E402
from llama_variants import make_nnx_llama, nnx_logits  # noqa: E402

import jlora  # noqa: E402

LAYER = r"model\.layers\.(?P<layer>\d+)"
LAYOUT = jlora.Layout([
    jlora.Rule(rf"{LAYER}\.self_attn\.q_proj", "layers/{layer}/attn/q/kernel", "o i -> i o"),
    jlora.Rule(rf"{LAYER}\.self_attn\.k_proj", "layers/{layer}/attn/kv/kernel", "(k h) i -> i part k h", part=0),
    jlora.Rule(rf"{LAYER}\.self_attn\.v_proj", "layers/{layer}/attn/kv/kernel", "(k h) i -> i part k h", part=1),
    jlora.Rule(rf"{LAYER}\.self_attn\.o_proj", "layers/{layer}/attn/o/kernel", "o i -> i o"),
    jlora.Rule(rf"{LAYER}\.mlp\.(?P<m>gate|up|down)_proj", "layers/{layer}/mlp/{m}/kernel", "o i -> i o"),
], name="nnx-llama")
PROJECTIONS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="jlora.wrap: no unmerged side path")

    cfg = tf.LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, head_dim=64, max_position_embeddings=2048)
    graphdef, state = make_nnx_llama(cfg)
    params = nnx.to_pure_dict(state)
    names = [f"model.layers.{i}.{group}.{m}" for i in range(cfg.num_hidden_layers)
             for group, modules in PROJECTIONS.items() for m in modules]
    config = jlora.LoraConfig(r=16, lora_alpha=32, target_modules=[m for ms in PROJECTIONS.values() for m in ms],
                              init_lora_weights=False)
    lp = jlora.init(params, config, key=jax.random.key(0), layout=LAYOUT, module_names=names)

    base = jax.jit(lambda p, ids: nnx_logits(graphdef, p, ids))
    base_again = jax.jit(lambda p, ids: nnx_logits(graphdef, p, ids))  # A/A control
    unmerged = jax.jit(lambda p, ids: jlora.nnx_model(graphdef, p)(ids))
    merged_in_call = jax.jit(jlora.wrap(lambda p, ids: nnx_logits(graphdef, p, ids)))

    rows = []
    for T in (1, 16, 256):
        ids = jnp.zeros((1, T), jnp.int32)
        diff = float(jnp.max(jnp.abs(unmerged(lp, ids) - merged_in_call(lp, ids))))
        variants = {"base": lambda: base(params, ids).block_until_ready(),
                    "base again (A/A control)": lambda: base_again(params, ids).block_until_ready(),
                    "jlora.nnx_model (unmerged)": lambda: unmerged(lp, ids).block_until_ready(),
                    "jlora.wrap (merged in the call)": lambda: merged_in_call(lp, ids).block_until_ready()}
        samples = interleaved(variants, rounds=args.repeats)
        rows += [(T, k, fmt_ratio(paired_ratio(samples, k, "base")), f"{diff:.1e}") for k in variants]

    lines = [f"### NNX: jlora.nnx_model vs jlora.wrap (CPU, {platform.processor() or platform.machine()}, "
             f"jax {jax.__version__}, batch 1, r=16 all linear, {args.repeats} interleaved rounds)", "",
             "Ratio: median of per-round paired ratios to the base [quartiles] (ratio of the fastest samples); "
             "last column: max |nnx_model - wrap| of the logits.", "",
             "| T | variant | / base | outputs differ by |", "|---|---|---|---|"]
    lines += [f"| {T} | {k} | {ratio} | {diff} |" for T, k, ratio, diff in rows]
    print("\n".join(lines))
    if args.write:
        write_section(lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
