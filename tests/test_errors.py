"""Bad input: every failure is a jlora.AdapterError naming the file/field/key, all problems at once."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from adapter_files import PREFIX, llama_lora_tensors, tiny_llama, write_adapter

import jlora


@pytest.fixture(scope="module")
def params():
    return tiny_llama().params


def base_config(**kw):
    return {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **kw}


def test_error_hierarchy():
    for cls in (jlora.ConfigError, jlora.CheckpointError, jlora.TargetMismatchError, jlora.SourceError,
                jlora.UnsupportedAdapterError):
        assert issubclass(cls, jlora.AdapterError)
    assert issubclass(jlora.AdapterError, ValueError)


def test_missing_folder(params, tmp_path):
    with pytest.raises(jlora.SourceError, match="not found|neither"):
        jlora.load(params, str(tmp_path / "nope"))


def test_missing_weights_file(params, tmp_path):
    folder = write_adapter(tmp_path / "a", tensors=False)
    with pytest.raises(jlora.SourceError, match="adapter_model.safetensors"):
        jlora.load(params, folder)


def test_pickle_only_adapter_is_refused(params, tmp_path):
    folder = write_adapter(tmp_path / "a", tensors=False)
    (folder / "adapter_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(jlora.CheckpointError, match="adapter_model.bin"):
        jlora.load(params, folder)


def test_malformed_json(params, tmp_path):
    with pytest.raises(jlora.ConfigError, match="adapter_config.json.*not valid JSON"):
        jlora.load(params, write_adapter(tmp_path / "a", config="{r: 4,"))
    with pytest.raises(jlora.ConfigError, match="JSON object"):
        jlora.load(params, write_adapter(tmp_path / "b", config="[1, 2]"))


def test_all_field_problems_listed_at_once(params, tmp_path):
    cfg = base_config(r=0, lora_alpha="big", bias="some", use_dora="yes", target_modules=3)
    with pytest.raises(jlora.ConfigError) as err:
        jlora.load(params, write_adapter(tmp_path / "a", config=cfg))
    text = str(err.value)
    assert "adapter_config.json" in text
    for field in ("r must", "lora_alpha", "bias", "use_dora", "target_modules"):
        assert field in text
    assert len(err.value.problems) == 5


@pytest.mark.parametrize("r", [-1, 0, "8", 2.5, True])
def test_bad_rank(r):
    with pytest.raises(jlora.ConfigError, match="r must be a positive integer"):
        jlora.LoraConfig(r=r)


@pytest.mark.parametrize("peft_type", ["IA3", "LOHA", "ADALORA", "PROMPT_TUNING"])
def test_other_peft_types_refused(params, tmp_path, peft_type):
    with pytest.raises(jlora.UnsupportedAdapterError, match=peft_type):
        jlora.load(params, write_adapter(tmp_path / "a", config=base_config(peft_type=peft_type)))


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga"])
def test_base_rewriting_inits_refused(params, tmp_path, init):
    with pytest.raises(jlora.UnsupportedAdapterError, match=init):
        jlora.load(params, write_adapter(tmp_path / "a", config=base_config(init_lora_weights=init)))


def test_unsupported_features_refused(params, tmp_path):
    cfg = base_config(megatron_config={"tensor_model_parallel_size": 2}, use_qalora=True)
    with pytest.raises(jlora.UnsupportedAdapterError) as err:
        jlora.load(params, write_adapter(tmp_path / "a", config=cfg))
    assert "megatron_config" in str(err.value) and "use_qalora" in str(err.value)


def test_unknown_fields_warn_and_round_trip(params, tmp_path):
    with pytest.warns(UserWarning, match="future_field"):
        cfg = jlora.LoraConfig.from_dict(base_config(future_field=1))
    assert cfg.to_dict()["future_field"] == 1


def test_non_float_tensor(params, tmp_path):
    tensors = llama_lora_tensors()
    key = next(iter(tensors))
    tensors[key] = tensors[key].astype(np.int32)
    with pytest.raises(jlora.CheckpointError, match="floating"):
        jlora.load(params, write_adapter(tmp_path / "a", tensors=tensors))


def test_nonfinite_values(params, tmp_path):
    tensors = llama_lora_tensors()
    key = sorted(tensors)[3]
    tensors[key][0, 0] = np.nan
    folder = write_adapter(tmp_path / "a", tensors=tensors)
    with pytest.raises(jlora.CheckpointError, match="NaN") as err:
        jlora.load(params, folder)
    assert key in str(err.value)
    assert jlora.load(params, folder, allow_nonfinite=True) is not None


def test_truncated_file(params, tmp_path):
    folder = write_adapter(tmp_path / "a")
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(jlora.CheckpointError, match="do not fit"):
        jlora.load(params, folder)
    path.write_bytes(b"\x01\x02")
    with pytest.raises(jlora.CheckpointError, match="too short"):
        jlora.load(params, folder)


def test_unmatched_modules_all_listed_with_closest_paths(params, tmp_path):
    tensors = llama_lora_tensors()
    rng = np.random.default_rng(0)
    for i in range(2):
        name = f"{PREFIX}model.layers.{i}.self_attn.qq_proj"
        tensors[f"{name}.lora_A.weight"] = rng.standard_normal((4, 32)).astype(np.float32)
        tensors[f"{name}.lora_B.weight"] = rng.standard_normal((32, 4)).astype(np.float32)
    with pytest.raises(jlora.TargetMismatchError) as err:
        jlora.load(params, write_adapter(tmp_path / "a", tensors=tensors))
    assert len(err.value.problems) == 2
    assert "model.layers.1.self_attn.qq_proj" in str(err.value) and "self_attn/q_proj" in str(err.value)


def test_shape_mismatches_all_listed(tmp_path):
    wrong_base = tiny_llama(hidden_size=16, intermediate_size=24).params
    with pytest.raises(jlora.TargetMismatchError) as err:
        jlora.load(wrong_base, write_adapter(tmp_path / "a"))
    # 2 layers x (q, v) x (A and B)
    assert len(err.value.problems) == 8
    assert "expected input size [16]" in str(err.value)


def test_rank_disagreeing_with_config(params, tmp_path):
    with pytest.raises(jlora.TargetMismatchError, match="config gives rank 8"):
        jlora.load(params, write_adapter(tmp_path / "a", config=base_config(r=8)))


def test_key_without_peft_prefix(params, tmp_path):
    tensors = {"model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((4, 32), np.float32)}
    with pytest.raises(jlora.CheckpointError, match="base_model.model."):
        jlora.load(params, write_adapter(tmp_path / "a", tensors=tensors))


def test_half_a_pair(params, tmp_path):
    tensors = {k: v for k, v in llama_lora_tensors().items() if "layers.0.self_attn.q_proj.lora_B" not in k}
    with pytest.raises(jlora.TargetMismatchError, match="no lora_B"):
        jlora.load(params, write_adapter(tmp_path / "a", tensors=tensors))


def test_dora_flag_disagreements(params, tmp_path):
    with pytest.raises(jlora.TargetMismatchError, match="no lora_magnitude_vector"):
        jlora.load(params, write_adapter(tmp_path / "a", config=base_config(use_dora=True)))


def test_tied_lm_head_explained(tmp_path):
    import transformers as tf

    gpt2 = tf.FlaxGPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=32))
    rng = np.random.default_rng(0)
    tensors = {f"{PREFIX}lm_head.lora_A.weight": rng.standard_normal((4, 32)).astype(np.float32),
               f"{PREFIX}lm_head.lora_B.weight": rng.standard_normal((64, 4)).astype(np.float32)}
    with pytest.raises(jlora.TargetMismatchError, match="ties its output head"):
        jlora.load(gpt2.params, write_adapter(tmp_path / "a", config=base_config(target_modules=["lm_head"]),
                                              tensors=tensors))


def test_module_without_an_adaptable_leaf_explained(tmp_path):
    """Wav2Vec2's positional conv is weight-normalised (weight_g, weight_v: no kernel); the error says so."""
    import transformers as tf

    cfg = tf.Wav2Vec2Config(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                            num_attention_heads=4, conv_dim=(16,), conv_stride=(5,), conv_kernel=(10,),
                            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, do_stable_layer_norm=True,
                            feat_extract_norm="layer")
    model = tf.FlaxWav2Vec2ForCTC(cfg)
    rng = np.random.default_rng(0)
    name = f"{PREFIX}wav2vec2.encoder.pos_conv_embed.conv"
    tensors = {f"{name}.lora_A.weight": rng.standard_normal((4, 8, 16)).astype(np.float32),
               f"{name}.lora_B.weight": rng.standard_normal((32, 4, 1)).astype(np.float32)}
    with pytest.raises(jlora.TargetMismatchError) as err:
        jlora.load(model.params, write_adapter(tmp_path / "a", config=base_config(target_modules=["conv"]),
                                               tensors=tensors))
    (problem,) = err.value.problems
    assert "'wav2vec2/encoder/pos_conv_embed/conv' holds no leaf" in problem
    assert "['bias', 'weight_g', 'weight_v']" in problem and "closest" not in problem


def test_params_not_a_tree(tmp_path):
    with pytest.raises(jlora.AdapterError, match="nested dict"):
        jlora.load([1, 2], write_adapter(tmp_path / "a"))


def test_subfolder_escape(params, tmp_path):
    write_adapter(tmp_path / "a")
    with pytest.raises(jlora.SourceError, match="subfolder"):
        jlora.load(params, tmp_path / "a", subfolder="../a")


def test_config_dataclass_round_trip():
    cfg = jlora.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"], rank_pattern={"q_proj": 4})
    again = jlora.LoraConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jlora.LoraConfig.from_dict(cfg.to_dict())


def test_dora_on_a_grouped_convolution_is_refused_clearly(tmp_path):
    """LoRA on grouped convs loads (tests/test_grouped_conv.py), DoRA on them does not: PEFT computes their weight
    norm from lora_B @ lora_A reshaped as if ungrouped, which is no weight norm of the layer. Only that conv named."""
    import transformers as tf
    from peft_twin import build_twin

    cfg = tf.RegNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8, num_labels=3)
    pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    twin = build_twin(tmp_path, tf.RegNetForImageClassification, tf.FlaxRegNetForImageClassification, cfg,
                      dict(r=4, lora_alpha=8, target_modules=["convolution"], use_dora=True),
                      inputs={"pixel_values": pixels})
    with pytest.raises(jlora.TargetMismatchError, match=r"grouped convolution \(groups=2\) with DoRA") as err:
        jlora.load(twin.flax_model.params, twin.adapter_dir)
    assert len(err.value.problems) == 1 and "stages.1.layers.0.layer.1.convolution" in err.value.problems[0]
