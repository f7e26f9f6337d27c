"""Activated LoRA (aLoRA): an adapter that runs only from its invocation tokens on, so the base model's KV cache
of the conversation so far is reused as it is.

Makes an aLoRA adapter for the bundled tiny Flax Llama (PEFT's format, ``alora_invocation_tokens`` set), then:
1. runs a batch through ``jlora.wrap`` with ``alora_offsets``: the tokens before each row's invocation, and a row
   without it, equal the base model;
2. fills a KV cache with the *base* model on a prompt, and continues from the invocation with the adapter on that
   cache: the logits equal one adapted pass over the whole sequence (no prefill repeated for the adapter).
No torch needed:

    pip install -e ".[demo]"
    python examples/activated_lora.py
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
INVOCATION = [17, 42, 99]  # the token ids that switch the adapter on (e.g. a role marker in a chat template)


def main() -> int:
    model = FlaxLlamaForCausalLM.from_pretrained(ASSETS / "tiny-llama")
    config = jlora.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                              init_lora_weights=False, alora_invocation_tokens=INVOCATION, task_type="CAUSAL_LM")
    adapter_dir = jlora.save(jlora.init(model.params, config, key=jax.random.key(0)), Path(tempfile.mkdtemp()) / "a")
    lora_params = jlora.load(model.params, adapter_dir)
    forward = jax.jit(jlora.wrap(model.__call__))

    rng = np.random.default_rng(0)
    ids = rng.integers(3, 128, size=(2, 16)).astype(np.int32)
    ids[ids == INVOCATION[0]] = 3
    ids[0, 9:12] = INVOCATION  # row 0 invokes the adapter at token 9; row 1 never does
    offsets = jlora.alora_offsets(lora_params, ids)  # tokens from the invocation to the end: [7, 0]
    adapted = forward(ids, params=lora_params, alora_offsets=offsets).logits
    base = model(ids, params=model.params).logits
    before = float(jnp.max(jnp.abs(adapted[0, :9] - base[0, :9])))
    after = float(jnp.max(jnp.abs(adapted[0, 9:] - base[0, 9:])))
    untouched = float(jnp.max(jnp.abs(adapted[1] - base[1])))
    print(f"offsets {offsets.tolist()}; row 0 before the invocation: max |aLoRA - base| = {before:.1e}, "
          f"from it on: {after:.1e}; row 1 (no invocation): {untouched:.1e}")

    # the base model's cache of row 0's first 9 tokens, then the adapter from the invocation on, on that cache
    row, split = ids[:1], 9
    cache = model.init_cache(1, ids.shape[1])
    prefix = model(row[:, :split], params=model.params, past_key_values=cache,
                   attention_mask=jnp.ones_like(row), position_ids=jnp.arange(split)[None])
    rest = row[:, split:]
    continued = forward(rest, params=lora_params, past_key_values=prefix.past_key_values,
                        attention_mask=jnp.ones_like(row), position_ids=jnp.arange(split, row.shape[1])[None],
                        alora_offsets=jlora.alora_offsets(lora_params, rest)).logits
    reuse = float(jnp.max(jnp.abs(continued[0] - adapted[0, split:])))
    print(f"continuing on the base model's cache: max |cached - one pass| = {reuse:.1e}")

    ok = before <= 1e-5 and untouched <= 1e-5 and after > 1e-3 and reuse <= 1e-4
    print("OK" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
