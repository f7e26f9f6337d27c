"""Arrow routing (PEFT's create_arrow_model): several task LoRAs as a per-token mixture, with no adapter ids.

Makes three task adapters for the bundled tiny Flax Llama (fresh, random, saved in PEFT's format), loads them
together and routes every token of a batch through its closest adapter (``jlora.arrow``, top_k=1). Then checks
the routing against a case worked out by hand: with every adapter chosen and a huge temperature, the router's
weights are uniform, so Arrow equals the plain average of the three adapters' updates
(``jlora.add_weighted(method="cat")`` with weights 1/3). No torch needed:

    pip install -e ".[demo]"
    python examples/arrow_routing.py
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
    config = jlora.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                              init_lora_weights=False)
    sources = {f"task_{i}": jlora.save(jlora.init(model.params, config, key=jax.random.key(i)), work / f"task_{i}")
               for i in range(3)}
    library = jlora.load(model.params, sources)
    forward = jax.jit(jlora.wrap(model.__call__))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, size=(2, 12)), jnp.int32)

    routed = forward(ids, params=jlora.arrow(library, top_k=1)).logits  # each token: its closest adapter
    base = model(ids, params=model.params).logits
    print(f"top_k=1: max |routed - base| = {float(jnp.max(jnp.abs(routed - base))):.3f}")

    uniform = forward(ids, params=jlora.arrow(library, top_k=3, router_temperature=1e9)).logits
    average = jlora.add_weighted(library, {name: 1 / 3 for name in sources}, method="cat")
    expected = model(ids, params=jlora.merge(average)).logits
    diff = float(jnp.max(jnp.abs(uniform - expected)))
    print(f"top_k=3, uniform weights: max |Arrow - average of the adapters| = {diff:.1e}")
    ok = diff <= 1e-4 and float(jnp.max(jnp.abs(routed - uniform))) > 1e-3
    print("OK" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
