"""The jlora command line: `jlora merge` against PEFT's merge_and_unload() (the result loaded by transformers),
`jlora inspect` against the adapter files, clear errors with exit status 2, and --help."""
from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from adapter_files import write_adapter
from peft_twin import perturb_trainable
from safetensors.numpy import load_file

import jlora
from jlora.cli import build_parser, main

ROOT = Path(jlora.__file__).resolve().parent.parent


def llama_config(**kw):
    import transformers as tf

    return tf.LlamaConfig(**{**dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64), **kw})


def make_case(tmp: Path, model, lora_kwargs: dict, dtype=torch.float32, **save_kwargs):
    """Base checkpoint folder, adapter folder and PEFT's merge_and_unload() state dict for one model."""
    import peft

    model = model.to(dtype).eval()
    model.save_pretrained(tmp / "base", **save_kwargs)
    (tmp / "base" / "tokenizer.json").write_text('{"version": "1.0"}')  # a non-weight file to copy
    (tmp / "base" / "pytorch_model.bin").write_bytes(b"stale weights in another format")  # never copied
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(init_lora_weights=False, **lora_kwargs))
    perturb_trainable(pm, seed=1)
    pm.save_pretrained(tmp / "adapter")
    merged = pm.merge_and_unload()
    return tmp / "base", tmp / "adapter", merged


def assert_same_as_peft(out: Path, model_cls, peft_merged, dtype=torch.float32, inputs=None) -> None:
    """Our checkpoint and PEFT's merged model, both saved and loaded by transformers the same way, agree
    (weights within float32 rounding, bit-identical in bfloat16; logits)."""
    reference = out.parent / "peft-merged"
    peft_merged.save_pretrained(reference)
    got, info = model_cls.from_pretrained(out, dtype=dtype, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    want = model_cls.from_pretrained(reference, dtype=dtype).state_dict()
    for key, value in got.state_dict().items():
        w = want[key].float()
        err = float((value.float() - w).abs().max()) / max(float(w.abs().max()), 1e-12)
        assert err <= (1e-6 if dtype == torch.float32 else 0), (key, err)
    inputs = inputs or {"input_ids": torch.tensor([[1, 5, 9, 3, 60]])}
    with torch.no_grad():
        logits = model_cls.from_pretrained(reference, dtype=dtype)(**inputs).logits.float().numpy()
        # float32 rounding of each logit is relative to the largest ones (tens here), not to itself
        np.testing.assert_allclose(got(**inputs).logits.float().numpy(), logits, rtol=1e-5,
                                   atol=1e-6 * float(np.abs(logits).max()))


@pytest.fixture(scope="module")
def llama_single(tmp_path_factory):
    import transformers as tf

    torch.manual_seed(0)
    return make_case(tmp_path_factory.mktemp("single"), tf.LlamaForCausalLM(llama_config()), dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens", "lm_head"],
        rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3}, use_rslora=True))


def test_merge_single_file_llama_matches_peft(llama_single, tmp_path, capsys):
    import transformers as tf

    base, adapter, merged = llama_single
    stale = {"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}  # as transformers, ignored
    (base / "model.safetensors.index.json").write_text(json.dumps(stale))  # when model.safetensors exists
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    assert (out / "tokenizer.json").read_text() == (base / "tokenizer.json").read_text()
    assert_same_as_peft(out, tf.LlamaForCausalLM, merged)
    assert "jlora merge" in capsys.readouterr().err  # the progress bar


def test_merge_sharded_bfloat16_llama_with_dora_and_tokens_matches_peft(tmp_path):
    import transformers as tf

    torch.manual_seed(1)
    base, adapter, merged = make_case(tmp_path, tf.LlamaForCausalLM(llama_config()), dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"], use_dora=True,
        trainable_token_indices=[1, 3, 60]),
        dtype=torch.bfloat16, max_shard_size="8KB")
    shards = sorted(p.name for p in base.glob("model-*.safetensors"))
    assert len(shards) > 2
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("model-*.safetensors")) == shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["metadata"]["total_size"] == sum(v.nbytes for s in shards for v in load_file(out / s).values())
    assert_same_as_peft(out, tf.LlamaForCausalLM, merged, dtype=torch.bfloat16)


def gpt2_case(tmp: Path):
    import transformers as tf

    torch.manual_seed(2)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32))
    # Conv1D weights stored (in, out); wte LoRA also changes the tied lm_head, in PEFT and after loading
    return make_case(tmp, model, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc", "wte"],
                                      fan_in_fan_out=True, bias="all"))


def test_merge_gpt2_without_torch_matches_peft(tmp_path):
    """Runs in a fresh interpreter where `import torch` fails: jlora merge needs no torch."""
    import transformers as tf

    base, adapter, merged = gpt2_case(tmp_path)
    code = ("import sys; sys.modules['torch'] = None; from jlora.cli import main; "
            f"sys.exit(main(['merge', '--base', {str(base)!r}, '--adapter', {str(adapter)!r}, "
            f"'--out', {str(tmp_path / 'out')!r}, '--no-progress']))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lm_head.weight" not in load_file(tmp_path / "out" / "model.safetensors")  # still tied
    assert_same_as_peft(tmp_path / "out", tf.GPT2LMHeadModel, merged)


def test_merge_vit_conv_and_classifier_matches_peft(tmp_path):
    """Conv2d LoRA (weight (out, in, kh, kw)) and a modules_to_save classifier."""
    import transformers as tf

    torch.manual_seed(3)
    model = tf.ViTForImageClassification(tf.ViTConfig(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1,
                                                      num_attention_heads=2, intermediate_size=24, num_labels=3))
    base, adapter, merged = make_case(tmp_path, model, dict(r=2, lora_alpha=4, target_modules=["projection", "query"],
                                                            modules_to_save=["classifier"]))
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    assert_same_as_peft(tmp_path / "out", tf.ViTForImageClassification, merged,
                        inputs={"pixel_values": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))})


# ---- errors: exit status 2 and a message naming the problem ----------------------------------------------
def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_merge_errors_exit_2_and_write_nothing(llama_single, tmp_path, capsys):
    import transformers as tf

    base, adapter, _ = llama_single
    before = set(tmp_path.iterdir())
    other = tmp_path / "other-base"
    tf.LlamaForCausalLM(llama_config(hidden_size=16, intermediate_size=24)).save_pretrained(other)
    code, err = run_cli(capsys, "merge", "--base", str(other), "--adapter", str(adapter), "--out", str(tmp_path / "o"))
    assert code == 2 and "does not fit this parameter tree" in err and "expected input size [16]" in err
    assert "PyTorch" in err and "Flax" not in err

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    code, err = run_cli(capsys, "merge", "--base", str(base), "--adapter", str(adapter),
                        "--out", str(tmp_path / "full"))
    assert code == 2 and "not an empty folder" in err and (tmp_path / "full" / "x").read_text() == "keep me"

    code, err = run_cli(capsys, "merge", "--base", str(base), "--adapter", str(adapter), "--out", str(base / "m"))
    assert code == 2 and "outside the base checkpoint folder" in err

    bin_only = tmp_path / "bin-only"
    bin_only.mkdir()
    (bin_only / "pytorch_model.bin").write_bytes(b"...")
    code, err = run_cli(capsys, "merge", "--base", str(bin_only), "--adapter", str(adapter),
                        "--out", str(tmp_path / "o"))
    assert code == 2 and "model.safetensors" in err and "safetensors format only" in err

    code, err = run_cli(capsys, "merge", "--base", str(base), "--adapter", str(tmp_path / "nope"), "--out",
                        str(tmp_path / "o"))
    assert code == 2 and "nope" in err
    assert set(tmp_path.iterdir()) - before == {other, tmp_path / "full", bin_only}  # no output, no temp folders


EVIL_SHARDS = ("../evil.safetensors", "/tmp/evil.safetensors", "sub/x.safetensors", ".hidden.safetensors", "model.bin")


def test_merge_refuses_shard_names_outside_the_folder(tmp_path, capsys):
    """A crafted index cannot make jlora read or write files outside the base and out folders."""
    import transformers as tf

    base = tmp_path / "base"
    tf.LlamaForCausalLM(llama_config()).save_pretrained(base, max_shard_size="20KB")
    index = json.loads((base / "model.safetensors.index.json").read_text())
    keys = sorted(index["weight_map"])
    for key, evil in zip(keys, EVIL_SHARDS):
        index["weight_map"][key] = evil
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}
    adapter = write_adapter(tmp_path / "adapter", config, {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((4, 32), np.float32),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((32, 4), np.float32)})
    before = sorted(tmp_path.parent.iterdir())
    code, err = run_cli(capsys, "merge", "--base", str(base), "--adapter", str(adapter), "--out",
                        str(tmp_path / "out"))
    assert code == 2 and "shard names must be plain *.safetensors file names" in err
    for evil in EVIL_SHARDS:
        assert repr(evil) in err
    assert sorted(tmp_path.parent.iterdir()) == before and not (tmp_path / "out").exists()


def test_merge_refuses_lm_head_adapter_on_a_tied_checkpoint(tmp_path, capsys):
    import transformers as tf

    base = tmp_path / "base"
    config = tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=32)
    tf.GPT2LMHeadModel(config).save_pretrained(base)
    config = {"peft_type": "LORA", "r": 4, "target_modules": ["lm_head"]}
    adapter = write_adapter(tmp_path / "adapter", config, {
        "base_model.model.lm_head.lora_A.weight": np.ones((4, 32), np.float32),
        "base_model.model.lm_head.lora_B.weight": np.ones((64, 4), np.float32)})
    code, err = run_cli(capsys, "merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "o"))
    assert code == 2 and "ties its output head" in err and "lm_head" in err


# ---- inspect ----------------------------------------------------------------------------------------------
def test_inspect_text_and_json_describe_the_adapter_files(llama_single, capsys):
    _, adapter, _ = llama_single
    assert main(["inspect", str(adapter), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert info["parameters"] == sum(v.size for v in tensors.values())
    assert info["bytes"] == sum(v.nbytes for v in tensors.values())
    assert info["dtypes"] == {"F32": len(tensors)} and info["tensors"] == len(tensors)
    assert (info["r"], info["lora_alpha"], info["use_rslora"]) == (4, 8, True)
    assert info["rank_pattern"] == {"down_proj": 2} and info["alpha_pattern"] == {"v_proj": 3}
    groups = {g["module"]: g for g in info["groups"]}
    assert groups["q_proj"]["layers"] == "0-1" and groups["q_proj"]["count"] == 2
    assert groups["down_proj"]["ranks"] == [2] and groups["down_proj"]["scales"] == [pytest.approx(8 / 2**0.5)]
    assert groups["v_proj"]["scales"] == [pytest.approx(3 / 2)] and groups["lm_head"]["layers"] == ""
    assert info["layers"]["coverage"] == [{"layers": "0-1", "modules": ["down_proj", "q_proj", "v_proj"]}]
    assert info["nonfinite"] == []

    assert main(["inspect", str(adapter)]) == 0
    text = capsys.readouterr().out
    for phrase in ("r=4, lora_alpha=8, scale alpha/sqrt(r) = 4", "rank_pattern {'down_proj': 2}", "rsLoRA",
                   "q_proj", "layers 0-1", "0-1: down_proj, q_proj, v_proj", f"{info['parameters']:,} parameters",
                   "all finite"):
        assert phrase in text, phrase


def test_inspect_errors_exit_2(tmp_path, capsys):
    code, err = run_cli(capsys, "inspect", str(tmp_path / "missing"))
    assert code == 2 and "missing" in err
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": -1}')
    code, err = run_cli(capsys, "inspect", str(tmp_path / "a"))
    assert code == 2 and "r must be a positive integer" in err


# ---- help and the console script --------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["inspect", "merge"])
def test_help_explains_every_option(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    sub = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == command)[1]
    for action in sub._actions:
        assert action.help, action.dest
        for flag in action.option_strings or [action.metavar]:
            assert flag in text
    assert "HF_HUB_OFFLINE" in text and "Exit status" in text


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", "--base", "x"])
    assert exit_info.value.code == 2 and "--adapter" in capsys.readouterr().err


def test_console_script_is_declared():
    section = (ROOT / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0]
    module, func = re.search(r'^jlora = "([\w.]+):(\w+)"$', section, re.M).groups()  # tomllib needs 3.11
    assert module == "jlora.cli" and callable(getattr(jlora.cli, func))


def test_merge_untied_like_peft_when_a_tied_embedding_is_replaced(tmp_path):
    """modules_to_save on GPT-2's wte, which the head is tied to: PEFT's merge_and_unload unties them (the head
    keeps the old table, tie_word_embeddings false); jlora merge writes the same checkpoint."""
    import transformers as tf

    torch.manual_seed(3)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32))
    base, adapter, merged = make_case(tmp_path, model, dict(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                            modules_to_save=["wte"], fan_in_fan_out=True))
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    written = load_file(tmp_path / "out" / "model.safetensors")
    old_table = load_file(base / "model.safetensors")["transformer.wte.weight"]
    np.testing.assert_array_equal(written["lm_head.weight"], old_table)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    assert_same_as_peft(tmp_path / "out", tf.GPT2LMHeadModel, merged)
