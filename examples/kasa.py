"""KaSA (PEFT's ``kasa_config``): LoRA in SVD form (``s * B @ diag(lora_diag) @ A``) on a base weight without its
``r`` smallest singular components, trained with KaSA's regularizers.

Makes a fresh KaSA adapter for the bundled tiny Flax Llama with ``jlora.init`` (the base arrays are not touched: the
dropped components are kept beside them, frozen), trains it for a few steps with ``jlora.kasa_loss`` added to the
task loss, checks the unmerged model against the merged one, saves it in PEFT's format and reloads it. No torch
needed:

    pip install -e ".[demo]"
    python examples/kasa.py
"""
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from transformers import FlaxLlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's jlora, installed or not
import jlora  # noqa: E402

ASSETS = Path(__file__).resolve().parent / "assets"


def main() -> int:
    model = FlaxLlamaForCausalLM.from_pretrained(ASSETS / "tiny-llama")
    config = jlora.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                              kasa_config={"beta": 1e-4, "gamma": 1e-3})
    lora_params = jlora.init(model.params, config, key=jax.random.key(0))
    forward = jlora.wrap(model.__call__)
    trainable, frozen = jlora.split(lora_params)
    q_proj = lora_params["model"]["layers"]["0"]["self_attn"]["q_proj"]
    print(f"q_proj: {sorted(q_proj)}; trained: {list(q_proj.spec.trainable)}")

    def loss_fn(trainable, ids):
        full = jlora.combine(trainable, frozen)
        logits = forward(ids, params=full).logits[:, :-1]
        task = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()
        return task + jlora.kasa_loss(full)

    tx = optax.adamw(1e-2)
    opt_state = tx.init(trainable)

    @jax.jit
    def step(trainable, opt_state, ids):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, ids)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    ids = (jnp.arange(16)[None] * 3 + jnp.arange(8)[:, None]) % 128  # count in steps of 3
    losses = []
    for _ in range(30):
        trainable, opt_state, loss = step(trainable, opt_state, ids)
        losses.append(float(loss))
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    trained = jlora.combine(trainable, frozen)
    unmerged = forward(ids, params=trained).logits
    merged = model(ids, params=jlora.merge(trained)).logits
    diff = float(jnp.max(jnp.abs(unmerged - merged)))
    print(f"max |unmerged - merged| = {diff:.1e}")
    out = jlora.save(trained, Path(tempfile.mkdtemp()) / "kasa")
    reloaded = jlora.load(model.params, out)
    same = float(jnp.max(jnp.abs(forward(ids, params=reloaded).logits - unmerged)))
    print(f"saved to {out}; reloaded max |difference| = {same:.1e}")
    ok = losses[-1] < losses[0] and diff <= 1e-4 and same <= 1e-5
    print("OK" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
