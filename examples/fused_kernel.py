"""jlora.wrap(fn, fused=True): each adapted nn.Dense runs x@W and its LoRA term in one Pallas kernel.

Experimental and meant for GPUs (one kernel per adapted projection instead of three); elsewhere the same formula
runs as plain XLA matmuls, so this example runs anywhere:

    python examples/fused_kernel.py

Loads the bundled tiny Llama and its PEFT adapter, runs the usual side path and the fused kernel, checks both
against the logits PEFT produced (exits non-zero on a mismatch), and on a GPU times them against the base model.
Then a mixed batch (the PEFT adapter, the base model and a second adapter, one per example, 16 tokens each) runs
in the kernel's grouped form, checked against the side path.
"""
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from transformers import FlaxLlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's jlora, installed or not
import jlora  # noqa: E402

ASSETS = Path(__file__).resolve().parent / "assets"
TOLERANCE = 1e-4  # max |jlora - PEFT| / max |PEFT| on the last-position logits


def median_ms(fn, *args, **kwargs) -> float:
    jax.block_until_ready(fn(*args, **kwargs))
    times = []
    for _ in range(21):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args, **kwargs))
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def mixed_batch(model) -> float:
    """Rows: the PEFT adapter, the base model (-1), a second adapter; fused vs side path, relative difference."""
    other = jlora.init(model.params, jlora.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"],
                                                      init_lora_weights=False), key=jax.random.key(0))
    with tempfile.TemporaryDirectory() as folder:
        jlora.save(other, folder)
        both = jlora.load(model.params, {"peft": ASSETS / "tiny-llama-lora", "other": folder})
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (3, 16)).astype(np.int32)
    which = np.array([0, -1, 1], np.int32)
    want = jax.jit(jlora.wrap(model.__call__))(ids, params=both, adapter_ids=which).logits
    fused = jlora.wrap(model.__call__, fused=True)
    got = jax.jit(fused)(ids, params=both, adapter_ids=which).logits
    rel = float(np.abs(np.asarray(got) - np.asarray(want)).max() / np.abs(np.asarray(want)).max())
    kernels = str(jax.make_jaxpr(fused)(ids, params=both, adapter_ids=which)).count("pallas_call")
    print(f"mixed batch (PEFT adapter, base model, another adapter): {kernels} projections in the grouped kernel, "
          f"max |fused - side path| / max: {rel:.2e}")
    return rel if kernels else float("inf")


def main() -> int:
    model = FlaxLlamaForCausalLM.from_pretrained(ASSETS / "tiny-llama")
    lora_params = jlora.load(model.params, ASSETS / "tiny-llama-lora")
    ref = json.loads((ASSETS / "tiny-llama-lora" / "reference_logits.json").read_text())
    ids = np.asarray(ref["input_ids"], dtype=np.int32)
    peft_ref = np.asarray(ref["peft_logits"])

    side_path = jax.jit(jlora.wrap(model.__call__))
    fused = jax.jit(jlora.wrap(model.__call__, fused=True))
    kernels = str(jax.make_jaxpr(jlora.wrap(model.__call__, fused=True))(ids, params=lora_params)).count("pallas_call")
    print(f"backend {jax.default_backend()}: {kernels} adapted projections run in the fused kernel"
          + ("" if jax.default_backend() == "gpu" else " (off a GPU: its formula as plain XLA matmuls)"))
    worst = 0.0
    for name, forward in [("side path", side_path), ("fused", fused)]:
        got = np.asarray(forward(ids, params=lora_params).logits[0, -1])
        rel = float(np.abs(got - peft_ref).max() / np.abs(peft_ref).max())
        worst = max(worst, rel)
        print(f"max |jlora {name:9s} - PEFT| / max |PEFT|: {rel:.2e}")
    if jax.default_backend() == "gpu":
        base = jax.jit(model.__call__)
        t_base = median_ms(base, ids, params=model.params)
        for name, forward in [("side path", side_path), ("fused", fused)]:
            print(f"{name} / base model: {median_ms(forward, ids, params=lora_params) / t_base:.3f}")
    worst = max(worst, mixed_batch(model))
    if kernels == 0 or worst > TOLERANCE:
        print(f"FAIL: {kernels} fused projections, relative difference {worst:.2e} (limit {TOLERANCE:.0e})")
        return 1
    print(f"OK: the fused kernel matches PEFT (relative difference {worst:.2e} <= {TOLERANCE:.0e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
