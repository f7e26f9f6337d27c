"""PEFT parity of the ``"maxtext"`` layout on MaxText's own models (the ``.ci/run`` MaxText stage).

Runs in a Python 3.12 venv with ``maxtext`` and without torch: PEFT's side (tiny Hugging Face checkpoints, random
adapters, PEFT's logits) comes from ``tests/maxtext_reference.py`` run in the main env, in the folder named by
``JLORA_MAXTEXT_REF``. Each checkpoint is converted with MaxText's converter functions (scanned and unscanned), each
adapter loaded with ``jlora.load(..., layout="maxtext")``, and MaxText's forward compared with PEFT's (float32).
The unmerged forward runs MaxText's NNX ``Transformer`` itself through ``jlora.nnx_model`` (every attention and MLP
``DenseGeneral`` adds ``s * (x @ A) @ B``, inside MaxText's layer scan too), never a kernel-sized sum; the linen shell
(``transformer_as_linen``) runs the merged tree, and ``jlora.wrap`` on it merges inside the call (with a warning).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("maxtext", reason="the MaxText stage runs in .venv-maxtext (see .ci/run)")

import jax  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

import jlora  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import maxtext_harness  # noqa: E402

RTOL, ATOL = 2e-4, 1e-5
FAMILIES = ("llama3.1", "qwen3")
CASES = ("all_linear", "qv_patterns", "rslora")
# MaxText's qwen3 model and transformers' Qwen3 differ by ~1e-3 on these logits (|logit| <= 1.2) even without an
# adapter, at every position (so not RoPE or attention mixing): PEFT parity for it is checked to that harness limit,
# and tightly against MaxText's own conversion of PEFT's merged checkpoint (test_matches_maxtext_conversion)
PEFT_ATOL = {"llama3.1": ATOL, "qwen3": 2e-3}


@pytest.fixture(scope="module")
def reference() -> Path:
    ref = os.environ.get("JLORA_MAXTEXT_REF")
    assert ref and Path(ref, "manifest.json").exists(), "set JLORA_MAXTEXT_REF to tests/maxtext_reference.py's output"
    return Path(ref)


@pytest.fixture(scope="module", params=[(f, s) for f in FAMILIES for s in (True, False)],
                ids=[f"{f}-{'scanned' if s else 'unscanned'}" for f in FAMILIES for s in (True, False)])
def converted(request, reference):
    """(family, folder, MaxText's forward (linen shell), MaxText's conversion of a checkpoint folder, converted base
    tree, the NNX model's state holding it, the unmerged forward of a LoRA tree of that state)."""
    family, scan = request.param
    folder = reference / family
    hf_config = json.loads((folder / "hf" / "config.json").read_text())
    config = maxtext_harness.maxtext_config(family, hf_config, scan)
    model, abstract, treedef = maxtext_harness.build(config)
    convert = lambda hf_dir: maxtext_harness.convert(config, hf_dir, abstract, treedef)  # noqa: E731
    ids = np.load(folder / "ids.npy")
    positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
    forward = lambda variables: model.apply(variables, ids, positions, enable_dropout=False)  # noqa: E731
    tree = convert(folder / "hf")
    graphdef, state = maxtext_harness.build_nnx(config, tree["params"])
    unmerged = lambda lp: jlora.nnx_model(graphdef, lp)(ids, positions, enable_dropout=False)  # noqa: E731
    return family, folder, forward, convert, tree, state, unmerged


@contextlib.contextmanager
def _no_jlora_warnings():
    """jlora's warnings (a kernel merged inside the call, a call without the adapter) raise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="jlora")
        warnings.filterwarnings("error", category=jlora.UnwrappedAdapterWarning)
        yield


def _subjaxpr_eqns(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs inside its equations (scan bodies, remat, pjit), recursively."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _subjaxpr_eqns(inner)


def _kernel_shapes(params: dict, scanned: bool) -> set[tuple[int, ...]]:
    """The shapes a merged projection kernel takes: stacked (layers at axis 1) and per layer, as converted and as
    (in, out) / (out, in) matrices, with the layers first or not."""
    shapes = set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [str(getattr(k, "key", k)) for k in path]
        if names[-1] != "kernel" or names[-2] not in ("query", "key", "value", "out", "wi_0", "wi_1", "wo"):
            continue
        shape = tuple(leaf.shape)
        layer = shape[1:2] if scanned else ()
        own = shape[:1] + shape[2:] if scanned else shape
        shapes |= {shape, layer + own}
        for k in range(1, len(own)):
            for matrix in ((math.prod(own[:k]), math.prod(own[k:])), (math.prod(own[k:]), math.prod(own[:k]))):
                shapes |= {matrix, layer + matrix, matrix[:1] + layer + matrix[1:]}
    return shapes


def _kernel_sized(jaxpr, shapes: set) -> list[str]:
    """The sums, products and matmuls of ``jaxpr`` (all levels) whose result has a kernel's shape."""
    return [f"{eqn.primitive.name} {tuple(out.aval.shape)}" for eqn in _subjaxpr_eqns(jaxpr)
            if eqn.primitive.name in ("add", "add_any", "mul", "dot_general")
            for out in eqn.outvars if tuple(getattr(out.aval, "shape", ())) in shapes]


def _close(got, want, atol: float = ATOL) -> None:
    got = np.asarray(got, np.float32)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=atol)


def test_base_logits(converted):
    """The harness: MaxText's converted model gives the Hugging Face model's logits (linen shell and NNX model)."""
    family, folder, forward, _, tree, state, unmerged = converted
    _close(jax.jit(forward)(tree), np.load(folder / "base_logits.npy"), PEFT_ATOL[family])
    _close(jax.jit(unmerged)(nnx.to_pure_dict(state)), np.load(folder / "base_logits.npy"), PEFT_ATOL[family])


@pytest.mark.parametrize("case", CASES)
def test_adapter_logits(converted, case):
    """jlora.load of the NNX model's state (layout="auto" finds "maxtext") + jlora.nnx_model under jit gives PEFT's
    unmerged logits, every projection through its side path (no jlora warning: nothing merged in the call)."""
    family, folder, _, _, _, state, unmerged = converted
    lora_params = jlora.load(state, str(folder / case / "adapter"))
    with _no_jlora_warnings():
        got = jax.jit(unmerged)(lora_params)
    _close(got, np.load(folder / case / "logits.npy"), PEFT_ATOL[family])


@pytest.mark.parametrize("case", CASES)
def test_linen_shell_wrap_merges_in_call(converted, case):
    """jlora.wrap on the linen shell (transformer_as_linen: its NNX modules have no interceptors) merges the kernels
    inside the call, says so, and still gives PEFT's logits."""
    family, folder, forward, _, tree, _, _ = converted
    lora_params = jlora.load(tree["params"], str(folder / case / "adapter"))
    with pytest.warns(UserWarning, match="jlora.wrap: no unmerged side path"):
        got = jax.jit(jlora.wrap(forward))({"params": lora_params})
    _close(got, np.load(folder / case / "logits.npy"), PEFT_ATOL[family])


@pytest.mark.parametrize("case", CASES)
def test_matches_maxtext_conversion(converted, case):
    """The adapter on the converted base gives what MaxText's converter makes of PEFT's merged checkpoint (the
    permutation and scale of lora_B are the converter's), unmerged through nnx_model and merged by jlora.merge."""
    _, folder, forward, convert, tree, state, unmerged = converted
    want = np.asarray(jax.jit(forward)(convert(folder / case / "merged_hf")), np.float32)
    with _no_jlora_warnings():
        got = jax.jit(unmerged)(jlora.load(state, str(folder / case / "adapter"), layout="maxtext"))
    _close(got, want)
    lora_params = jlora.load(tree["params"], str(folder / case / "adapter"), layout="maxtext")
    _close(jax.jit(forward)({"params": jlora.merge(lora_params)}), want)


def test_no_kernel_sized_sum(converted):
    """The unmerged program never forms a kernel-sized array (no W + s * A @ B, nor A @ B, at any level: inside the
    layer scan and remat too); the same check finds the merges of the linen shell's wrap (so it sees them)."""
    _, folder, forward, _, tree, state, unmerged = converted
    shapes = _kernel_shapes(tree["params"], scanned="layers" in tree["params"]["decoder"])
    with _no_jlora_warnings():
        program = jax.make_jaxpr(unmerged)(jlora.load(state, str(folder / "all_linear" / "adapter")))
    assert _kernel_sized(program.jaxpr, shapes) == []
    with pytest.warns(UserWarning, match="jlora.wrap: no unmerged side path"):
        merged = jax.make_jaxpr(jlora.wrap(forward))({"params": jlora.load(tree["params"],
                                                                           str(folder / "all_linear" / "adapter"))})
    assert len([op for op in _kernel_sized(merged.jaxpr, shapes) if op.startswith("add")]) >= 7


@pytest.mark.parametrize("case", CASES)
def test_merged_logits(converted, case):
    """jlora.merge's tree runs in plain MaxText and gives PEFT's logits."""
    family, folder, forward, _, tree, _, _ = converted
    lora_params = jlora.load(tree["params"], str(folder / case / "adapter"), layout="maxtext")
    _close(jax.jit(forward)({"params": jlora.merge(lora_params)}), np.load(folder / case / "logits.npy"),
           PEFT_ATOL[family])


@pytest.mark.parametrize("case", CASES)
def test_save_roundtrip(converted, case, tmp_path):
    """jlora.save un-permutes and un-scales: the adapter's tensors come back bit for bit, under PEFT's keys."""
    _, folder, _, _, tree, _, _ = converted
    lora_params = jlora.load(tree["params"], str(folder / case / "adapter"), layout="maxtext")
    jlora.save(lora_params, tmp_path)
    want = load_file(str(folder / case / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and np.array_equal(got[key], value), key
    config, saved = (json.loads(p.read_text()) for p in (folder / case / "adapter" / "adapter_config.json",
                                                         tmp_path / "adapter_config.json"))
    for field in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern"):
        assert saved[field] == config[field], field
