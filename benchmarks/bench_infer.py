"""Benchmark 2: unmerged inference. transformers' FlaxLlamaForCausalLM (hidden 512, 4 layers, intermediate
1376, 8 heads, vocab 1024, float32 on CPU), a PEFT adapter r=16 on all linear layers (PEFT's
"all-linear": q, k, v, o, gate, up, down; not lm_head), batch 1, T tokens, one full forward (no KV cache).

Variants, all jitted with the parameters as arguments: base, ``jlora.wrap`` (unmerged), ``jlora.merge``d;
torch base and PEFT unmerged (``PeftModel.from_pretrained``) on the same weights. "body" variants run the
decoder stack without the lm_head (FlaxLlamaModel / LlamaModel), to show the adapter's cost where it is
not diluted by the un-adapted output projection (vocab 1024 here; a real 32k vocab would dilute more).
"""
from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

from common import aa_noise, check, fmt_ratio, fmt_time, interleaved, median_s, paired_ratio, table

CPU_MODEL = dict(hidden_size=512, num_hidden_layers=4, intermediate_size=1376, num_attention_heads=8,
                 num_key_value_heads=8, vocab_size=1024, max_position_embeddings=2048)
# for a lent GPU (issue 5, part 3): bf16, hidden 4096 (not run on CPU)
GPU_MODEL = dict(hidden_size=4096, num_hidden_layers=8, intermediate_size=11008, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)


def build(tmp: Path, model_kwargs: dict, r: int, *, seed: int = 0, flax_dtype=None):
    """torch base, PEFT model (unmerged, eval), Flax twin, adapter folder."""
    import jax.numpy as jnp
    import peft
    import torch
    from transformers import FlaxLlamaForCausalLM, FlaxLlamaModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(tie_word_embeddings=False, **model_kwargs)
    base = LlamaForCausalLM(cfg).eval()
    base.save_pretrained(tmp / "base", safe_serialization=True)
    flax_model = FlaxLlamaForCausalLM.from_pretrained(tmp / "base", from_pt=True, dtype=flax_dtype or jnp.float32)
    body = FlaxLlamaModel(flax_model.config, _do_init=False, dtype=flax_dtype or jnp.float32)
    lcfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False)
    work = peft.get_peft_model(copy.deepcopy(base), lcfg)  # init_lora_weights=False: A and B both random
    work.save_pretrained(tmp / "adapter")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp / "adapter").eval()
    return cfg, base, pm, flax_model, body, tmp / "adapter"


def cost(compiled) -> dict:
    c = compiled.cost_analysis()
    c = c[0] if isinstance(c, list) else c
    return {"flops": float(c.get("flops", 0.0)), "bytes": float(c.get("bytes accessed", 0.0))}


def swap_check(flax_model, params, adapter: Path, tmp: Path, ids) -> list[list[str]]:
    """Compile counts of one jitted wrapped forward across adapter swaps (issue 5's hot-swap target)."""
    import jax
    import peft

    import jlora

    fwd = jax.jit(jlora.wrap(lambda i, p: flax_model(i, params=p).logits))
    rows = []

    def variant(name: str, edit=None, reseed: int | None = None, rank: int | None = None, **load_kwargs):
        import numpy as np
        from safetensors.numpy import load_file, save_file

        folder = tmp / f"swap-{len(rows)}"
        shutil.copytree(adapter, folder)
        if reseed is not None:  # same config, new random values
            rng = np.random.default_rng(reseed)
            t = load_file(folder / "adapter_model.safetensors")
            save_file({k: rng.standard_normal(v.shape).astype(v.dtype) * 0.02 for k, v in t.items()},
                      folder / "adapter_model.safetensors")
        if rank is not None:  # a lower-rank adapter: the first `rank` rows of A, columns of B
            t = load_file(folder / "adapter_model.safetensors")
            save_file({k: np.ascontiguousarray(v[:rank] if ".lora_A." in k else v[:, :rank]) for k, v in t.items()},
                      folder / "adapter_model.safetensors")
            edit = lambda c: c.update(r=rank, lora_alpha=2 * rank)  # noqa: E731
        if edit is not None:
            cfg_path = folder / "adapter_config.json"
            cfg = json.loads(cfg_path.read_text())
            edit(cfg)
            cfg_path.write_text(json.dumps(cfg))
        before = fwd._cache_size()
        jax.block_until_ready(fwd(ids, jlora.load(params, folder, **load_kwargs)))
        rows.append([name, str(fwd._cache_size() - before)])

    variant("first adapter (compiles once)")
    variant("same config, new tensor values", reseed=1)
    variant("same shapes, only `base_model_name_or_path` / `revision` differ in adapter_config.json",
            edit=lambda c: c.update(base_model_name_or_path="someone/other-base", revision="v2"))
    variant("same shapes, different `lora_alpha` (scale)", edit=lambda c: c.update(lora_alpha=c["lora_alpha"] * 2))
    r = json.loads((adapter / "adapter_config.json").read_text())["r"]
    variant(f"rank {r // 2} adapter loaded with `pad_rank={r}`", rank=r // 2, pad_rank=r)
    del peft
    return rows


def run(quick: bool = False, *, model_kwargs: dict | None = None, r: int = 16, flax_dtype=None) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    import jlora

    model_kwargs = model_kwargs or CPU_MODEL
    tmp = Path(tempfile.mkdtemp(prefix="jlora-bench-infer-"))
    cfg, tbase, pm, fm, body, adapter = build(tmp, model_kwargs, r, flax_dtype=flax_dtype)
    params = fm.params
    lp = jlora.load(params, adapter)
    merged = jlora.merge(lp)
    jax.block_until_ready(merged)
    body_params, body_lp = params["model"], lp["model"]

    logits = lambda ids, p: fm(ids, params=p).logits  # noqa: E731
    hidden = lambda ids, p: body(ids, params=p).last_hidden_state  # noqa: E731
    f_base, f_wrap = jax.jit(logits), jax.jit(jlora.wrap(logits))
    b_base, b_wrap = jax.jit(hidden), jax.jit(jlora.wrap(hidden))
    t_body, p_body = tbase.model, pm.base_model.model.model

    # correctness on the same weights: jlora (wrap and merge) vs PEFT, and PEFT's overhead is real
    ids16 = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 16)).astype(np.int32)
    with torch.inference_mode():
        want = pm(torch.as_tensor(ids16).long()).logits.float().numpy()
    rel = lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))  # noqa: E731
    err_wrap = rel(f_wrap(jnp.asarray(ids16), lp), want)
    err_merged = rel(f_base(jnp.asarray(ids16), merged), want)

    plan = [(1, 9, 0.03), (256, 5, 0.1)] if quick else [(1, 31, 0.02), (16, 31, 0.02), (256, 17, 0.05), (2048, 9, 0.0)]
    results = {}
    for T, rounds, min_sample in plan:
        ids = jnp.asarray(np.random.default_rng(T).integers(0, cfg.vocab_size, (1, T)), jnp.int32)
        tids = torch.as_tensor(np.array(ids)).long()

        def tcall(m):
            def go():
                with torch.inference_mode():
                    out = m(tids)
                return out[0]
            return go

        # each function compiled once, ahead of time; the merged tree runs the base executable itself
        body_too = T <= 256  # at T=2048 the lm_head is ~1% of the work: body == full, skipped to save time
        exe = {"base": f_base.lower(ids, params).compile(), "wrap": f_wrap.lower(ids, lp).compile()}
        if body_too:
            exe["body base"] = b_base.lower(ids, body_params).compile()
            exe["body wrap"] = b_wrap.lower(ids, body_lp).compile()
        jax_fns = {
            "base": lambda: exe["base"](ids, params).block_until_ready(),
            "wrap": lambda: exe["wrap"](ids, lp).block_until_ready(),
            "merged": lambda: exe["base"](ids, merged).block_until_ready(),
        }
        torch_fns = {"torch base": tcall(tbase), "PEFT": tcall(pm)}
        if body_too:
            jax_fns["body base"] = lambda: exe["body base"](ids, body_params).block_until_ready()
            jax_fns["body wrap"] = lambda: exe["body wrap"](ids, body_lp).block_until_ready()
            torch_fns["torch body"] = tcall(t_body)
            torch_fns["PEFT body"] = tcall(p_body)
        # JAX and torch timed in separate phases: their worker threads spin after each call and would
        # steal the cores from the other framework's next call
        samples = interleaved(jax_fns, rounds=rounds, warmup=1 if T >= 2048 else 2, min_sample_s=min_sample, seed=T)
        samples.update(interleaved(torch_fns, rounds=max(3, rounds // 2 + 1) if T >= 256 else rounds,
                                   warmup=1 if T >= 256 else 2, min_sample_s=min_sample, seed=T))
        floors = {}
        for name in ("full", "body") if body_too else ("full",):
            prefix = "" if name == "full" else "body "
            cb, cw = cost(exe[prefix + "base"]), cost(exe[prefix + "wrap"])
            floors[name] = {"flops": cw["flops"] / cb["flops"], "bytes": cw["bytes"] / cb["bytes"]}
        has_body = "body base" in samples
        results[T] = {
            "samples": samples, "median_s": median_s(samples), "floors": floors,
            "wrap/base": paired_ratio(samples, "wrap", "base"),
            "merged/base": paired_ratio(samples, "merged", "base"),
            "body wrap/base": paired_ratio(samples, "body wrap", "body base") if has_body else None,
            "peft/torch": paired_ratio(samples, "PEFT", "torch base"),
            "peft body/torch body": paired_ratio(samples, "PEFT body", "torch body") if has_body else None,
        }
        print(f"  T={T}: wrap/base {fmt_ratio(results[T]['wrap/base'])}, merged/base "
              f"{fmt_ratio(results[T]['merged/base'])}, peft/torch {fmt_ratio(results[T]['peft/torch'])}", flush=True)

    swap_rows = swap_check(fm, params, adapter, tmp, jnp.asarray(ids16))
    recompiles = sum(int(n) for _, n in swap_rows[1:])
    targets, ratio_rows, time_rows = {}, [], []
    targets["hot_swap"] = {"met": recompiles == 0, "conclusive": True, "value": recompiles, "limit": 0, "kind": "<=",
                           "text": "met (0 recompilations)" if recompiles == 0 else f"MISSED: {recompiles} recompilations"}
    for T, res in results.items():
        noise = aa_noise(res["merged/base"])
        tw = check(res["wrap/base"]["median"], 1.10 if T == 1 else 1.05, noise=noise) if T == 1 or T >= 256 else None
        tm = check(res["merged/base"]["median"], 1.02, noise=noise)
        if tw:
            targets[f"wrap_T{T}"] = tw
        targets[f"merged_T{T}"] = tm
        fl = res["floors"]
        ratio_rows.append([
            T, fmt_ratio(res["wrap/base"]), f"<= {1.10 if T == 1 else 1.05:.2f}: {tw['text']}" if tw else "(no target)",
            f"{fl['full']['flops']:.3f} / {fl['full']['bytes']:.3f}",
            fmt_ratio(res["merged/base"]), f"<= 1.02: {tm['text']}",
            fmt_ratio(res["body wrap/base"]) if res["body wrap/base"] else "-",
            f"{fl['body']['flops']:.3f} / {fl['body']['bytes']:.3f}" if "body" in fl else "-",
            fmt_ratio(res["peft/torch"]), fmt_ratio(res["peft body/torch body"]) if res["peft body/torch body"] else "-",
        ])
        m = res["median_s"]
        time_rows.append([T] + [fmt_time(m[k]) if k in m else "-" for k in (
            "base", "wrap", "merged", "body base", "body wrap", "torch base", "PEFT", "torch body", "PEFT body")]
                         + [f"{m['base'] / m['torch base']:.2f}"])

    md = [
        f"Model: transformers FlaxLlamaForCausalLM, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
        f"intermediate {cfg.intermediate_size}, {cfg.num_attention_heads} heads, vocab {cfg.vocab_size}, float32; "
        f"adapter r={r}, lora_alpha={2 * r}, PEFT `all-linear` (7 projections per layer, lm_head not adapted); batch 1, "
        "one full forward of T tokens (no KV cache). All JAX variants are `jax.jit` with the parameters as "
        "arguments; torch variants under `torch.inference_mode()` (torch's default threads). Ratios: median of "
        "per-round paired ratios [interquartile range] (ratio of the fastest samples), variants interleaved in "
        "shuffled order each round; JAX and torch variants in separate phases (their thread pools spin after "
        "a call and slow the other framework), so the JAX/torch column compares different phases.",
        "",
        table(["T", "wrap / base", "target", "cost-model floor flops / bytes", "merged / base (A/A control)", "target",
               "body wrap / body base (no lm_head)", "body floor flops / bytes", "PEFT / torch base",
               "PEFT body / torch body"], ratio_rows),
        "",
        "- *cost-model floor*: XLA's `cost_analysis()` flops and bytes accessed of the compiled wrapped forward "
        "divided by the base forward's: the ratio a perfect implementation of the same math would approach if "
        "time followed flops (large T) or bytes (small T). At hidden 512 and r=16 the LoRA side path is "
        f"r*(1/d_in+1/d_out) = {100 * r * 2 / cfg.hidden_size:.1f}% extra flops on the attention projections.",
        "- *merged / base* runs the very same compiled executable as base (same shapes), only with the merged "
        "values: its distance from 1.000 is this machine's measurement noise, and merged models run at exactly the "
        "base model's speed by construction.",
        "Verdicts closer to the limit than the A/A noise (its bias from 1 or half its interquartile range) are "
        "marked not conclusive.",
        "- PEFT/torch ratios use fewer rounds at T >= 256 (torch is slow here); they are the noisiest numbers.",
        "- body = decoder layers + final norm (FlaxLlamaModel / LlamaModel): no lm_head; the embedding lookup is "
        "a gather and costs next to nothing. Not run at T=2048, where the lm_head is ~1% of the work.",
        f"- Check on the same weights (T=16): jlora wrap vs PEFT logits max rel err {err_wrap:.1e}, jlora merged vs "
        f"PEFT {err_merged:.1e}.",
        "",
        "Median times per forward:",
        "",
        table(["T", "base", "wrap", "merged", "body base", "body wrap", "torch base", "PEFT", "torch body",
               "PEFT body", "JAX base / torch base (medians, different phases)"], time_rows),
        "",
        "Hot swap (issue 5: no recompilation when swapping adapters of equal shapes): compilations of one "
        "`jax.jit(jlora.wrap(f))` triggered by calling it with each adapter in turn (T=16). Scales are array "
        "leaves and the config text is not part of the cache key; `pad_rank=` zero-pads ranks to a common width:",
        "",
        table(["adapter passed", "new compilations"], swap_rows),
    ]
    return {"title": "2. Inference (CPU)", "markdown": "\n".join(md), "targets": targets,
            "data": {"results": {str(k): v for k, v in results.items()}, "err_wrap": err_wrap,
                     "err_merged": err_merged, "swap": swap_rows}}


if __name__ == "__main__":
    import sys
    print(run(quick="--quick" in sys.argv)["markdown"])
