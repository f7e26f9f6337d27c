"""layout="auto" (the default): the built-in layout that places every module, or an error naming each one tried."""
from __future__ import annotations

import numpy as np
import pytest
from adapter_files import llama_like_params, write_adapter

import jlora


def _tunix_like(hidden: int = 32, kv: int = 16, layers: int = 2, heads: int = 4) -> dict:
    """A tree shaped like tunix's Llama 3 attention (``layers/{i}/attn/q_proj/w`` (D, N, H), ...)."""
    h = hidden // heads
    attn = lambda: {"q_proj": {"w": np.zeros((hidden, heads, h), np.float32)},  # noqa: E731
                    "k_proj": {"w": np.zeros((hidden, kv // h, h), np.float32)},
                    "v_proj": {"w": np.zeros((hidden, kv // h, h), np.float32)},
                    "o_proj": {"w": np.zeros((heads, h, hidden), np.float32)}}
    return {"layers": {i: {"attn": attn()} for i in range(layers)}}


def _leaves(tree) -> dict:
    return {k: np.asarray(v) for k, v in tree["model"]["layers"]["1"]["self_attn"]["v_proj"].items()}


def test_auto_picks_hf_on_a_transformers_tree(tmp_path):
    folder = write_adapter(tmp_path / "a")
    auto, hf = jlora.load(llama_like_params(), folder), jlora.load(llama_like_params(), folder, layout="hf")
    assert _leaves(auto).keys() == _leaves(hf).keys()
    for key, value in _leaves(hf).items():
        np.testing.assert_array_equal(_leaves(auto)[key], value)


def test_auto_picks_tunix_on_a_tunix_tree(tmp_path):
    folder = write_adapter(tmp_path / "a")
    lora_params = jlora.load(_tunix_like(), folder)
    q = lora_params["layers"][0]["attn"]["q_proj"]
    assert q["lora_A"].shape == (32, 4) and q["lora_B"].shape == (4, 4, 8)  # (D, r), (r, N, H)


def test_nothing_fits_names_every_layout_tried(tmp_path):
    folder = write_adapter(tmp_path / "a")
    with pytest.raises(jlora.TargetMismatchError) as err:
        jlora.load({"encoder": {"dense": {"kernel": np.zeros((32, 32), np.float32)}}}, folder)
    text = str(err.value)
    assert "chosen by layout='auto'" in text
    for name in ("hf placed 0 of 4", "tunix placed 0 of 4", "maxtext"):
        assert name in text, name
