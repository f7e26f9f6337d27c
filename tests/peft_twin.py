"""Test helpers: a tiny PyTorch model, a PEFT adapter on it with random non-zero weights, and its
Flax twin, all built at test time with the real torch / transformers / peft."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

import jlora


@dataclasses.dataclass
class Twin:
    torch_base: torch.nn.Module  # the base model before PEFT touched it
    peft_model: torch.nn.Module  # PeftModel.from_pretrained(adapter_dir), eval mode
    flax_model: object
    adapter_dir: Path
    inputs: dict  # numpy arrays


def perturb_trainable(model: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    """Give every trainable tensor (LoRA factors, DoRA magnitudes, biases, saved modules) random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(std * torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype))


def build_twin(tmp_path: Path, torch_cls, flax_cls, config, lora_kwargs: dict, *, seed: int = 0,
               inputs: dict | None = None, base_dtype=torch.float32) -> Twin:
    import peft

    torch.manual_seed(seed)
    base = torch_cls(config).eval()
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir, safe_serialization=True)
    flax_model = flax_cls.from_pretrained(base_dir, from_pt=True)

    work = copy.deepcopy(base)
    lcfg = peft.LoraConfig(init_lora_weights=False, **lora_kwargs)
    pm = peft.get_peft_model(work, lcfg)
    perturb_trainable(pm, seed + 1)
    adapter_dir = tmp_path / "adapter"
    pm.save_pretrained(adapter_dir)

    judge = peft.PeftModel.from_pretrained(copy.deepcopy(base).to(base_dtype), adapter_dir).eval()
    if inputs is None:
        rng = np.random.default_rng(seed)
        ids = rng.integers(0, config.vocab_size, size=(2, 7)).astype(np.int32)
        ids[0, :5] = np.array([1, 3, 5, 7, 60]) % config.vocab_size  # ids the trainable-token tests use
        inputs = {"input_ids": ids}
    return Twin(base, judge, flax_model, adapter_dir, inputs)


def torch_logits(model, inputs: dict) -> np.ndarray:
    with torch.no_grad():
        out = model(**{k: torch.as_tensor(np.asarray(v)).long() if v.dtype.kind in "iu" else torch.as_tensor(v)
                       for k, v in inputs.items()})
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits.float().numpy()


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-12))


def flax_logits_wrapped(twin: Twin, lora_params, **kw) -> np.ndarray:
    import jax

    fwd = jax.jit(jlora.wrap(twin.flax_model.__call__))
    out = fwd(**twin.inputs, params=lora_params, **kw)
    return np.asarray(out.logits if hasattr(out, "logits") else out[0], np.float32)


def flax_logits_plain(twin: Twin, params, **kw) -> np.ndarray:
    out = twin.flax_model(**twin.inputs, params=params, **kw)
    return np.asarray(out.logits if hasattr(out, "logits") else out[0], np.float32)


def peft_loads_cleanly(base: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    """PEFT model for ``adapter_dir``; fails on unexpected keys or missing adapter keys."""
    import peft

    cfg = peft.LoraConfig.from_pretrained(adapter_dir)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    result = peft.set_peft_model_state_dict(pm, load_file(adapter_dir / "adapter_model.safetensors"))
    assert not result.unexpected_keys
    adapter_words = ("lora_", "modules_to_save", "token_adapter")
    assert not [k for k in result.missing_keys if any(w in k for w in adapter_words) and "base_layer" not in k]
    return pm.eval()


def assert_saves_back(lora_params, adapter_dir: Path, out_dir: Path) -> None:
    """``jlora.save`` of a loaded adapter writes PEFT's file again: the same keys, dtypes and bytes, and the
    same adapter_config.json fields."""
    import json

    out = jlora.save(lora_params, out_dir)
    want, got = load_file(adapter_dir / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert json.loads((out / "adapter_config.json").read_text()) == config



def assert_runs_merges_and_saves_like_peft(twin: Twin, lora_params, out_dir: Path, tol: float = 1e-5) -> None:
    """The wrapped (unmerged) logits equal PEFT's, the merged tree's equal PEFT's ``merge_and_unload``, and
    ``jlora.save`` writes the adapter's file again (:func:`assert_saves_back`)."""
    assert rel_err(flax_logits_wrapped(twin, lora_params), torch_logits(twin.peft_model, twin.inputs)) <= tol
    merged_judge = copy.deepcopy(twin.peft_model).merge_and_unload()
    merged = twin.flax_model(**twin.inputs, params=jlora.merge(lora_params)).logits
    assert rel_err(merged, torch_logits(merged_judge, twin.inputs)) <= tol
    assert_saves_back(lora_params, twin.adapter_dir, out_dir)


def saved_pair(torch_cls, flax_cls, config, folder: Path, seed: int = 0):
    """A random torch model (eval) and its Flax twin read from the torch weights saved in ``folder``."""
    torch.manual_seed(seed)
    base = torch_cls(config).eval()
    base.save_pretrained(folder, safe_serialization=True)
    return base, flax_cls.from_pretrained(folder, from_pt=True)


def peft_family(tmp: Path, base: torch.nn.Module, loras: dict, seed: int) -> torch.nn.Module:
    """Each adapter of ``loras`` (name -> LoraConfig kwargs) made on ``base`` with random non-zero tensors and saved
    under ``tmp / name``, and one PeftModel (eval) holding them all under their names."""
    import peft

    for i, (name, lora) in enumerate(loras.items()):
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **lora))
        perturb_trainable(pm, seed + i)
        pm.save_pretrained(tmp / name)
    names = list(loras)
    judge = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp / names[0], adapter_name=names[0])
    for name in names[1:]:
        judge.load_adapter(tmp / name, adapter_name=name)
    return judge.eval()
