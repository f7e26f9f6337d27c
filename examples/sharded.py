"""A PEFT LoRA adapter on a sharded Flax Llama: 8 host devices as a 2x4 (data x model) mesh.

The base params are sharded FSDP ("data") x tensor parallel ("model"); ``jlora.load`` reads each
LoRA leaf from the memory-mapped file straight into the devices that hold it, sharded like its
base kernel (lora_A like the kernel's input axis, lora_B like its output axis, rank replicated).
Then: unmerged and merged inference under jit (checked against PEFT's logits), a few training steps
with the batch sharded over "data", and a save/reload round trip. No torch needed:

    pip install -e ".[demo]"
    python examples/sharded.py [--steps 30]

On a real multi-accelerator machine drop the XLA_FLAGS line: the mesh is made from jax.devices().
"""
import os

# 8 CPU devices: must be set before jax is imported.
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count=8 {os.environ.get('XLA_FLAGS', '')}".strip()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from transformers import FlaxLlamaForCausalLM  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's jlora, installed or not
import jlora  # noqa: E402
from jlora.tree import adapted_modules  # noqa: E402

ASSETS = Path(__file__).resolve().parent / "assets"
ROW_PARALLEL = ("o_proj", "down_proj")  # kernels whose input axis is split over "model"


def fsdp_tp(path, leaf) -> P:
    """Kernels (in, out): column-parallel P("data", "model"), row-parallel P("model", "data");
    the embedding P("model", "data"); norm weights replicated."""
    keys = [getattr(k, "key", str(k)) for k in path]
    if keys[-1] == "kernel":
        return P("model", "data") if keys[-2] in ROW_PARALLEL else P("data", "model")
    if keys[-1] == "embedding":
        return P("model", "data")
    return P()


def counting_batch(key, batch=8, length=16, vocab=128):
    """Sequences start, start+3, start+6, ... (mod vocab): the next token is always +3."""
    start = jax.random.randint(key, (batch, 1), 0, vocab)
    return (start + 3 * jnp.arange(length)) % vocab


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    model = FlaxLlamaForCausalLM.from_pretrained(ASSETS / "tiny-llama")
    shardings = jax.tree_util.tree_map_with_path(lambda p, x: NamedSharding(mesh, fsdp_tp(p, x)), model.params)
    params = jax.device_put(model.params, shardings)

    lora_params = jlora.load(params, ASSETS / "tiny-llama-lora")  # shardings derived from the kernels
    print(f"mesh {dict(mesh.shape)}; LoRA leaves and their shardings:")
    for _, node in adapted_modules(lora_params):
        kernel = node[node.spec.kernel_key]
        print(f"  {node.spec.peft_name:34s} kernel {str(kernel.shape):10s} {str(kernel.sharding.spec):22s}"
              f" lora_A {str(node['lora_A'].shape):8s} {str(node['lora_A'].sharding.spec):18s}"
              f" lora_B {str(node['lora_B'].shape):8s} {node['lora_B'].sharding.spec}")

    # Inference: the prompt of PEFT's reference logits, replicated (batch 1).
    ref = json.loads((ASSETS / "tiny-llama-lora" / "reference_logits.json").read_text())
    ids = jax.device_put(np.asarray(ref["input_ids"], np.int32), NamedSharding(mesh, P()))
    forward = jax.jit(jlora.wrap(model.__call__))
    unmerged = np.asarray(forward(ids, params=lora_params).logits[0, -1])
    merged_params = jlora.merge(lora_params)  # keeps the base shardings
    merged = np.asarray(jax.jit(model.__call__)(ids, params=merged_params).logits[0, -1])
    peft = np.asarray(ref["peft_logits"])
    errors = {name: float(np.abs(got - peft).max() / np.abs(peft).max()) for name, got in
              [("unmerged", unmerged), ("merged", merged)]}
    print(f"relative difference to PEFT's logits: unmerged {errors['unmerged']:.1e}, merged {errors['merged']:.1e}")

    # Training: only the adapter moves; the batch is split over "data".
    def loss_fn(trainable, frozen, ids):
        logits = jlora.wrap(model.__call__)(ids, params=jlora.combine(trainable, frozen)).logits[:, :-1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    trainable, frozen = jlora.split(lora_params)
    tx = optax.adamw(1e-2)
    opt_state = tx.init(trainable)

    @jax.jit
    def step(trainable, opt_state, ids):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, ids)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    batch_sharding = NamedSharding(mesh, P("data", None))
    losses = []
    for i in range(args.steps):
        batch = jax.device_put(counting_batch(jax.random.key(i)), batch_sharding)
        trainable, opt_state, loss = step(trainable, opt_state, batch)
        losses.append(float(loss))
    print(f"training ({args.steps} steps, batch sharded over 'data'): loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    trained = jlora.combine(trainable, frozen)
    kept = all(a.sharding.is_equivalent_to(b.sharding, a.ndim) for a, b in
               zip(jax.tree_util.tree_leaves(trained), jax.tree_util.tree_leaves(lora_params)))
    print(f"every leaf kept its sharding through training: {kept}")

    out = jlora.save(trained, Path(tempfile.mkdtemp()) / "tiny-llama-lora-sharded")  # gathers leaf by leaf
    reloaded = jlora.load(params, out)
    same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
               zip(jax.tree_util.tree_leaves(trained), jax.tree_util.tree_leaves(reloaded)))
    print(f"saved to {out} and reloaded sharded: {'identical' if same else 'DIFFERENT'}")

    ok = max(errors.values()) < 1e-4 and losses[-1] < losses[0] and same and kept
    print("OK" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
