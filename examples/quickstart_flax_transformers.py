"""The quickstart on transformers 4.x's Flax Llama: a PEFT LoRA adapter, unmerged under jit and merged.

(``examples/quickstart.py`` is the demo on google-tunix's Qwen3; this is the same check on a model of
transformers' Flax classes, which exist up to transformers 4.x.) Needs only jax, flax, jlora, numpy and
transformers 4.x (no torch, no peft):

    pip install -e . "transformers>=4.45,<5"
    python examples/quickstart_flax_transformers.py

Uses the bundled tiny assets (regenerate them with ``python examples/make_assets.py tiny-llama``). Checks the
result against the logits PEFT itself produced for the same prompt and exits non-zero on a mismatch.
"""
import json
import sys
from pathlib import Path

import jax
import numpy as np
from transformers import FlaxLlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's jlora, installed or not
import jlora  # noqa: E402
from jlora.tree import adapted_modules

ASSETS = Path(__file__).resolve().parent / "assets"
TOLERANCE = 1e-4  # max |jlora - PEFT| / max |PEFT| on the last-position logits


def main() -> int:
    model = FlaxLlamaForCausalLM.from_pretrained(ASSETS / "tiny-llama")
    lora_params = jlora.load(model.params, ASSETS / "tiny-llama-lora")
    ref = json.loads((ASSETS / "tiny-llama-lora" / "reference_logits.json").read_text())
    ids = np.asarray(ref["input_ids"], dtype=np.int32)
    peft_ref, base_ref = np.asarray(ref["peft_logits"]), np.asarray(ref["base_logits"])

    forward = jax.jit(jlora.wrap(model.__call__))  # adapter applied unmerged: x@W + s*(x@A)@B
    unmerged = np.asarray(forward(ids, params=lora_params).logits[0, -1])
    merged = np.asarray(model(ids, params=jlora.merge(lora_params)).logits[0, -1])

    scale = np.abs(peft_ref).max()
    rel = {name: np.abs(got - peft_ref).max() / scale for name, got in [("unmerged", unmerged), ("merged", merged)]}
    print(f"adapted modules:                {len(adapted_modules(lora_params))}")
    print(f"prompt ids:                     {ids[0].tolist()}")
    for name, got in [("unmerged", unmerged), ("merged", merged)]:
        print(f"max |jlora {name:8s} - PEFT|:  {np.abs(got - peft_ref).max():.2e}  (relative {rel[name]:.2e})")
    print(f"max |PEFT - base model|:        {np.abs(peft_ref - base_ref).max():.2e}  (the adapter's effect)")
    print(f"next token (greedy): jlora {int(unmerged.argmax())}, PEFT {int(peft_ref.argmax())}, "
          f"base model {int(base_ref.argmax())}")

    worst = max(rel.values())
    if worst > TOLERANCE:
        print(f"FAIL: relative difference {worst:.2e} > {TOLERANCE:.0e}")
        return 1
    print(f"OK: jlora matches PEFT (relative difference {worst:.2e} <= {TOLERANCE:.0e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
