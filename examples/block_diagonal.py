"""BD-LoRA (PEFT's ``use_bdlora``): a LoRA whose lora_A (row-sharded layers) or lora_B (column-sharded layers)
is block-diagonal, so that a tensor-parallel server needs no extra communication for it.

Makes a fresh BD-LoRA adapter for the bundled tiny Flax Llama with ``jlora.init`` (2 blocks: lora_B block-diagonal
on q/k/v/up/gate, lora_A on o/down, as PEFT's docs advise), trains it for a few steps with optax, checks that every
factor is still block-diagonal (the forward masks the off-block entries, so they get no gradient), saves it in
PEFT's format (only the diagonal blocks are stored, as PEFT stores them) and reloads it. No torch needed:

    pip install -e ".[demo]"
    python examples/block_diagonal.py
"""
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from safetensors.numpy import load_file
from transformers import FlaxLlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's jlora, installed or not
import jlora  # noqa: E402

ASSETS = Path(__file__).resolve().parent / "assets"
BLOCKS = 2


def off_block(factor: np.ndarray, rank_axis: int) -> float:
    """The largest entry of a (features, r) lora_A or (r, features) lora_B outside its diagonal blocks."""
    f = np.moveaxis(factor, rank_axis, 0)
    rows, cols = f.shape[0] // BLOCKS, f.shape[1] // BLOCKS
    keep = np.kron(np.eye(BLOCKS, dtype=bool), np.ones((rows, cols), bool))
    return float(np.abs(f[~keep]).max())


def main() -> int:
    model = FlaxLlamaForCausalLM.from_pretrained(ASSETS / "tiny-llama")
    config = jlora.LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear",
        use_bdlora={"target_modules_bd_a": ["o_proj", "down_proj"],
                    "target_modules_bd_b": ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"], "nblocks": BLOCKS})
    lora_params = jlora.init(model.params, config, key=jax.random.key(0))
    forward = jlora.wrap(model.__call__)
    trainable, frozen = jlora.split(lora_params)

    def loss_fn(trainable, ids):
        logits = forward(ids, params=jlora.combine(trainable, frozen)).logits[:, :-1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    tx = optax.adamw(1e-2)
    opt_state = tx.init(trainable)

    @jax.jit
    def step(trainable, opt_state, ids):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, ids)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    ids = (jnp.arange(16)[None] * 3 + jnp.arange(8)[:, None]) % 128  # count in steps of 3
    first = None
    for _ in range(30):
        trainable, opt_state, loss = step(trainable, opt_state, ids)
        first = float(loss) if first is None else first
    print(f"loss {first:.3f} -> {float(loss):.3f}")

    trained = jlora.combine(trainable, frozen)
    layer = trained["model"]["layers"]["0"]
    leaks = max(off_block(np.asarray(layer["self_attn"]["q_proj"]["lora_B"]), 0),
                off_block(np.asarray(layer["mlp"]["down_proj"]["lora_A"]), 1))
    print(f"largest entry off the diagonal blocks after training: {leaks}")

    out = jlora.save(trained, Path(tempfile.mkdtemp()) / "bdlora")
    stored = load_file(out / "adapter_model.safetensors")
    q_b = stored["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    print(f"saved: q_proj lora_B {list(q_b.shape)} (out, r / nblocks), as PEFT stores its blocks")
    reloaded = jlora.load(model.params, out)
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(trained),
                                                    jax.tree_util.tree_leaves(reloaded)))
    ok = float(loss) < first and leaks == 0.0 and q_b.shape == (64, 8 // BLOCKS) and same
    print("OK" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
