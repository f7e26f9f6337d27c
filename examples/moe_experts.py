"""LoRA on a mixture of experts' stacked expert weights (PEFT's ``target_parameters``), in JAX.

Builds a tiny transformers GptOss in PyTorch and a PEFT adapter on its experts' ``gate_up_proj`` and
``down_proj`` parameters, then, in JAX: loads the adapter onto a Flax port of the experts (placed by a
``jlora.Rule``: the expert index is the rule's ``layer`` group), runs it under ``jax.jit(jlora.wrap(...))``
and checks it against PEFT, trains it a few AdamW steps, saves it, and checks that PEFT loads the trained
adapter and computes what jlora computes. Needs torch, transformers 4.x and peft (the test extras).

    python examples/moe_experts.py
"""
import copy
import sys
import tempfile
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import torch
from transformers import GptOssConfig, GptOssForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's jlora, installed or not
import jlora  # noqa: E402

EXPERTS, HIDDEN, INTER, LAYERS = 4, 32, 24, 2


class Experts(nn.Module):
    """GptOss' experts (every expert on every token, weighted by the routing scores), weights as PyTorch has them."""

    @nn.compact
    def __call__(self, x, routing):
        zeros = nn.initializers.zeros
        gate_up, down = (self.param("gate_up_proj", zeros, (EXPERTS, HIDDEN, 2 * INTER)),
                         self.param("down_proj", zeros, (EXPERTS, INTER, HIDDEN)))
        h = jnp.einsum("td,edf->etf", x, gate_up)
        h = h + self.param("gate_up_proj_bias", zeros, (EXPERTS, 2 * INTER))[:, None]
        gate, up = jnp.minimum(h[..., ::2], 7.0), jnp.clip(h[..., 1::2], -7.0, 7.0)
        out = jnp.einsum("etf,efd->etd", (up + 1) * gate * jax.nn.sigmoid(gate * 1.702), down)
        out = out + self.param("down_proj_bias", zeros, (EXPERTS, HIDDEN))[:, None]
        return jnp.einsum("etd,te->td", out, routing)


class Stack(nn.Module):
    @nn.compact
    def __call__(self, x, routing):
        for i in range(LAYERS):
            x = Experts(name=str(i))(x, routing[i])
        return x


def torch_stack(model, x, scores, idx):
    h = torch.as_tensor(x)[None]
    for i, layer in enumerate(model.base_model.model.model.layers):
        h = layer.mlp.experts(h, router_indices=idx[i], routing_weights=scores[i])
    return h[0].detach().numpy()


def main() -> int:
    torch.manual_seed(0)
    base = GptOssForCausalLM(GptOssConfig(
        vocab_size=64, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=EXPERTS, num_experts_per_tok=2, rope_scaling=None)).eval()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=[], init_lora_weights=False,
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    pm = peft.get_peft_model(copy.deepcopy(base), config).eval()
    work = Path(tempfile.mkdtemp())
    pm.save_pretrained(work / "adapter")

    # the experts' weights in the Flax tree: {"0": {"gate_up_proj": ..., ...}, "1": ...}
    state = {k: v.detach().numpy() for k, v in base.state_dict().items()}
    params = {str(i): {k.rpartition(".")[2]: jnp.asarray(v) for k, v in state.items()
                       if k.startswith(f"model.layers.{i}.mlp.experts.")} for i in range(LAYERS)}
    layout = jlora.Layout([jlora.Rule(r"model\.layers\.(?P<l>\d+)\.mlp\.experts\.(?P<p>\w+)\.(?P<layer>\d+)",
                                      "{l}/{p}", "o i -> layer o i")])  # PEFT reads GptOss 4.x experts (E, out, in)
    lp = jlora.load(params, work / "adapter", layout=layout)
    print("gate_up_proj of layer 0:", lp["0"]["gate_up_proj"])

    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, HIDDEN)).astype(np.float32)
    logits = torch.as_tensor(rng.standard_normal((LAYERS, 8, EXPERTS)).astype(np.float32))
    top, idx = torch.topk(logits, 2, dim=-1)
    scores = torch.zeros_like(logits).scatter_(2, idx, torch.softmax(top, dim=-1))
    routing = jnp.asarray(scores.numpy())
    forward = jax.jit(jlora.wrap(Stack().apply))  # the adapted parameters are merged inside the call, as in PEFT
    with torch.no_grad():
        want = torch_stack(pm, x, scores, idx)
    err = float(np.abs(forward({"params": lp}, x, routing) - want).max() / np.abs(want).max())
    print(f"jlora vs PEFT, max relative error: {err:.1e}")

    # a few training steps: only the LoRA factors move
    target = jnp.asarray(rng.standard_normal((8, HIDDEN)), jnp.float32)
    trainable, frozen = jlora.split(lp)
    loss = lambda t: jnp.mean((forward({"params": jlora.combine(t, frozen)}, x, routing) - target) ** 2)  # noqa: E731
    opt = optax.adamw(1e-2)
    opt_state = opt.init(trainable)
    losses = []
    for _ in range(20):
        value, grads = jax.value_and_grad(loss)(trainable)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        trainable, losses = optax.apply_updates(trainable, updates), losses + [float(value)]
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")

    trained = jlora.combine(trainable, frozen)
    jlora.save(trained, work / "trained")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), work / "trained").eval()
    with torch.no_grad():
        peft_out = torch_stack(again, x, scores, idx)
    ours = np.asarray(forward({"params": trained}, x, routing))
    saved_err = float(np.abs(ours - peft_out).max() / np.abs(peft_out).max())
    print(f"trained adapter in PEFT vs jlora, max relative error: {saved_err:.1e}")
    ok = err < 1e-5 and losses[-1] < 0.5 * losses[0] and saved_err < 1e-5
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
