"""adapter_config.json as PEFT reads it: nulls field by field against PEFT, typos, current PEFT's fields,
and files that are not PEFT configs at all."""
from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import warnings

import jax
import numpy as np
import peft
import pytest
from peft_twin import build_twin, rel_err, torch_logits
from test_parity_models import llama

import jlora

# q and v get rslora scaling and a lora_bias-free plain LoRA: a null that flipped use_rslora or fan_in_fan_out to
# anything but PEFT's reading would change the numbers.
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "use_rslora": True}
PEFT_FIELDS = [f.name for f in dataclasses.fields(peft.LoraConfig) if f.name != "peft_type"]


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    torch_cls, flax_cls, cfg = llama()
    return build_twin(tmp_path_factory.mktemp("nulls"), torch_cls, flax_cls, cfg, LORA)


@pytest.fixture(scope="module")
def forward(twin):
    """The wrapped forward, compiled once: every adapter here has the same targets and ranks (hot swap)."""
    fwd = jax.jit(jlora.wrap(twin.flax_model.__call__))
    return lambda lora_params: np.asarray(fwd(**twin.inputs, params=lora_params).logits)


def _with_config(twin, folder, **changes):
    """A copy of the twin's adapter folder with ``changes`` written into its adapter_config.json."""
    shutil.copytree(twin.adapter_dir, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return folder


def _peft_logits(twin, folder):
    """PEFT's logits for the adapter in ``folder``, or None when PEFT cannot load or run it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.PeftModel.from_pretrained(copy.deepcopy(twin.torch_base), folder).eval()
            return torch_logits(model, twin.inputs)
    except Exception:  # noqa: BLE001 - any failure means PEFT does not accept this null
        return None


@pytest.mark.parametrize("field", PEFT_FIELDS)
def test_null_field_means_what_it_means_to_peft(twin, forward, tmp_path, field):
    """Every field PEFT accepts as null, jlora accepts, with PEFT's numbers. Of the nulls PEFT fails on, those
    that would leave the numbers unknown (r, lora_alpha, lora_dropout, bias) are a ConfigError; the others
    (empty patterns and sub-configs) jlora reads as the field's default."""
    folder = _with_config(twin, tmp_path / "a", **{field: None})
    want = _peft_logits(twin, folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known field's null is silent
        try:
            lora_params = jlora.load(twin.flax_model.params, folder)
        except jlora.ConfigError:
            assert want is None, f"PEFT accepts {field}: null, jlora refused it"
            return
    if want is None:  # (rank_pattern, alpha_pattern; PEFT 0.17's loftq_config): jlora reads null as the default
        want = torch_logits(twin.peft_model, twin.inputs)
    assert rel_err(forward(lora_params), want) <= 1e-5


def test_current_peft_config_is_silent(twin):
    """A config written by the installed PEFT (every field it knows, at its defaults) loads without a warning."""
    written = json.loads((twin.adapter_dir / "adapter_config.json").read_text())
    assert set(written) - {"runtime_config"} <= {f.name for f in dataclasses.fields(jlora.LoraConfig)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jlora.load(twin.flax_model.params, twin.adapter_dir)
        jlora.LoraConfig.from_pretrained(str(twin.adapter_dir))


def test_typo_names_the_field_meant(twin, tmp_path):
    config = json.loads((twin.adapter_dir / "adapter_config.json").read_text())
    config["lora_alhpa"] = config.pop("lora_alpha")
    with pytest.warns(UserWarning, match="unknown field 'lora_alhpa'; did you mean 'lora_alpha'"):
        jlora.LoraConfig.from_dict(config)


def test_unknown_future_field_is_kept_and_named(twin):
    config = json.loads((twin.adapter_dir / "adapter_config.json").read_text())
    with pytest.warns(UserWarning, match="unknown field 'brand_new_option'") as record:
        cfg = jlora.LoraConfig.from_dict({**config, "brand_new_option": 3})
    assert "did you mean" not in str(record[0].message)
    assert cfg.to_dict()["brand_new_option"] == 3


@pytest.mark.parametrize("init", ["astra", "pissa", "loftq"])
def test_base_rewriting_inits_are_refused(twin, tmp_path, init):
    folder = _with_config(twin, tmp_path / "a", init_lora_weights=init)
    with pytest.raises(jlora.UnsupportedAdapterError, match="rewrites the base model"):
        jlora.load(twin.flax_model.params, folder)


def test_nora_init_loads_like_peft(twin, forward, tmp_path):
    """NoRA only initialises the factors differently: the saved adapter is plain LoRA."""
    folder = _with_config(twin, tmp_path / "a", init_lora_weights="nora")
    lora_params = jlora.load(twin.flax_model.params, folder)
    want = _peft_logits(twin, folder)
    if want is None:  # a PEFT before 0.18 does not know the mode: its numbers for the same tensors, default init
        want = torch_logits(twin.peft_model, twin.inputs)
    assert rel_err(forward(lora_params), want) <= 1e-5


def test_mlx_lm_config_is_named(twin, tmp_path):
    folder = tmp_path / "mlx"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 16, "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.0}}))
    with pytest.raises(jlora.ConfigError, match="not a PEFT adapter config.*mlx-lm"):
        jlora.LoraConfig.from_pretrained(str(folder))


def test_config_without_peft_type_is_refused(twin, tmp_path):
    folder = _with_config(twin, tmp_path / "a")
    config = json.loads((folder / "adapter_config.json").read_text())
    del config["peft_type"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(jlora.ConfigError, match="no peft_type"):
        jlora.load(twin.flax_model.params, folder)
