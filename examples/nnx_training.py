"""NNX: a fresh LoRA adapter on a Flax NNX model, trained unmerged with ``jlora.nnx_model``, saved in
PEFT's format and loaded back.

The model is a small NNX MLP whose modules are named like a PyTorch model's (``layers.0.up``, ...), so
a two-rule ``jlora.Layout`` places PEFT's module names on it. Only the adapter trains (optax on the
``jlora.split`` trainable half); the saved adapter, loaded again, gives the same outputs, and so does
the merged model.

    python examples/nnx_training.py
"""
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's jlora, installed or not
import jlora  # noqa: E402

LAYOUT = jlora.Layout([
    jlora.Rule(r"layers\.(?P<layer>\d+)\.(?P<m>up|down)", "layers/{layer}/{m}/kernel", "o i -> i o"),
], name="nnx-mlp")


class Block(nnx.Module):
    def __init__(self, d: int, f: int, *, rngs: nnx.Rngs):
        self.up = nnx.Linear(d, f, rngs=rngs)
        self.down = nnx.Linear(f, d, rngs=rngs)

    def __call__(self, x):
        return x + self.down(nnx.gelu(self.up(x)))


class Mlp(nnx.Module):
    def __init__(self, d: int = 16, f: int = 64, n_layers: int = 2, *, rngs: nnx.Rngs):
        self.layers = nnx.List([Block(d, f, rngs=rngs) for _ in range(n_layers)])

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def main() -> int:
    graphdef, state = nnx.split(Mlp(rngs=nnx.Rngs(0)))
    names = [f"layers.{i}.{m}" for i in range(2) for m in ("up", "down")]  # PEFT's module names
    config = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"])
    lora_params = jlora.init(state, config, key=jax.random.key(1), layout=LAYOUT, module_names=names)
    print(f"trainable parameters: {jlora.count_trainable(lora_params):,}")

    # a task the base model does not solve: a fixed random rotation of its input
    key_x, key_q = jax.random.split(jax.random.key(2))
    x = jax.random.normal(key_x, (256, 16))
    target = x @ jnp.linalg.qr(jax.random.normal(key_q, (16, 16)))[0]

    trainable, frozen = jlora.split(lora_params)
    tx = optax.adam(3e-2)
    opt_state = tx.init(trainable)

    def loss_fn(trainable, x, target):
        model = jlora.nnx_model(graphdef, jlora.combine(trainable, frozen))  # adapters run unmerged
        return jnp.mean((model(x) - target) ** 2)

    @jax.jit
    def step(trainable, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, x, target)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    losses = []
    for _ in range(150):
        trainable, opt_state, loss = step(trainable, opt_state)
        losses.append(float(loss))
    print(f"loss: {losses[0]:.4f} -> {losses[-1]:.4f}")
    trained = jlora.combine(trainable, frozen)

    with tempfile.TemporaryDirectory() as tmp:
        out = jlora.save(trained, Path(tmp) / "nnx-adapter")  # PEFT's files
        reloaded = jlora.load(state, out, layout=LAYOUT)
        forward = jax.jit(lambda lp, x: jlora.nnx_model(graphdef, lp)(x))
        got, again = forward(trained, x), forward(reloaded, x)
    merged = nnx.merge(graphdef, jlora.merge(trained))(x)  # the adapter folded into plain NNX kernels
    reload_err = float(jnp.max(jnp.abs(got - again)))
    merge_err = float(jnp.max(jnp.abs(got - merged)))
    print(f"saved and reloaded: max difference {reload_err:.1e}; merged model: {merge_err:.1e}")
    ok = losses[-1] < 0.5 * losses[0] and reload_err < 1e-6 and merge_err < 1e-4 and np.isfinite(losses).all()
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
