"""An NNX model as an object: ``jlora.load(model, adapter)`` gives a new module that runs the adapter.

The bundled tiny Llama, converted by google-tunix's own loader into its NNX ``Llama3`` (as in ``tunix_llama.py``),
gets the bundled PEFT adapter with ``jlora.load(model, "assets/tiny-llama-lora")``. The result is a new module,
called exactly like the original, whose LoRA runs beside each projection (unmerged); its adapter factors are
``nnx.LoRAParam`` variables, so ``nnx.Optimizer(lora_model, tx, wrt=nnx.LoRAParam)`` trains them alone. The
original module is left as it was (its arrays shared, not copied). Then ``jlora.save(lora_model, dir)`` writes
PEFT's files and ``jlora.merge(lora_model)`` gives a plain ``Llama3`` with merged kernels. Checks: the base model
unchanged, the loss falls, base kernels never move, merged == unmerged, the saved adapter reloads to the same logits.

    pip install google-tunix==0.1.7   # with jax, flax, optax
    python examples/nnx_module.py
"""
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tunix.models.llama3 import params as llama3_params

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's jlora, installed or not
from tunix_llama import ASSETS, tunix_config, write_safetensors  # noqa: E402

import jlora  # noqa: E402


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        hf = write_safetensors(ASSETS / "tiny-llama", Path(tmp) / "ckpt")
        model = llama3_params.create_model_from_safe_tensors(str(Path(tmp) / "ckpt"), tunix_config(hf))
    base_before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))

    lora_model = jlora.load(model, ASSETS / "tiny-llama-lora")  # a new Llama3; `model` is untouched
    print(f"{type(lora_model).__name__}: LoRA parameters "
          f"{sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(lora_model, nnx.LoRAParam))):,}")

    ids = (jnp.arange(16)[None] * 3 + jnp.arange(4)[:, None] * 7) % hf["vocab_size"]  # toy task: next = this + 3
    b, t = ids.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    kernel_before = np.asarray(lora_model.layers[0].attn.q_proj.w[...])

    optimizer = nnx.Optimizer(lora_model, optax.adam(2e-2), wrt=nnx.LoRAParam)  # the adapter alone

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(model):
            logits = model(ids, positions, None, mask)[0][:, :-1]  # called exactly as tunix's Llama3
            return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(lora_model, optimizer)) for _ in range(40)]
    logits = np.asarray(lora_model(ids, positions, None, mask)[0])

    merged = jlora.merge(lora_model)  # a plain Llama3, kernels merged
    merge_err = float(np.max(np.abs(np.asarray(merged(ids, positions, None, mask)[0]) - logits)) / np.abs(logits).max())
    with tempfile.TemporaryDirectory() as tmp:
        out = jlora.save(lora_model, Path(tmp) / "adapter")  # PEFT's adapter_config.json + safetensors
        reloaded = jlora.load(model, out)
    reload_err = float(np.max(np.abs(np.asarray(reloaded(ids, positions, None, mask)[0]) - logits)))

    unchanged = all(np.array_equal(a, np.asarray(b)) for a, b in zip(
        jax.tree_util.tree_leaves(base_before), jax.tree_util.tree_leaves(nnx.to_pure_dict(nnx.state(model)))))
    kernel_kept = np.array_equal(kernel_before, np.asarray(lora_model.layers[0].attn.q_proj.w[...]))
    print(f"loss: {losses[0]:.3f} -> {losses[-1]:.3f} (40 adam steps, nnx.Optimizer wrt=nnx.LoRAParam)")
    print(f"base kernels unchanged by training: {kernel_kept}; caller's model unchanged: {unchanged}")
    print(f"merged vs unmerged: relative difference {merge_err:.1e}")
    print(f"saved and reloaded: max logit difference {reload_err:.1e}")
    ok = (unchanged and kernel_kept and losses[-1] < losses[0] - 0.5 and merge_err < 1e-5 and reload_err < 1e-5
          and type(merged) is type(model) and np.isfinite(losses).all())
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
