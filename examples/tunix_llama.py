"""A PEFT adapter on a google-tunix Llama 3 (layout ``"tunix"``): unmerged under jit, trained, saved.

The bundled tiny Llama (``assets/tiny-llama``) is written as a Hugging Face safetensors checkpoint, which tunix's
own converter (``tunix.models.llama3.params.create_model_from_safe_tensors``) turns into its NNX model. The bundled
PEFT adapter (``assets/tiny-llama-lora``, every linear layer) loads onto it with ``layout="tunix"`` and runs
unmerged through ``jlora.nnx_model`` (tunix's attention ``Einsum`` modules and ``nnx.Linear`` MLPs each add their
LoRA term beside the base call, no merged kernels). Then a few optax steps train the adapter alone on a toy
next-token task, and the result is saved in PEFT's format and loaded back. Checks: unmerged == merged, the loss
falls, the reloaded adapter gives the same logits.

(tunix's Llama 3 rotates with a RoPE base of 1e6 whatever the checkpoint says, so its logits are not this
checkpoint's transformers logits; tests/test_tunix.py compares against PEFT with a base-1e6 checkpoint.)

    pip install google-tunix==0.1.7   # with jax, flax, optax
    python examples/tunix_llama.py
"""
import json
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.serialization import msgpack_restore
from safetensors.numpy import save_file
from tunix.models.llama3 import model as llama3
from tunix.models.llama3 import params as llama3_params

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's jlora, installed or not
import jlora  # noqa: E402
from jlora.tree import adapted_modules  # noqa: E402

ASSETS = Path(__file__).resolve().parent / "assets"


def write_safetensors(flax_dir: Path, out_dir: Path) -> dict:
    """The bundled Flax Llama's params as a transformers safetensors checkpoint (kernels transposed to
    PyTorch's (out, in)); returns its config."""
    params = msgpack_restore((flax_dir / "flax_model.msgpack").read_bytes())
    tensors = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        keys = [str(k.key) for k in path]
        value = np.asarray(leaf).T if keys[-1] == "kernel" else np.asarray(leaf)
        tensors[".".join(keys[:-1] + ["weight"])] = np.ascontiguousarray(value)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    return json.loads((flax_dir / "config.json").read_text())


def tunix_config(hf: dict) -> llama3.ModelConfig:
    return llama3.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"], num_heads=hf["num_attention_heads"], head_dim=hf["head_dim"],
        num_kv_heads=hf["num_key_value_heads"], rope_theta=int(hf["rope_theta"]), norm_eps=hf["rms_norm_eps"],
        weight_tying=hf["tie_word_embeddings"])


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        hf = write_safetensors(ASSETS / "tiny-llama", Path(tmp) / "ckpt")
        model = llama3_params.create_model_from_safe_tensors(str(Path(tmp) / "ckpt"), tunix_config(hf))
    graphdef, state = nnx.split(model)
    lora_params = jlora.load(state, ASSETS / "tiny-llama-lora", layout="tunix")
    print(f"adapted modules: {len(adapted_modules(lora_params))}, "
          f"trainable parameters: {jlora.count_trainable(lora_params):,}")

    ids = (jnp.arange(16)[None] * 3 + jnp.arange(4)[:, None] * 7) % hf["vocab_size"]  # toy task: next = this + 3
    b, t = ids.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))

    def logits(lp):  # tunix's own forward, adapters unmerged
        return jlora.nnx_model(graphdef, lp)(ids, positions, None, mask)[0]

    forward = jax.jit(logits)
    unmerged = forward(lora_params)
    merged = nnx.merge(graphdef, jlora.merge(lora_params))(ids, positions, None, mask)[0]
    merge_err = float(jnp.max(jnp.abs(unmerged - merged)) / jnp.max(jnp.abs(merged)))

    trainable, frozen = jlora.split(lora_params)
    tx = optax.adam(2e-2)
    opt_state = tx.init(trainable)

    def loss_fn(trainable):
        out = logits(jlora.combine(trainable, frozen))[:, :-1]
        return optax.softmax_cross_entropy_with_integer_labels(out, ids[:, 1:]).mean()

    @jax.jit
    def step(trainable, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    losses = []
    for _ in range(40):
        trainable, opt_state, loss = step(trainable, opt_state)
        losses.append(float(loss))
    trained = jlora.combine(trainable, frozen)
    with tempfile.TemporaryDirectory() as tmp:
        out = jlora.save(trained, Path(tmp) / "adapter")  # PEFT's files: adapter_config.json + safetensors
        reloaded = jlora.load(state, out, layout="tunix")
    reload_err = float(jnp.max(jnp.abs(forward(trained) - forward(reloaded))))

    print(f"unmerged vs merged: relative difference {merge_err:.1e}")
    print(f"loss: {losses[0]:.3f} -> {losses[-1]:.3f} (40 adam steps, adapter only)")
    print(f"saved and reloaded: max logit difference {reload_err:.1e}")
    # (the tiny random head's small weights bound the logits: the loss cannot fall far below ~3.5)
    ok = merge_err < 1e-5 and losses[-1] < losses[0] - 0.5 and reload_err < 1e-6 and np.isfinite(losses).all()
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
