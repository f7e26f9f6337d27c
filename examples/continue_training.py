"""Continue training a PEFT LoRA adapter in JAX, save it in PEFT's format, and reload it.

Loads the bundled adapter onto the bundled tiny Flax Llama, trains only the adapter (optax AdamW,
frozen base) to continue a counting task, saves with ``jlora.save`` and checks that the reloaded
adapter reproduces the trained outputs. No torch needed:

    pip install -e ".[demo]"
    python examples/continue_training.py [--steps 300] [--out /tmp/tiny-llama-lora-trained]
"""
import argparse
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import trange
from transformers import FlaxLlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's jlora, installed or not
import jlora  # noqa: E402

ASSETS = Path(__file__).resolve().parent / "assets"


def counting_batch(key, batch=16, length=24, vocab=128):
    """Sequences start, start+3, start+6, ... (mod vocab): the next token is always +3."""
    start = jax.random.randint(key, (batch, 1), 0, vocab)
    return (start + 3 * jnp.arange(length)) % vocab


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp()) / "tiny-llama-lora-trained")
    args = parser.parse_args()

    model = FlaxLlamaForCausalLM.from_pretrained(ASSETS / "tiny-llama")
    lora_params = jlora.load(model.params, ASSETS / "tiny-llama-lora")
    forward = jlora.wrap(model.__call__)
    print(f"trainable parameters: {jlora.count_trainable(lora_params):,} "
          f"(base model: {sum(x.size for x in jax.tree_util.tree_leaves(model.params)):,})")

    def loss_fn(trainable, frozen, ids):
        logits = forward(ids, params=jlora.combine(trainable, frozen)).logits[:, :-1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    trainable, frozen = jlora.split(lora_params)
    tx = optax.adamw(1e-2)
    opt_state = tx.init(trainable)

    @jax.jit
    def step(trainable, opt_state, ids):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, ids)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    key = jax.random.key(0)
    bar = trange(args.steps, desc="training")
    for i in bar:
        trainable, opt_state, loss = step(trainable, opt_state, counting_batch(jax.random.fold_in(key, i)))
        if i == 0:
            first = float(loss)
        if i % 20 == 0 or i == args.steps - 1:
            bar.set_postfix(loss=f"{float(loss):.3f}")
    print(f"loss: {first:.3f} -> {float(loss):.3f}")

    trained = jlora.combine(trainable, frozen)
    jlora.save(trained, args.out)
    reloaded = jlora.load(model.params, args.out)
    ids = counting_batch(jax.random.key(123), batch=2)
    before = forward(ids, params=trained).logits
    after = forward(ids, params=reloaded).logits
    accuracy = float(jnp.mean(jnp.argmax(after[:, :-1], -1) == ids[:, 1:]))
    print(f"saved to {args.out} (PEFT format); reloaded max |diff| = {float(jnp.max(jnp.abs(before - after))):.2e}")
    print(f"next-token accuracy on a fresh counting sequence: {accuracy:.0%}")
    ok = bool(np.array_equal(np.asarray(before), np.asarray(after))) and float(loss) < first
    print("OK" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
