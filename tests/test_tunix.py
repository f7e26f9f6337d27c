"""PEFT adapters on google-tunix's NNX models (layout "tunix"), against the real PEFT.

Each architecture: a tiny random transformers model saved as safetensors, converted by tunix's own loader
(``tunix.models.<arch>.params*.create_model_from_safe_tensors``); an adapter made by ``peft.get_peft_model``
with every tensor random; ``jlora.load(state, adapter, layout="tunix")`` run unmerged through
``jlora.nnx_model`` under ``jax.jit`` (no warning: tunix's ``Einsum`` and ``nnx.Linear`` have side paths), merged,
and saved back for PEFT.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx
from peft_twin import peft_loads_cleanly, rel_err
from tunix.models.gemma3 import model as gemma3_model
from tunix.models.gemma3 import params_safetensors as gemma3_params
from tunix.models.llama3 import model as llama3_model
from tunix.models.llama3 import params as llama3_params
from tunix.models.qwen2 import model as qwen2_model
from tunix.models.qwen2 import params as qwen2_params
from tunix.models.qwen3 import model as qwen3_model
from tunix.models.qwen3 import params as qwen3_params

import jlora
from jlora.side_paths import is_param_einsum

TOL = 2e-4  # float32, relative to the largest logit
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, head_dim=8)


@dataclasses.dataclass
class Arch:
    torch_base: torch.nn.Module
    graphdef: Any
    state: Any
    inputs: tuple  # (ids, positions, attention mask) as tunix's __call__ takes them


def _llama(folder: Path) -> tuple[torch.nn.Module, Any]:
    # tunix's Llama 3 rotates with its apply_rope default base 1e6 whatever the config says: the twin uses 1e6
    cfg = transformers.LlamaConfig(**SIZES, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False)
    tc = llama3_model.ModelConfig(num_layers=2, vocab_size=64, embed_dim=32, hidden_dim=48, num_heads=4, head_dim=8,
                                  num_kv_heads=2, rope_theta=1_000_000, norm_eps=1e-5, weight_tying=False)
    return transformers.LlamaForCausalLM(cfg), lambda: llama3_params.create_model_from_safe_tensors(str(folder), tc)


def _qwen3(folder: Path) -> tuple[torch.nn.Module, Any]:
    cfg = transformers.Qwen3Config(**SIZES, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6,
                                   rms_norm_eps=1e-6, tie_word_embeddings=False)
    tc = qwen3_model.ModelConfig(num_layers=2, vocab_size=64, embed_dim=32, hidden_dim=48, num_heads=4, head_dim=8,
                                 num_kv_heads=2, rope_theta=1_000_000, norm_eps=1e-6, use_tied_embedding=False)
    return transformers.Qwen3ForCausalLM(cfg), lambda: qwen3_params.create_model_from_safe_tensors(str(folder), tc)


def _qwen2(folder: Path) -> tuple[torch.nn.Module, Any]:
    sizes = {k: v for k, v in SIZES.items() if k != "head_dim"}  # (Qwen2: head_dim = hidden / heads = 8)
    cfg = transformers.Qwen2Config(**sizes, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6,
                                   rms_norm_eps=1e-6, tie_word_embeddings=True)
    tc = qwen2_model.ModelConfig(num_layers=2, vocab_size=64, embed_dim=32, hidden_dim=48, num_heads=4, head_dim=8,
                                 num_kv_heads=2, rope_theta=1_000_000, norm_eps=1e-6, use_tied_embedding=True)
    return transformers.Qwen2ForCausalLM(cfg), lambda: qwen2_params.create_model_from_safe_tensors(str(folder), tc)


def _gemma3(kv_heads: int) -> Callable[[Path], tuple[torch.nn.Module, Any]]:
    def build(folder: Path) -> tuple[torch.nn.Module, Any]:
        # both layers local (tunix's pattern: 5 local, 1 global; transformers' the same), window > sequence
        cfg = transformers.Gemma3TextConfig(**SIZES, num_attention_heads=4, num_key_value_heads=kv_heads,
                                            query_pre_attn_scalar=8, sliding_window=16, rope_local_base_freq=10_000,
                                            rms_norm_eps=1e-6, attn_implementation="eager")
        tc = gemma3_model.ModelConfig(num_layers=2, num_embed=64, embed_dim=32, hidden_dim=48, num_heads=4, head_dim=8,
                                      num_kv_heads=kv_heads, sliding_window_size=16, param_dtype=jnp.float32)
        return transformers.Gemma3ForCausalLM(cfg), lambda: gemma3_params.create_model_from_safe_tensors(str(folder),
                                                                                                         tc)
    return build


BUILDERS = {"llama3": _llama, "qwen3": _qwen3, "qwen2": _qwen2, "gemma3_kv": _gemma3(2), "gemma3_qkv": _gemma3(4)}


@pytest.fixture(scope="module")
def archs(tmp_path_factory) -> Callable[[str], Arch]:
    built: dict[str, Arch] = {}

    def get(name: str) -> Arch:
        if name not in built:
            folder = tmp_path_factory.mktemp(name)
            torch.manual_seed(0)
            base, convert = BUILDERS[name](folder)
            base.eval().save_pretrained(folder, safe_serialization=True)
            graphdef, state = nnx.split(convert())
            ids = np.array([[1, 5, 9, 3, 7, 2, 8, 4], [3, 3, 1, 60, 22, 9, 0, 5]], np.int32)
            b, t = ids.shape
            positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
            mask = np.broadcast_to(np.tril(np.ones((t, t), bool)), (b, t, t))
            built[name] = Arch(base, graphdef, state, (ids, positions, mask))
        return built[name]
    return get


@pytest.fixture(scope="module")
def plain_forward() -> dict:
    """tunix's own forward of a plain state (the base, or jlora.merge's), jitted once per model (by id)."""
    return {}


def _plain(forwards: dict, arch: Arch, state) -> np.ndarray:
    if id(arch) not in forwards:
        forwards[id(arch)] = jax.jit(lambda st, ids, pos, mask: nnx.merge(arch.graphdef, st)(ids, pos, None, mask)[0])
    return np.asarray(forwards[id(arch)](state, *arch.inputs))


def _unmerged(arch: Arch, lora_params) -> np.ndarray:
    ids, positions, mask = arch.inputs
    run = jax.jit(lambda lp, ids, pos, mask: jlora.nnx_model(arch.graphdef, lp)(ids, pos, None, mask)[0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = np.asarray(run(lora_params, ids, positions, mask))
    ours = [str(w.message) for w in caught if "jlora" in str(w.message) or "merged" in str(w.message)]
    assert not ours, ours
    return out


def _torch_logits(model: torch.nn.Module, arch: Arch) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(arch.inputs[0]).long()).logits.float().numpy()


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Every adapter tensor random (PEFT zero-initialises lora_B): factors N(0, 0.1), DoRA magnitudes scaled."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "lora_magnitude" in name:
                p.mul_(1 + 0.2 * noise)
            elif "lora_" in name:
                p.copy_(0.1 * noise)


def _adapter(arch: Arch, folder: Path, lora: dict, seed: int) -> torch.nn.Module:
    pm = peft.get_peft_model(copy.deepcopy(arch.torch_base), peft.LoraConfig(**lora))
    _randomise(pm, seed)
    pm.save_pretrained(folder)
    return pm.eval()


CASES = {
    "llama3-patterns": ("llama3", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                       rank_pattern={"layers.1.self_attn.q_proj": 2, "v_proj": 6},
                                       alpha_pattern={"layers.0.self_attn.v_proj": 3.0})),
    "llama3-rslora-head": ("llama3", dict(r=4, lora_alpha=8, use_rslora=True,
                                          target_modules=ALL_LINEAR + ["lm_head"])),
    "qwen3-all-linear-dora": ("qwen3", dict(r=4, lora_alpha=16, use_dora=True, target_modules="all-linear")),
    "qwen2-all-linear": ("qwen2", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "gemma3_kv-patterns": ("gemma3_kv", dict(r=4, lora_alpha=8,
                                             target_modules=["k_proj", "v_proj", "o_proj", "up_proj"],
                                             rank_pattern={"k_proj": 2}, alpha_pattern={"v_proj": 5.0})),
    "gemma3_qkv-all-linear": ("gemma3_qkv", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "gemma3_qkv-dora-rslora": ("gemma3_qkv", dict(r=4, lora_alpha=8, use_dora=True, use_rslora=True,
                                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
}


def test_base_models_match_torch(archs, plain_forward):
    """The harness: tunix's converted models give transformers' logits, and their projections run a side path."""
    for name in BUILDERS:
        arch = archs(name)
        got = _plain(plain_forward, arch, nnx.to_pure_dict(arch.state))
        assert rel_err(got, _torch_logits(arch.torch_base, arch)) <= TOL, name
        attn = nnx.merge(arch.graphdef, arch.state).layers[0].attn
        einsums = [m for m in vars(attn).values() if isinstance(m, nnx.Module) and hasattr(m, "einsum_str")]
        assert len(einsums) >= 2 and all(is_param_einsum(m) for m in einsums), name
        assert not any(is_param_einsum(m) for m in vars(attn).values() if m not in einsums), name


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapter_matches_peft(case, archs, plain_forward, tmp_path):
    name, lora = CASES[case]
    arch = archs(name)
    judge = _adapter(arch, tmp_path / "adapter", lora, seed=sorted(CASES).index(case))
    want = _torch_logits(judge, arch)
    base = _torch_logits(arch.torch_base, arch)
    assert rel_err(base, want) > 100 * TOL  # the adapter moves the logits

    lora_params = jlora.load(arch.state, tmp_path / "adapter")  # layout="auto" finds the tunix layout
    assert rel_err(_unmerged(arch, lora_params), want) <= TOL
    merged = _plain(plain_forward, arch, jlora.merge(lora_params))
    assert rel_err(merged, want) <= TOL

    out = jlora.save(lora_params, tmp_path / "saved")
    back = peft_loads_cleanly(arch.torch_base, out)
    assert rel_err(_torch_logits(back, arch), want) <= TOL


def test_pure_dict_and_state_load_alike(archs, tmp_path):
    arch = archs("gemma3_kv")
    _adapter(arch, tmp_path / "adapter", dict(r=2, target_modules=["q_proj", "k_proj", "v_proj"]), seed=7)
    from_state = jlora.load(arch.state, tmp_path / "adapter", layout="tunix")
    from_dict = jlora.load(nnx.to_pure_dict(arch.state), tmp_path / "adapter")  # layout="auto"
    kv = from_dict["layers"][1]["attn"]["kv_einsum"]
    assert kv["lora_A"].shape == (32, 4) and kv["lora_B"].shape == (4, 2, 2, 8)  # (D, r_k + r_v), (r, part, K, H)
    for a, b in zip(jax.tree_util.tree_leaves(from_state), jax.tree_util.tree_leaves(from_dict)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_embedding_of_a_tied_model_is_refused(archs, tmp_path):
    """tunix decodes with the input table (tied head) while PEFT's embedding LoRA changes the lookups only."""
    arch = archs("qwen2")
    _adapter(arch, tmp_path / "adapter", dict(r=2, target_modules=["embed_tokens", "q_proj"]), seed=3)
    with pytest.raises(jlora.AdapterError, match="tied head"):
        jlora.load(arch.state, tmp_path / "adapter", layout="tunix")
