"""Layer replication (PEFT's ``layer_replication``): a deeper model built from the base model's own layers, each
repeated layer sharing its weights but with a LoRA of its own (depth up-scaling on a budget).

Repeats the bundled tiny Flax Llama's two layers into four (``[[0, 2], [0, 2]]``: layers 0 1 0 1, no array copied),
makes a fresh adapter over the four layers with ``jlora.init``, runs it unmerged and merged, saves it in PEFT's
format (PEFT rebuilds the same four layers from the saved config) and reloads it. No torch needed:

    pip install -e ".[demo]"
    python examples/layer_replication.py
"""
import copy
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
LAYER_MAP = [[0, 2], [0, 2]]


def main() -> int:
    model = FlaxLlamaForCausalLM.from_pretrained(ASSETS / "tiny-llama")
    deep_params = jlora.replicate_layers(model.params, LAYER_MAP)
    layers = deep_params["model"]["layers"]
    shared = layers["2"]["self_attn"]["q_proj"]["kernel"] is layers["0"]["self_attn"]["q_proj"]["kernel"]
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(layers)
    deeper = FlaxLlamaForCausalLM(config, _do_init=False)
    print(f"layers: {model.config.num_hidden_layers} -> {len(layers)}; layer 2 shares layer 0's arrays: {shared}")

    adapter = jlora.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                               init_lora_weights=False, layer_replication=LAYER_MAP)
    lora_params = jlora.init(deep_params, adapter, key=jax.random.key(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, size=(2, 10)), jnp.int32)
    unmerged = jax.jit(jlora.wrap(deeper.__call__))(ids, params=lora_params).logits
    merged = deeper(ids, params=jlora.merge(lora_params)).logits
    diff = float(jnp.max(jnp.abs(unmerged - merged)))
    print(f"max |unmerged - merged| = {diff:.1e}")

    out = jlora.save(lora_params, Path(tempfile.mkdtemp()) / "replicated")
    reloaded = jlora.load(jlora.replicate_layers(model.params, LAYER_MAP), out)
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(lora_params),
                                                    jax.tree_util.tree_leaves(reloaded)))
    print(f"saved to {out}; reloaded equal: {same}")
    ok = shared and diff <= 1e-4 and same
    print("OK" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
