"""Several adapters in one jitted call: each row of a batch runs its own adapter (or none).

Makes three adapters for the bundled tiny Flax Llama (the bundled PEFT adapter plus two fresh,
randomly initialised ones saved in PEFT's format, one with its own lm_head), loads them together and
runs one mixed batch, then checks every row against running that adapter alone. No torch needed:

    pip install -e ".[demo]"
    python examples/multi_adapter.py
"""
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from transformers import FlaxLlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's jlora, installed or not
import jlora  # noqa: E402

ASSETS = Path(__file__).resolve().parent / "assets"


def main() -> int:
    model = FlaxLlamaForCausalLM.from_pretrained(ASSETS / "tiny-llama")
    work = Path(tempfile.mkdtemp())
    sources = {"bundled": ASSETS / "tiny-llama-lora"}
    for seed, (name, targets, rank) in enumerate([("attn", ["q_proj", "v_proj"], 4), ("mlp", ["up_proj"], 16)]):
        # the "mlp" adapter also brings its own output head (modules_to_save), as a fine-tuned head would
        config = jlora.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False,
                                  modules_to_save=["lm_head"] if name == "mlp" else None)
        fresh = jlora.init(model.params, config, key=jax.random.key(seed))
        if name == "mlp":
            fresh = {**fresh, "lm_head": fresh["lm_head"].replace(kernel=1.5 * fresh["lm_head"]["kernel"])}
        sources[name] = jlora.save(fresh, work / name)

    lora_params = jlora.load(model.params, sources)  # dict order = adapter index
    forward = jax.jit(jlora.wrap(model.__call__))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, size=(4, 12)), jnp.int32)
    adapter_ids = jnp.array([0, 1, 2, -1])  # -1: base model only
    mixed = forward(ids, params=lora_params, adapter_ids=adapter_ids).logits

    worst = 0.0
    for row, index in enumerate(adapter_ids.tolist()):
        name = list(sources)[index] if index >= 0 else "base"
        alone_params = jlora.select(lora_params, name) if index >= 0 else model.params
        alone = forward(ids, params=alone_params).logits[row]
        diff = float(jnp.max(jnp.abs(mixed[row] - alone)))
        worst = max(worst, diff)
        print(f"row {row}: adapter {name:8s} max |mixed - alone| = {diff:.2e}")
    ok = worst <= 1e-4
    print("OK" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
