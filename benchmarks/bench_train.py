"""Benchmark 3 (issue 3): one LoRA train step vs one full fine-tuning step on the inference model
(FlaxLlama hidden 512, 4 layers, float32), batch 4 x 256 tokens, next-token cross-entropy, optax AdamW.

- LoRA step: ``jlora.split`` + ``jax.value_and_grad`` on the trainable half + adamw on it (the frozen half
  is an argument, not a constant).
- Full step: ``jax.value_and_grad`` on every parameter + adamw on all of them.
Both jitted with the parameters and optimizer state donated. Memory from
``jax.jit(step).lower(...).compile().memory_analysis()``; "full-size gradient buffers" are looked for in
the lowered step: every ``dot_general`` whose result has the shape of a base kernel is a weight gradient.
The same two steps in torch: PEFT LoRA (``is_trainable=True``) and a full fine-tuning step, torch.optim.AdamW.
"""
from __future__ import annotations

import copy
import re
import tempfile
from functools import partial
from pathlib import Path

from bench_infer import CPU_MODEL, build
from common import check, fmt_bytes, fmt_ratio, fmt_time, interleaved, median_s, paired_ratio, table

_DOT = re.compile(r"stablehlo\.dot_general .*?contracting_dims = \[([0-9, ]*)\] x \[([0-9, ]*)\].*?"
                  r": \(tensor<([0-9x]+)x(?:f32|bf16|f16)>, tensor<([0-9x]+)x(?:f32|bf16|f16)>\) -> "
                  r"tensor<([0-9x]+)x(?:f32|bf16|f16)>")


def kernel_shaped_dots(lowered_text: str, kernel_shapes: set[tuple[int, ...]], n_tokens: int) -> int:
    """Number of weight-gradient ``dot_general`` ops in a lowered (StableHLO) module: the result has a base
    kernel's shape (or its transpose), the contraction runs over the ``n_tokens`` tokens, and neither operand
    is kernel-shaped (an activation gradient through a kernel has the kernel as an operand)."""
    shapes = kernel_shapes | {s[::-1] for s in kernel_shapes}  # a weight gradient may come out transposed
    dims = lambda text: tuple(int(d) for d in text.split("x"))  # noqa: E731
    n = 0
    for m in _DOT.finditer(lowered_text):
        lhs_contract = [int(d) for d in m.group(1).replace(" ", "").split(",") if d]
        lhs, rhs, out = dims(m.group(3)), dims(m.group(4)), dims(m.group(5))
        contracted = 1
        for d in lhs_contract:
            contracted *= lhs[d]
        if out in shapes and contracted == n_tokens and lhs not in shapes and rhs not in shapes:
            n += 1
    return n


def memory(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
    out["argument + output - alias + temp"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    out["XLA peak_memory_in_bytes"] = int(getattr(m, "peak_memory_in_bytes", 0))
    return out


def run(quick: bool = False) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import peft
    import torch

    import jlora

    batch, T = 4, 256
    rounds, torch_rounds = (3, 1) if quick else (21, 5)  # torch steps are slow here: fewer rounds
    tmp = Path(tempfile.mkdtemp(prefix="jlora-bench-train-"))
    cfg, tbase, _, fm, _, adapter = build(tmp, CPU_MODEL, 16)
    params = fm.params
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, T)), jnp.int32)

    def xent(logits, ids):
        logits = logits[:, :-1].astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    fwd = jlora.wrap(lambda i, p: fm(i, params=p).logits)
    plain = lambda i, p: fm(i, params=p).logits  # noqa: E731

    def lora_loss(trainable, frozen, ids):
        return xent(fwd(ids, jlora.combine(trainable, frozen)), ids)

    def full_loss(p, ids):
        return xent(plain(ids, p), ids)

    tx = optax.adamw(1e-4)

    @partial(jax.jit, donate_argnums=(0, 1))
    def lora_step(trainable, opt_state, frozen, ids):
        loss, grads = jax.value_and_grad(lora_loss)(trainable, frozen, ids)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    @partial(jax.jit, donate_argnums=(0, 1))
    def full_step(p, opt_state, ids):
        loss, grads = jax.value_and_grad(full_loss)(p, ids)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    copy_tree = lambda t: jax.tree_util.tree_map(lambda x: None if x is None else jnp.array(x, copy=True), t)  # noqa: E731
    lp = jlora.load(params, adapter)
    trainable, frozen = jlora.split(lp)
    trainable = copy_tree(trainable)
    state = {"lora": (trainable, tx.init(trainable)), "full": (copy_tree(params), None)}
    state["full"] = (state["full"][0], tx.init(state["full"][0]))

    kernel_shapes = {tuple(x.shape) for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
                     if getattr(path[-1], "key", None) == "kernel"}  # Dense kernels (not the embedding)
    lowered_lora = lora_step.lower(*state["lora"], frozen, ids)
    lowered_full = full_step.lower(*state["full"], ids)
    exe = {"lora": lowered_lora.compile(), "full": lowered_full.compile()}  # compiled once, timed below
    mem = {k: memory(v) for k, v in exe.items()}
    dw = {"lora": kernel_shaped_dots(lowered_lora.as_text(), kernel_shapes, batch * T),
          "full": kernel_shaped_dots(lowered_full.as_text(), kernel_shapes, batch * T)}
    n_train = jlora.count_trainable(lp)
    n_all = sum(int(x.size) for x in jax.tree_util.tree_leaves(params))

    def jax_lora():
        t, o, loss = exe["lora"](*state["lora"], frozen, ids)
        state["lora"] = (t, o)
        return loss.block_until_ready()

    def jax_full():
        p, o, loss = exe["full"](*state["full"], ids)
        state["full"] = (p, o)
        return loss.block_until_ready()

    # torch: PEFT LoRA and full fine-tuning, same weights and batch
    tids = torch.as_tensor(np.array(ids)).long()
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(tbase), adapter, is_trainable=True).train()
    opt_lora = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
    tfull = copy.deepcopy(tbase).train()
    opt_full = torch.optim.AdamW(tfull.parameters(), lr=1e-4)

    def torch_step(model, opt):
        def go():
            opt.zero_grad(set_to_none=True)
            loss = model(input_ids=tids, labels=tids).loss
            loss.backward()
            opt.step()
            return float(loss.detach())
        return go

    # same loss at step 0 (a check that both sides train the same thing)
    loss_jax = float(jax.jit(lora_loss)(trainable, frozen, ids))
    with torch.no_grad():
        loss_peft = float(pm(input_ids=tids, labels=tids).loss)

    samples = interleaved({"jax LoRA step": jax_lora, "jax full step": jax_full}, rounds=rounds, warmup=2, inner=1)
    samples.update(interleaved({"PEFT LoRA step": torch_step(pm, opt_lora), "torch full step": torch_step(tfull, opt_full)},
                               rounds=torch_rounds, warmup=1, inner=1))
    med = median_s(samples)
    r_jax = paired_ratio(samples, "jax LoRA step", "jax full step")
    r_torch = paired_ratio(samples, "PEFT LoRA step", "torch full step")
    t_time = check(r_jax["median"], 0.75)
    no_dw = dw["lora"] == 0
    t_mem = {"met": no_dw, "text": "met" if no_dw else f"MISSED: {dw['lora']} kernel-shaped gradient dots"}

    mrows = [[k, fmt_bytes(mem["lora"][k]), fmt_bytes(mem["full"][k]), f"{mem['lora'][k] / max(mem['full'][k], 1):.3f}"]
             for k in ("argument", "output", "alias", "temp", "argument + output - alias + temp", "XLA peak_memory_in_bytes")]
    mrows.append(["weight-gradient dots (result shaped like a Dense kernel or its transpose, contracting over the tokens, no kernel operand)", str(dw["lora"]), str(dw["full"]), "-"])
    md = [
        f"Model: the inference model (FlaxLlama hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
        f"float32, vocab {cfg.vocab_size}), adapter r=16 on all linear layers ({n_train:,} trainable of "
        f"{n_all:,} parameters), batch {batch} x {T} tokens, next-token cross-entropy, AdamW. {rounds} interleaved "
        f"rounds for JAX, {torch_rounds} for torch (separate phases; torch's numbers are the noisier).",
        "",
        table(["step", "median time", "LoRA / full (paired)"], [
            ["jax LoRA step (jlora.split + grad on trainable + adamw)", fmt_time(med["jax LoRA step"]), fmt_ratio(r_jax)],
            ["jax full fine-tuning step", fmt_time(med["jax full step"]), "1"],
            ["PEFT LoRA step (torch)", fmt_time(med["PEFT LoRA step"]), fmt_ratio(r_torch)],
            ["torch full fine-tuning step", fmt_time(med["torch full step"]), "1"],
        ]),
        "",
        f"JAX vs torch (different phases, ratio of medians): LoRA step {med['jax LoRA step'] / med['PEFT LoRA step']:.2f}, "
        f"full step {med['jax full step'] / med['torch full step']:.2f}. Loss at step 0: jlora {loss_jax:.6f}, "
        f"PEFT {loss_peft:.6f}.",
        "",
        "Compiled memory (`memory_analysis()` of the jitted step; arguments include the frozen base for LoRA; "
        "alias = donated parameters/optimizer state reused for the outputs; the CPU backend's own "
        "`peak_memory_in_bytes` leaves out most of the temp buffers, so the sum is the better peak estimate):",
        "",
        table(["", "LoRA step", "full step", "LoRA / full"], mrows),
        "",
        table(["target (issue 3)", "measured", "result"], [
            ["LoRA step <= 0.75x full step time", f"{fmt_ratio(r_jax)}", t_time["text"]],
            ["no full-size gradient buffers", f"{dw['lora']} weight-gradient dots (full step: {dw['full']}); "
             f"outputs {fmt_bytes(mem['lora']['output'])} vs {fmt_bytes(mem['full']['output'])}", t_mem["text"]],
        ]),
    ]
    return {"title": "3. Training step (CPU, issue 3)", "markdown": "\n".join(md),
            "targets": {"train_time": t_time, "train_no_full_grads": t_mem},
            "data": {"samples": samples, "median_s": med, "memory": mem, "weight_grad_dots": dw,
                     "loss_jax": loss_jax, "loss_peft": loss_peft, "trainable": n_train, "total": n_all}}


if __name__ == "__main__":
    import sys
    print(run(quick="--quick" in sys.argv)["markdown"])
