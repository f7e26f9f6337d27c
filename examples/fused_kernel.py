"""jlora.wrap(fn, fused=True): each adapted nn.Dense runs x@W and its LoRA term in one Pallas kernel.

Experimental and meant for GPUs (one kernel per adapted projection instead of three); elsewhere the same formula
runs as plain XLA matmuls, so this example runs anywhere:

    python examples/fused_kernel.py

Loads the bundled tiny Llama and its PEFT adapter, runs the usual side path and the fused kernel, checks both
against the logits PEFT produced (exits non-zero on a mismatch), and on a GPU times them against the base model.
"""
import json
import sys
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
    if kernels == 0 or worst > TOLERANCE:
        print(f"FAIL: {kernels} fused projections, relative difference {worst:.2e} (limit {TOLERANCE:.0e})")
        return 1
    print(f"OK: the fused kernel matches PEFT (relative difference {worst:.2e} <= {TOLERANCE:.0e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
