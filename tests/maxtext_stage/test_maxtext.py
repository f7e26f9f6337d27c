"""PEFT parity of the ``"maxtext"`` layout on MaxText's own models (the ``.ci/run`` MaxText stage).

Runs in a Python 3.12 venv with ``maxtext`` and without torch: PEFT's side (tiny Hugging Face checkpoints, random
adapters, PEFT's logits) comes from ``tests/maxtext_reference.py`` run in the main env, in the folder named by
``JLORA_MAXTEXT_REF``. Each checkpoint is converted with MaxText's converter functions (scanned and unscanned), each
adapter loaded with ``jlora.load(..., layout="maxtext")``, and MaxText's forward compared with PEFT's (float32).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("maxtext", reason="the MaxText stage runs in .venv-maxtext (see .ci/run)")

import jax  # noqa: E402
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
    """(family, folder, jitted MaxText forward, MaxText's conversion of a checkpoint folder, converted base tree)."""
    family, scan = request.param
    folder = reference / family
    hf_config = json.loads((folder / "hf" / "config.json").read_text())
    config = maxtext_harness.maxtext_config(family, hf_config, scan)
    model, abstract, treedef = maxtext_harness.build(config)
    convert = lambda hf_dir: maxtext_harness.convert(config, hf_dir, abstract, treedef)  # noqa: E731
    ids = np.load(folder / "ids.npy")
    positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
    forward = lambda variables: model.apply(variables, ids, positions, enable_dropout=False)  # noqa: E731
    return family, folder, forward, convert, convert(folder / "hf")


def _close(got, want, atol: float = ATOL) -> None:
    got = np.asarray(got, np.float32)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=atol)


def test_base_logits(converted):
    """The harness: MaxText's converted model gives the Hugging Face model's logits."""
    family, folder, forward, _, tree = converted
    _close(jax.jit(forward)(tree), np.load(folder / "base_logits.npy"), PEFT_ATOL[family])


@pytest.mark.parametrize("case", CASES)
def test_adapter_logits(converted, case):
    """jlora.load (layout="auto" finds "maxtext") + jlora.wrap(model.apply) under jit gives PEFT's unmerged logits."""
    family, folder, forward, _, tree = converted
    lora_params = jlora.load(tree["params"], str(folder / case / "adapter"))
    _close(jax.jit(jlora.wrap(forward))({"params": lora_params}), np.load(folder / case / "logits.npy"),
           PEFT_ATOL[family])


@pytest.mark.parametrize("case", CASES)
def test_matches_maxtext_conversion(converted, case):
    """The adapter on the converted base gives what MaxText's converter makes of PEFT's merged checkpoint (the
    permutation and scale of lora_B are the converter's), unmerged through wrap and merged by jlora.merge."""
    _, folder, forward, convert, tree = converted
    want = np.asarray(jax.jit(forward)(convert(folder / case / "merged_hf")), np.float32)
    lora_params = jlora.load(tree["params"], str(folder / case / "adapter"), layout="maxtext")
    _close(jax.jit(jlora.wrap(forward))({"params": lora_params}), want)
    _close(jax.jit(forward)({"params": jlora.merge(lora_params)}), want)


@pytest.mark.parametrize("case", CASES)
def test_merged_logits(converted, case):
    """jlora.merge's tree runs in plain MaxText and gives PEFT's logits."""
    family, folder, forward, _, tree = converted
    lora_params = jlora.load(tree["params"], str(folder / case / "adapter"), layout="maxtext")
    _close(jax.jit(forward)({"params": jlora.merge(lora_params)}), np.load(folder / case / "logits.npy"),
           PEFT_ATOL[family])


@pytest.mark.parametrize("case", CASES)
def test_save_roundtrip(converted, case, tmp_path):
    """jlora.save un-permutes and un-scales: the adapter's tensors come back bit for bit, under PEFT's keys."""
    _, folder, _, _, tree = converted
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
