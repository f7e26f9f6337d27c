"""LoRA on parameters (PEFT's ``target_parameters``): the stacked expert weights of a mixture of experts (transformers'
GptOss, built tiny at test time), against PEFT's ParamWrapper: merged weights, the forward of a Flax port of the
experts under jlora.wrap, saving, gradients, and the errors."""
from __future__ import annotations

import copy
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft_twin import rel_err
from safetensors.torch import load_file

import jlora
from jlora.load import read_adapter
from jlora.save import to_peft_tensors
from jlora.torch_layout import flatten_keys, nest_keys

EXPERTS, HIDDEN, INTER = 4, 32, 24  # gate_up_proj (E, 32, 48), down_proj (E, 24, 32): not square
TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _gpt_oss(hidden: int = HIDDEN, inter: int = INTER, seed: int = 0):
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(vocab_size=64, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=EXPERTS,
                          num_experts_per_tok=2, max_position_embeddings=64, rope_scaling=None)
    torch.manual_seed(seed)
    return GptOssForCausalLM(config).eval()


def _peft(base, folder, transposed: bool = False, **lora):
    """PEFT's model of ``base`` with a random (non-zero) LoRA on the experts, saved to ``folder``."""
    import peft

    model = copy.deepcopy(base)
    if transposed:  # as transformers >= 5 marks GptOss' (experts, in, out) weights
        for layer in model.model.layers:
            layer.mlp.experts.is_transposed = True
    config = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": [], "target_parameters": TARGETS,
                                "init_lora_weights": False, **lora})
    pm = peft.get_peft_model(model, config).eval()
    pm.save_pretrained(folder)
    return pm


def _state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("transposed", [False, True], ids=["(E, out, in)", "is_transposed (E, in, out)"])
def test_merge_matches_peft_merge_and_unload(tmp_path, transposed):
    """On the PyTorch tree (the "torch" layout, as `jlora merge` uses it), jlora.merge gives PEFT's
    merge_and_unload weights: both wrapped parameters of each experts module (nested ParamWrappers, one with its own
    rank and alpha), an ordinary LoRA module beside them, and a class that reads its weights transposed."""
    base = _gpt_oss()
    pm = _peft(base, tmp_path / "a", transposed, target_modules=["q_proj"], rank_pattern={"experts.down_proj": 2},
               alpha_pattern={"experts.down_proj": 6})
    file = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert any(".experts.base_layer.lora_A" in k for k in file) and any(".experts.lora_B" in k for k in file)
    want = _state(pm.merge_and_unload())
    config, tensors, _ = read_adapter(tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lp = jlora.place(nest_keys(_state(base)), config, tensors, layout="torch")
    node = lp["model"]["layers"]["0"]["mlp"]["experts"]["down_proj"]
    assert node["lora_A"].shape == ((EXPERTS, INTER, 2) if transposed else (EXPERTS, HIDDEN, 2))  # (E, in, r)
    got = flatten_keys(jlora.merge(lp))
    base_state = _state(base)
    changed = [k for k in want if not np.array_equal(want[k], base_state[k])]
    assert sum("experts" in k for k in changed) == 4 and sum("q_proj" in k for k in changed) == 2
    for key in want:
        assert np.allclose(got[key], want[key], rtol=1e-6, atol=1e-7), key


class _Experts(nn.Module):
    """GptOss' experts as a Flax module (all experts on every token, weighted by the routing scores), parameters
    stored as PyTorch stores them."""

    @nn.compact
    def __call__(self, x, routing):
        gate_up = self.param("gate_up_proj", nn.initializers.zeros, (EXPERTS, HIDDEN, 2 * INTER))
        gate_up_bias = self.param("gate_up_proj_bias", nn.initializers.zeros, (EXPERTS, 2 * INTER))
        down = self.param("down_proj", nn.initializers.zeros, (EXPERTS, INTER, HIDDEN))
        down_bias = self.param("down_proj_bias", nn.initializers.zeros, (EXPERTS, HIDDEN))
        h = jnp.einsum("td,edf->etf", x, gate_up) + gate_up_bias[:, None]
        gate, up = jnp.minimum(h[..., ::2], 7.0), jnp.clip(h[..., 1::2], -7.0, 7.0)
        out = jnp.einsum("etf,efd->etd", (up + 1) * gate * jax.nn.sigmoid(gate * 1.702), down) + down_bias[:, None]
        return jnp.einsum("etd,te->td", out, routing)


class _Stack(nn.Module):
    @nn.compact
    def __call__(self, x, routing):
        for i in range(2):
            x = _Experts(name=str(i))(x, routing[i])
        return x


def _model(params, x, routing):
    """The two layers' experts, their parameters read from a tree with PyTorch's names (the "hf" layout)."""
    experts = {str(i): params["model"]["layers"][str(i)]["mlp"]["experts"] for i in range(2)}
    return _Stack().apply({"params": experts}, x, routing)


def _flax_params(base) -> dict:
    """The experts' parameters of ``base`` in the Flax model's tree (the "hf" layout: PyTorch names, nested)."""
    state = _state(base)
    return {"model": {"layers": {str(i): {"mlp": {"experts": {
        k: jnp.asarray(state[f"model.layers.{i}.mlp.experts.{k}"]) for k in
        ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")}}} for i in range(2)}}}


def _routing(seed: int = 0, tokens: int = 6):
    """Tokens and per-layer routing scores as GptOss' router makes them (top 2 of the experts, softmaxed)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, HIDDEN)).astype(np.float32)
    logits = torch.as_tensor(rng.standard_normal((2, tokens, EXPERTS)).astype(np.float32))
    top, idx = torch.topk(logits, 2, dim=-1)
    scores = torch.zeros_like(logits).scatter_(2, idx, torch.softmax(top, dim=-1))
    return x, scores, idx


def _torch_experts(pm, x, scores, idx) -> torch.Tensor:
    """The two layers' experts of PEFT's model in sequence (its ParamWrappers add the LoRA on every forward)."""
    h = torch.as_tensor(x)[None]
    for i, layer in enumerate(pm.base_model.model.model.layers):
        h = layer.mlp.experts(h, router_indices=idx[i], routing_weights=scores[i])
    return h[0]


def test_wrap_runs_the_experts_as_peft(tmp_path):
    """A Flax port of the experts under jax.jit(jlora.wrap): the adapted parameters are merged inside the call (as
    PEFT's ParamWrapper does, no warning), giving PEFT's outputs; jlora.merge gives them too."""
    base = _gpt_oss()
    pm = _peft(base, tmp_path / "a")
    x, scores, idx = _routing()
    with torch.no_grad():
        want = _torch_experts(pm, x, scores, idx).numpy()
    params = _flax_params(base)
    lp = jlora.load(params, tmp_path / "a")
    node = lp["model"]["layers"]["1"]["mlp"]["experts"]["gate_up_proj"]
    assert isinstance(node, jlora.AdaptedModule) and node["lora_A"].shape == (EXPERTS, 2 * INTER, 4)
    assert lp["model"]["layers"]["1"]["mlp"]["experts"]["gate_up_proj_bias"] is params["model"]["layers"]["1"][
        "mlp"]["experts"]["gate_up_proj_bias"]
    routing = jnp.asarray(scores.numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = jax.jit(jlora.wrap(_model))(lp, x, routing)
    assert rel_err(got, want) <= 1e-5
    assert rel_err(_model(params, x, routing), want) > 1e-3  # (the adapter matters)
    assert rel_err(_model(jlora.merge(lp), x, routing), want) <= 1e-5


def test_save_writes_peft_file_back_and_peft_loads_it(tmp_path):
    """jlora.save of a loaded adapter writes PEFT's keys and bytes again (nested wrappers' keys included), and PEFT
    loads it into the same merged weights."""
    import peft

    base = _gpt_oss()
    pm = _peft(base, tmp_path / "a")
    lp = jlora.load(_flax_params(base), tmp_path / "a")
    out = jlora.save(lp, tmp_path / "saved")
    want, got = load_file(tmp_path / "a" / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    merged, reference = _state(again.merge_and_unload()), _state(pm.merge_and_unload())
    assert all(np.array_equal(merged[k], reference[k]) for k in reference)


def test_gradients_match_peft(tmp_path):
    """Training: the gradients of a loss with respect to the experts' LoRA factors (through the merge inside the
    call) equal PyTorch's for PEFT's factors, once written in PEFT's layout."""
    base = _gpt_oss()
    pm = _peft(base, tmp_path / "a")
    x, scores, idx = _routing(seed=1)
    torch.sin(_torch_experts(pm, x, scores, idx)).sum().backward()
    want = {n: p.grad.numpy() for n, p in pm.named_parameters() if "lora_" in n}
    trainable, frozen = jlora.split(jlora.load(_flax_params(base), tmp_path / "a"))
    routing = jnp.asarray(scores.numpy())
    loss = lambda t: jnp.sum(jnp.sin(jlora.wrap(_model)(jlora.combine(t, frozen), x, routing)))  # noqa: E731
    grads = to_peft_tensors(jlora.combine(jax.grad(loss)(trainable), frozen))
    assert set(grads) == {k.replace(".default", "") for k in want}
    for key, value in want.items():
        assert rel_err(grads[key.replace(".default", "")], value) <= 1e-5, key


def test_errors_and_refusals(tmp_path):
    """Factors that fit none of the module's targeted parameters are listed; PEFT's refusals are jlora's; jlora.init
    and mixed batches refuse target_parameters; square experts are read as PEFT reads them, with a warning."""
    base = _gpt_oss()
    _peft(base, tmp_path / "a")
    params = _flax_params(base)
    small = jax.tree_util.tree_map(lambda v: v[:, :HIDDEN - 8] if v.ndim == 3 else v, params)  # other sizes
    with pytest.raises(jlora.TargetMismatchError) as err:
        jlora.load(small, tmp_path / "a")
    assert len(err.value.problems) == 2 and "experts.base_layer.lora_A/B.weight: [16, 48]" in err.value.problems[0]
    with pytest.raises(jlora.ConfigError, match="target_parameters with lora_dropout"):
        jlora.LoraConfig.from_dict({"peft_type": "LORA", "r": 4, "target_parameters": TARGETS, "lora_dropout": 0.1})
    config = jlora.LoraConfig(r=4, target_parameters=TARGETS)
    with pytest.raises(jlora.UnsupportedAdapterError, match="target_parameters"):
        jlora.init(params, config, key=jax.random.key(0))
    with pytest.raises(jlora.AdapterError, match="LoRA on a parameter"):
        jlora.load(params, {"a": tmp_path / "a", "b": tmp_path / "a"})

    square = _gpt_oss(hidden=32, inter=16)  # gate_up (E, 32, 32), down (E, 16, 32)
    _peft(square, tmp_path / "sq")
    config, tensors, _ = read_adapter(tmp_path / "sq")
    with pytest.warns(UserWarning, match="square experts"):
        lp = jlora.place(nest_keys(_state(square)), config, tensors, layout="torch")
    assert lp["model"]["layers"]["0"]["mlp"]["experts"]["gate_up_proj"]["lora_A"].shape == (EXPERTS, 32, 4)


def test_nnx_model_and_a_custom_layout(tmp_path):
    """An NNX port of the experts (raw nnx.Param stacks), placed by a jlora.Rule (the expert index as its layer
    group): jlora.nnx_model merges the adapted parameters inside the call, as jlora.merge does, with no warning."""
    from flax import nnx

    class Experts(nnx.Module):
        def __init__(self, gate_up, down):
            self.gate_up_proj, self.down_proj = nnx.Param(jnp.asarray(gate_up)), nnx.Param(jnp.asarray(down))

        def __call__(self, x):
            h = jnp.einsum("td,edf->etf", x, self.gate_up_proj[...])
            return jnp.einsum("etf,efd->td", jnp.tanh(h[..., ::2]) * h[..., 1::2], self.down_proj[...])

    class Layer(nnx.Module):
        def __init__(self, gate_up, down):
            self.experts = Experts(gate_up, down)

    class Net(nnx.Module):
        def __init__(self, state):
            self.layers = nnx.List([Layer(state[f"model.layers.{i}.mlp.experts.gate_up_proj"],
                                          state[f"model.layers.{i}.mlp.experts.down_proj"]) for i in range(2)])

        def __call__(self, x):
            for layer in self.layers:
                x = layer.experts(x)
            return x

    base = _gpt_oss()
    _peft(base, tmp_path / "a")
    graphdef, state = nnx.split(Net(_state(base)))
    layout = jlora.Layout([jlora.Rule(r"model\.layers\.(?P<l>\d+)\.mlp\.experts\.(?P<p>\w+)\.(?P<layer>\d+)",
                                      "layers/{l}/experts/{p}", "o i -> layer o i")])
    lp = jlora.load(state, tmp_path / "a", layout=layout)
    x = jnp.asarray(_routing()[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = jax.jit(lambda p: jlora.nnx_model(graphdef, p)(x))(lp)
    want = nnx.merge(graphdef, jlora.merge(lp))(x)
    assert rel_err(got, want) <= 1e-6 and rel_err(want, nnx.merge(graphdef, state)(x)) > 1e-3


def test_command_line_merge_matches_peft(tmp_path):
    """`jlora merge` on a sharded Hugging Face checkpoint: PEFT's merge_and_unload weights, every tensor."""
    import glob

    from safetensors.numpy import load_file as load_numpy

    from jlora.merge_checkpoint import merge_checkpoint

    base = _gpt_oss()
    base.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    pm = _peft(base, tmp_path / "a", target_modules=["q_proj"])
    want = _state(pm.merge_and_unload())
    out = merge_checkpoint(tmp_path / "base", tmp_path / "a", tmp_path / "merged", progress=False)
    assert len(glob.glob(str(out / "*.safetensors"))) > 2
    got = {k: v for f in glob.glob(str(out / "*.safetensors")) for k, v in load_numpy(f).items()}
    assert set(got) == set(want) and all(np.allclose(got[k], want[k], rtol=1e-6, atol=1e-7) for k in want)


def test_inspect_groups_the_wrappers_under_their_module(tmp_path):
    from jlora.describe import describe_adapter, format_description

    _peft(_gpt_oss(), tmp_path / "a", target_modules=["q_proj"])
    info = describe_adapter(tmp_path / "a")
    experts = next(g for g in info["groups"] if g["module"] == "experts")
    assert (experts["count"], experts["layers"], experts["scales"], experts["ranks"]) == (4, "0-1", [2.0], [])
    assert "LoRA on parameters gate_up_proj/down_proj (lora_A rows = rank x experts: 16)" in experts["kind"]
    assert "target_parameters ['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']" in format_description(info)


def test_square_transposed_experts_need_the_documented_rule(tmp_path):
    """Square experts of a class with is_transposed (GptOss in transformers >= 5) cannot be told from their shapes:
    the default reading differs from PEFT's there, and the README's rule 'o i -> layer i o' gives PEFT's merge."""
    base = _gpt_oss(hidden=32, inter=16)  # gate_up_proj (E, 32, 32): square; down_proj (E, 16, 32)
    pm = _peft(base, tmp_path / "a", transposed=True)
    want = _state(pm.merge_and_unload())
    config, tensors, _ = read_adapter(tmp_path / "a")
    key = "model.layers.0.mlp.experts.gate_up_proj"
    with pytest.warns(UserWarning, match="square experts"):
        default = flatten_keys(jlora.merge(jlora.place(nest_keys(_state(base)), config, tensors, layout="torch")))
    assert rel_err(default[key], want[key]) > 1e-3
    layout = jlora.Layout([jlora.Rule(r"model\.layers\.(?P<l>\d+)\.mlp\.experts\.(?P<p>\w+)\.(?P<layer>\d+)",
                                      "model/layers/{l}/mlp/experts/{p}", "o i -> layer i o")])
    got = flatten_keys(jlora.merge(jlora.place(nest_keys(_state(base)), config, tensors, layout=layout)))
    assert all(np.allclose(got[k], want[k], rtol=1e-6, atol=1e-7) for k in want)


def test_a_two_dimensional_parameter(tmp_path):
    """A 2-D targeted parameter (out, in) is one LoRA (PEFT's ParamWrapper with one expert): merged as PEFT merges
    it, on a tree that stores it as PyTorch does or transposed, and saved back as PEFT's keys."""
    import peft

    class Inner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(6, 8))

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()

    torch.manual_seed(0)
    base = Outer()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=3, target_modules=[],
                                                                  target_parameters=["inner.w"],
                                                                  init_lora_weights=False))
    pm.save_pretrained(tmp_path / "a")
    want = pm.merge_and_unload().inner.w.detach().numpy()
    w = base.inner.w.detach().numpy()
    for stored in (w, w.T):  # (the "hf" layout tries (out, in), then (in, out))
        lp = jlora.load({"inner": {"w": jnp.asarray(stored)}}, tmp_path / "a")
        got = np.asarray(jlora.merge(lp)["inner"]["w"])
        assert np.allclose(got.T if stored is not w else got, want, rtol=1e-6, atol=1e-7)
    out = load_file(jlora.save(lp, tmp_path / "saved") / "adapter_model.safetensors")
    file = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert set(out) == set(file) == {"base_model.model.inner.lora_A.weight", "base_model.model.inner.lora_B.weight"}
    assert all(torch.equal(out[k], file[k]) for k in file)
