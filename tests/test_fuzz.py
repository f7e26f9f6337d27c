"""Property-based bad input: whatever adapter_config.json, safetensors file or subfolder a user (or an
attacker) hands over, jlora answers with a result or a jlora.AdapterError, never another exception,
never a hang, and never writes a file. Runs are small and derandomized so that CI on 2 cores stays fast
and reproducible. No torch and no transformers here.
"""
from __future__ import annotations

import json
import math
import os
import posixpath
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
from adapter_files import PREFIX, llama_like_params, llama_lora_tensors, write_adapter
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import jlora
from jlora.checkpoint import DTYPES, read_safetensors
from jlora.describe import describe_adapter
from jlora.hub import _check_subfolder, resolve_file
from jlora.merge_checkpoint import _is_shard_name
from jlora.targeting import is_module_to_save, is_targeted, layer_index, module_rank, module_scale

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.filter_too_much])
PARAMS = llama_like_params()
NAMES = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "k_proj", "v_proj", "o_proj")]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def expect_adapter_error(fn, *args, **kwargs):
    """``fn(...)``'s result, or None when it raised an AdapterError; any other exception fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = fn(*args, **kwargs)
        except jlora.AdapterError as err:
            assert str(err)  # a message, naming what is wrong
            event(f"{getattr(fn, '__name__', 'call')}: {type(err).__name__}")
            return None
    event(f"{getattr(fn, '__name__', 'call')}: accepted")
    return result


# ---- adapter_config.json ---------------------------------------------------------------------------
json_scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.integers(-3, 70)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c,
                                                                                                max_size=3),
                           max_leaves=8)
regexish = st.text(alphabet="qkvo_proj.*+?()[]|\\^$0123456789{},", max_size=14)
module_names = st.sampled_from(["q_proj", "v_proj", "k_proj", "o_proj", "lm_head", "layers", ""]) | regexish


VALID = {  # plausible values
    "r": st.just(4) | st.integers(1, 9), "lora_alpha": st.integers(-4, 64) | st.floats(-1e3, 1e3),
    "target_modules": st.lists(module_names, max_size=4) | st.just("all-linear"),
    "exclude_modules": st.none() | st.lists(module_names, max_size=2),
    "rank_pattern": st.dictionaries(module_names, st.integers(1, 9), max_size=2),
    "alpha_pattern": st.dictionaries(module_names, st.floats(-8, 8), max_size=2),
    "layers_to_transform": st.none() | st.lists(st.integers(0, 3), max_size=3) | st.integers(0, 3),
    "layers_pattern": st.none() | st.just("layers"), "modules_to_save": st.none() | st.lists(module_names, max_size=2),
    "trainable_token_indices": st.none() | st.lists(st.integers(0, 80), max_size=3),
    "use_rslora": st.booleans(), "bias": st.sampled_from(["none", "all", "lora_only"]),
    "lora_dropout": st.floats(0, 0.99),
    "init_lora_weights": st.sampled_from([True, False, "gaussian", "eva"]), "peft_type": st.just("LORA"),
    "fan_in_fan_out": st.booleans(), "inference_mode": st.booleans(),
    "layer_replication": st.none() | st.just([[0, 2], [1, 2]]) | st.just([[0, 2]]),
    "use_bdlora": st.none() | st.fixed_dictionaries({}, optional={
        "target_modules_bd_a": st.lists(module_names, max_size=2),
        "target_modules_bd_b": st.lists(module_names, max_size=2), "nblocks": st.integers(1, 4),
        "match_strict": st.booleans()}),
    "alora_invocation_tokens": st.none() | st.lists(st.integers(0, 80), max_size=3),
    "kasa_config": st.none() | st.just({"beta": 1e-4, "gamma": 1e-3}),
    "use_qalora": st.just(False), "future_field": json_values,
}
JUNK = {  # wrong types, out-of-range or absurd values, bad regular expressions
    "r": st.integers(-3, 0) | st.sampled_from([2**31, 2**64, 10**400]) | json_values,
    "lora_alpha": st.floats(allow_nan=True, allow_infinity=True) | st.just(10**400) | json_values,
    "target_modules": regexish | json_values, "exclude_modules": regexish | json_values,
    "rank_pattern": st.dictionaries(regexish, st.integers(-2, 9) | json_values, max_size=3) | json_values,
    "alpha_pattern": st.dictionaries(regexish, st.floats(allow_nan=True) | json_values, max_size=3) | json_values,
    "layers_to_transform": json_values, "layers_pattern": regexish | st.lists(regexish, max_size=2) | json_values,
    "modules_to_save": st.lists(regexish, max_size=2) | json_values,
    "trainable_token_indices": st.lists(st.integers(-2, 80), max_size=3)
    | st.dictionaries(module_names, st.lists(st.integers(-2, 80), max_size=3), max_size=2) | json_values,
    "use_rslora": json_values, "use_dora": json_values, "lora_bias": json_values,
    "bias": st.just("some") | json_values, "lora_dropout": st.floats(allow_nan=True) | json_values,
    "init_lora_weights": st.sampled_from(["pissa", "olora_x", "nope"]) | json_values,
    "peft_type": st.sampled_from(["IA3", "lora", ""]) | json_values, "fan_in_fan_out": json_values,
    "inference_mode": json_values, "layer_replication": json_values, "use_qalora": json_values,
    "use_bdlora": json_values, "alora_invocation_tokens": json_values, "kasa_config": json_values,
    "future_field": json_values,
}
# half the configs are plausible through and through, half have some junk fields
config_dicts = st.fixed_dictionaries({}, optional=VALID) | st.fixed_dictionaries(
    {}, optional={k: st.one_of(v, v, v, JUNK[k]) for k, v in VALID.items()})


@FUZZ
@given(config_dicts)
def test_any_config_dict_parses_or_raises_adapter_error(data):
    cfg = expect_adapter_error(jlora.LoraConfig.from_dict, data)
    if cfg is None:
        return
    # a config jlora accepted is usable everywhere: serialisation and PEFT's matching rules
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = jlora.LoraConfig.from_dict(json.loads(cfg.to_json()))
    assert again.to_json() == cfg.to_json()
    for name in NAMES + ["lm_head", "model.embed_tokens"]:
        is_targeted(cfg, name), is_module_to_save(cfg, name), layer_index(cfg, name)
        assert module_rank(cfg, name) > 0 and math.isfinite(module_scale(cfg, name))


@FUZZ
@given(data=config_dicts, raw=st.one_of(*[st.none()] * 3, st.sampled_from(
    [b"", b"\xff\xfe", b"[" * 5000, b"{" + b"1" * 5000, b'{"r": 1' + b"0" * 5000 + b"}", b"NaN", b'{"r": 4, "r": 8}'])))
def test_any_adapter_config_file_loads_or_raises_adapter_error(tmp_path_factory, data, raw):
    tmp = tmp_path_factory.mktemp("cfg")
    r = data.get("r")
    rank = r if isinstance(r, int) and 1 <= r <= 9 else 4  # tensors that fit the config's rank when they can
    folder = write_adapter(tmp / "a", config=dict(data), tensors=llama_lora_tensors(r=rank))
    if raw is not None:
        (folder / "adapter_config.json").write_bytes(raw)
    before = _snapshot(tmp)
    lp = expect_adapter_error(jlora.load, PARAMS, folder)
    assert _snapshot(tmp) == before  # nothing written, nothing changed
    if lp is not None and not data.get("alora_invocation_tokens"):
        merged = expect_adapter_error(jlora.merge, lp)
        assert merged is not None  # an accepted adapter merges (but an aLoRA, as in PEFT)


# ---- adapter_model.safetensors ----------------------------------------------------------------------
VALID_KEYS = sorted(llama_lora_tensors())
tensor_keys = (st.sampled_from(VALID_KEYS)
               | st.sampled_from([f"{PREFIX}../../etc/passwd.lora_A.weight", f"{PREFIX}/abs/path.lora_B.weight",
                                  f"{PREFIX}model.layers.0.self_attn.q_proj.weight", "/etc/passwd", "..", "",
                                  f"{PREFIX}model.layers.0.self_attn.q_proj.token_adapter.trainable_tokens_delta",
                                  f"{PREFIX}model.layers.0.self_attn.q_proj.lora_magnitude_vector", "__metadata__"])
               | st.text(max_size=20))
dtypes = st.sampled_from(sorted(DTYPES)) | st.sampled_from(["F4", "f32", "", "C64"]) | json_values
shapes = (st.sampled_from([[4, 32], [32, 4], [16, 4], [4, 16], [32], [], [0, 32]])
          | st.lists(st.integers(-2, 40) | st.sampled_from([2**40, 2**63, 2**70]), max_size=3) | json_values)
MUTATIONS = ["none", "truncate", "length", "huge_length", "offsets", "duplicate", "garbage_header", "deep"]


@st.composite
def safetensors_files(draw) -> bytes:
    """A safetensors file: entries (often the valid adapter's keys and shapes, in one float dtype, with
    normal or random-bit values, so NaN/Inf too) plus random entries, consistent offsets, maybe mutated."""
    drawn, entries, data = [], {}, b""
    if draw(st.booleans()):
        dtype = draw(st.sampled_from(["F32", "F16", "BF16", "F64", "F8_E4M3", "I32"]))
        random_bits = draw(st.booleans())
        drawn += [(k, dtype, list(v.shape), None if random_bits else v) for k, v in llama_lora_tensors().items()]
    drawn += [(draw(tensor_keys), draw(dtypes), draw(shapes), None) for _ in range(draw(st.integers(0, 3)))]
    for key, dtype, shape, values in drawn:
        size = 0
        if isinstance(dtype, str) and dtype in DTYPES and isinstance(shape, list) and all(
                isinstance(d, int) and 0 <= d <= 64 for d in shape):
            size = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        entries[key] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + size]}
        if values is not None:
            data += values.astype(DTYPES[dtype]).tobytes()
        else:
            data += draw(st.binary(min_size=size, max_size=size)) if size < 64 else os.urandom(size)
    if draw(st.booleans()):
        entries["__metadata__"] = draw(st.sampled_from([{"format": "pt"}, {"format": 1}, [1], "pt", None]))
    mutation = draw(st.one_of(*[st.just("none")] * 3, st.sampled_from(MUTATIONS)))
    header = json.dumps(entries).encode()
    if mutation == "offsets" and entries:
        key = draw(st.sampled_from(sorted(entries)))
        if isinstance(entries[key], dict):
            entries[key]["data_offsets"] = draw(st.lists(st.integers(-3, 2**66), max_size=3) | json_values)
        header = json.dumps(entries).encode()
    elif mutation == "duplicate" and entries:
        first = json.dumps(dict([next(iter(entries.items()))]))[1:-1]
        header = ("{" + first + ", " + json.dumps(entries)[1:]).encode()
    elif mutation == "garbage_header":
        header = draw(st.binary(max_size=40))
    elif mutation == "deep":
        header = b"[" * 5000 + b"]" * 5000
    length = len(header)
    if mutation == "length":
        length = draw(st.integers(0, 2**64 - 1))
    elif mutation == "huge_length":
        length = 200 * 1024 * 1024  # more than the header limit
    blob = struct.pack("<Q", length) + header + data
    if mutation == "truncate":
        blob = blob[: draw(st.integers(0, max(0, len(blob) - 1)))]
    return blob


@FUZZ
@given(blob=safetensors_files(), use_dora=st.booleans(), allow_nonfinite=st.booleans())
def test_any_safetensors_file_loads_or_raises_adapter_error(tmp_path_factory, blob, use_dora, allow_nonfinite):
    tmp = tmp_path_factory.mktemp("st")
    folder = write_adapter(tmp / "a", config={"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": use_dora,
                                              "target_modules": ["q_proj", "v_proj"]}, tensors=False)
    (folder / "adapter_model.safetensors").write_bytes(blob)
    before = _snapshot(tmp)
    tensors = expect_adapter_error(read_safetensors, folder / "adapter_model.safetensors")
    if tensors is not None:
        for value in tensors.values():  # every tensor the reader hands out is readable
            np.asarray(value).tobytes()
    lp = expect_adapter_error(jlora.load, PARAMS, folder, allow_nonfinite=allow_nonfinite)
    expect_adapter_error(describe_adapter, folder)  # `jlora inspect`
    assert _snapshot(tmp) == before
    if lp is not None:
        assert jlora.merge(lp) is not None


@FUZZ
@given(values=st.lists(st.sampled_from([np.nan, np.inf, -np.inf, 0.0, 1e38, -1e-45]), min_size=1, max_size=4),
       dtype=st.sampled_from(["float32", "float16", "float64"]), key=st.sampled_from(VALID_KEYS))
def test_nonfinite_values_are_named_unless_allowed(tmp_path_factory, values, dtype, key):
    tensors = {k: v.astype(dtype) for k, v in llama_lora_tensors().items()}
    with np.errstate(over="ignore"):
        tensors[key].flat[: len(values)] = values
    folder = write_adapter(tmp_path_factory.mktemp("nf") / "a", tensors=tensors)
    if np.isfinite(tensors[key]).all():
        assert jlora.load(PARAMS, folder) is not None
        return
    with pytest.raises(jlora.CheckpointError, match="NaN or Inf") as err:
        jlora.load(PARAMS, folder)
    assert err.value.problems == [key]
    assert jlora.load(PARAMS, folder, allow_nonfinite=True) is not None


# ---- subfolders -------------------------------------------------------------------------------------
subfolders = (st.sampled_from(["..", "../a", "a/../..", "/etc", "a/b/../../..", "./a", "a//b", "sub", "sub/",
                               "a\\..\\..", "\x00", "~", "sub/../sub"])
              | st.text(alphabet="./a\\b~\x00", max_size=8) | st.none() | st.integers())


@FUZZ
@given(subfolder=subfolders)
def test_subfolders_never_escape_the_adapter_folder(tmp_path_factory, subfolder):
    root = tmp_path_factory.mktemp("root")
    write_adapter(root / "repo" / "sub")
    write_adapter(root / "outside")
    repo = root / "repo"
    path = expect_adapter_error(resolve_file, repo, "adapter_config.json", subfolder=subfolder)
    if path is not None:
        assert path.resolve().is_relative_to(repo.resolve())
    # the Hub path: refused before any request unless it names a folder inside the repo
    if isinstance(subfolder, str) and expect_adapter_error(lambda: _check_subfolder(subfolder) or True):
        norm = posixpath.normpath(subfolder.replace("\\", "/") or ".")
        assert not norm.startswith("..") and not posixpath.isabs(norm) and "\x00" not in subfolder, norm


def test_regex_fields_are_checked_up_front():
    with pytest.raises(jlora.ConfigError) as err:
        jlora.LoraConfig(target_modules="(q_proj", rank_pattern={"v[": 2}, layers_pattern="(", modules_to_save=["["])
    assert len(err.value.problems) == 4
    assert "target_modules: '(q_proj' is not a valid regular expression" in str(err.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 10**400])
def test_non_finite_alpha_is_refused(bad):
    with pytest.raises(jlora.ConfigError, match="lora_alpha must be a finite number"):
        jlora.LoraConfig(lora_alpha=bad)
    with pytest.raises(jlora.ConfigError, match="alpha_pattern"):
        jlora.LoraConfig(alpha_pattern={"q_proj": bad})


@FUZZ
@given(name=st.text(alphabet="./\\a_~:\x00", max_size=10).map(lambda s: s + ".safetensors") | st.text(max_size=12))
def test_accepted_shard_names_stay_inside_the_checkpoint_folder(name):
    """`jlora merge` reads and writes only shard names that are plain files of the base and out folders."""
    if _is_shard_name(name):
        joined = posixpath.normpath(posixpath.join("/base", name.replace("\\", "/")))
        assert posixpath.dirname(joined) == "/base" and "\x00" not in name and not name.startswith("."), name
