"""Parity with PEFT across architectures: jlora.wrap and jlora.merge vs PeftModel.from_pretrained."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf
from peft_twin import assert_saves_back, build_twin, flax_logits_plain, flax_logits_wrapped, rel_err, torch_logits

import jlora

TOL = 1e-4
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)


def llama():
    return tf.LlamaForCausalLM, tf.FlaxLlamaForCausalLM, tf.LlamaConfig(num_key_value_heads=2, **SMALL)


def mistral():
    return tf.MistralForCausalLM, tf.FlaxMistralForCausalLM, tf.MistralConfig(num_key_value_heads=2,
                                                                                sliding_window=32, **SMALL)


def gemma():
    return tf.GemmaForCausalLM, tf.FlaxGemmaForCausalLM, tf.GemmaConfig(num_key_value_heads=2, head_dim=8, **SMALL)


def gpt2():
    cfg = tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return tf.GPT2LMHeadModel, tf.FlaxGPT2LMHeadModel, cfg


def opt():
    cfg = tf.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=64, word_embed_proj_dim=32)
    return tf.OPTForCausalLM, tf.FlaxOPTForCausalLM, cfg


def bert_cls():
    cfg = tf.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, num_labels=3)
    return tf.BertForSequenceClassification, tf.FlaxBertForSequenceClassification, cfg


SEQ2SEQ = dict(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64)


def bart():
    return tf.BartForConditionalGeneration, tf.FlaxBartForConditionalGeneration, tf.BartConfig(**SEQ2SEQ)


def seq2seq(name: str, **extra):
    """A Bart-family translation/summarisation model (MBart, Marian, Pegasus, Blenderbot, BlenderbotSmall)."""
    torch_cls, flax_cls = ({"Marian": (tf.MarianMTModel, tf.FlaxMarianMTModel)}.get(name) or
                           (getattr(tf, f"{name}ForConditionalGeneration"),
                            getattr(tf, f"Flax{name}ForConditionalGeneration")))
    return lambda: (torch_cls, flax_cls, getattr(tf, f"{name}Config")(**SEQ2SEQ, **extra))


def bart_inputs(cfg):
    rng = np.random.default_rng(0)
    return {"input_ids": rng.integers(3, cfg.vocab_size, size=(2, 7)).astype(np.int32),
            "decoder_input_ids": rng.integers(3, cfg.vocab_size, size=(2, 5)).astype(np.int32)}


def gpt_neo():
    cfg = tf.GPTNeoConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
                          attention_types=[[["global", "local"], 1]], window_size=4, max_position_embeddings=64)
    return tf.GPTNeoForCausalLM, tf.FlaxGPTNeoForCausalLM, cfg


def gptj():
    cfg = tf.GPTJConfig(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4, n_inner=48)
    return tf.GPTJForCausalLM, tf.FlaxGPTJForCausalLM, cfg


def roberta_cls():
    cfg = tf.RobertaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=70, num_labels=3)
    return tf.RobertaForSequenceClassification, tf.FlaxRobertaForSequenceClassification, cfg


def clip():
    cfg = tf.CLIPConfig(projection_dim=16,
                        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=16),
                        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=16, patch_size=8))
    return tf.CLIPModel, tf.FlaxCLIPModel, cfg


def clip_inputs(cfg):
    rng = np.random.default_rng(0)
    return {"input_ids": rng.integers(3, cfg.text_config.vocab_size, size=(2, 7)).astype(np.int32),
            "pixel_values": rng.standard_normal((2, 3, 16, 16)).astype(np.float32)}


def whisper():
    cfg = tf.WhisperConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                           decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, num_mel_bins=8,
                           max_source_positions=16, max_target_positions=16, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2, decoder_start_token_id=1)
    return tf.WhisperForConditionalGeneration, tf.FlaxWhisperForConditionalGeneration, cfg


def whisper_inputs(cfg):
    rng = np.random.default_rng(0)
    frames = 2 * cfg.max_source_positions  # Whisper's two convs halve the frames to max_source_positions
    return {"input_features": rng.standard_normal((2, cfg.num_mel_bins, frames)).astype(np.float32),
            "decoder_input_ids": rng.integers(3, cfg.vocab_size, size=(2, 5)).astype(np.int32)}


def bloom():  # one fused query_key_value Dense, heads interleaved (PEFT sees a plain Linear)
    cfg = tf.BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)
    return tf.BloomForCausalLM, tf.FlaxBloomForCausalLM, cfg


def xglm():
    cfg = tf.XGLMConfig(vocab_size=64, d_model=32, ffn_dim=48, num_layers=2, attention_heads=4,
                        max_position_embeddings=64)
    return tf.XGLMForCausalLM, tf.FlaxXGLMForCausalLM, cfg


def distilbert_cls():
    cfg = tf.DistilBertConfig(vocab_size=64, dim=32, hidden_dim=48, n_layers=2, n_heads=4, max_position_embeddings=64,
                              num_labels=3)
    return tf.DistilBertForSequenceClassification, tf.FlaxDistilBertForSequenceClassification, cfg


def albert():  # one layer group shared by every layer: PEFT's modules (and jlora's leaves) exist once
    cfg = tf.AlbertConfig(vocab_size=64, embedding_size=16, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=64)
    return tf.AlbertForMaskedLM, tf.FlaxAlbertForMaskedLM, cfg


def encoder(name: str, **extra):
    """A BERT-shaped masked LM (BigBird, RoFormer, XLM-RoBERTa, RoBERTa-PreLayerNorm)."""
    cfg = getattr(tf, f"{name}Config")(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=64, **extra)
    return lambda: (getattr(tf, f"{name}ForMaskedLM"), getattr(tf, f"Flax{name}ForMaskedLM"), cfg)


def beit_cls():
    cfg = tf.BeitConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_labels=3)
    return tf.BeitForImageClassification, tf.FlaxBeitForImageClassification, cfg


def dinov2():
    cfg = tf.Dinov2Config(image_size=32, patch_size=8, hidden_size=32, mlp_ratio=2, num_hidden_layers=2,
                          num_attention_heads=4)
    return tf.Dinov2Model, tf.FlaxDinov2Model, cfg


def resnet_cls():  # Conv2d + batch norm (its running statistics stay the base's)
    cfg = tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    return tf.ResNetForImageClassification, tf.FlaxResNetForImageClassification, cfg


def image_inputs(cfg):
    return {"pixel_values": np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)}


def wav2vec2_ctc():  # the Conv1d feature extractor; Flax implements only the stable-layer-norm variant
    cfg = tf.Wav2Vec2Config(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, do_stable_layer_norm=True,
                            feat_extract_norm="layer")
    return tf.Wav2Vec2ForCTC, tf.FlaxWav2Vec2ForCTC, cfg


def audio_inputs(cfg):
    return {"input_values": np.random.default_rng(0).standard_normal((2, 800)).astype(np.float32)}


def expose_conv_strides(peft_model) -> None:
    """PEFT's LoRA wrapper of an nn.Conv1d hides the layer's ``stride``, which Whisper's encoder reads:
    give the wrappers their base layer's (a harness fix; the math is PEFT's own)."""
    for module in peft_model.modules():
        if hasattr(module, "base_layer") and isinstance(module.base_layer, torch.nn.Conv1d):
            module.stride = module.base_layer.stride


SEQ2SEQ_MODELS = ("MBart", "Marian", "Pegasus", "Blenderbot", "BlenderbotSmall")
INPUTS = {"bart": bart_inputs, "clip": clip_inputs, "whisper": whisper_inputs, "whisper_conv_dora": whisper_inputs,
          "beit_cls": image_inputs, "dinov2": image_inputs, "resnet_cls": image_inputs, "wav2vec2_ctc": audio_inputs,
          **{name.lower(): bart_inputs for name in SEQ2SEQ_MODELS}}
SEQ2SEQ_LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1", "fc2"])
ENCODER_LORA = dict(r=4, lora_alpha=8, target_modules=["query", "key", "value", "dense"])


CASES = {
    "llama": (llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"])),
    "mistral": (mistral, dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])),
    "gemma": (gemma, dict(r=8, lora_alpha=4, target_modules=["q_proj", "o_proj", "up_proj"])),
    "gpt2": (gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    "opt": (opt, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "out_proj", "fc1", "fc2"])),
    "bert_seq_cls": (bert_cls, dict(r=4, lora_alpha=8, target_modules=["query", "value", "dense"],
                                    modules_to_save=["classifier"])),
    "bart": (bart, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1", "out_proj"])),
    "gpt_neo": (gpt_neo, dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "c_fc",
                                                                 "c_proj"])),
    "gptj": (gptj, dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc_in",
                                                           "fc_out"])),
    "roberta_seq_cls": (roberta_cls, dict(r=4, lora_alpha=8, target_modules=["query", "value", "dense"],
                                          modules_to_save=["classifier"])),
    "clip": (clip, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1", "out_proj", "patch_embedding",
                                                           "text_projection", "visual_projection"])),
    "whisper": (whisper, dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1",
                                                                 "fc2", "conv1", "conv2"])),
    "whisper_conv_dora": (whisper, dict(r=4, lora_alpha=8, target_modules=["conv1", "conv2", "q_proj"],
                                        use_dora=True)),
    "bloom": (bloom, dict(r=4, lora_alpha=8, target_modules=["query_key_value", "dense", "dense_h_to_4h",
                                                             "dense_4h_to_h"])),
    "xglm": (xglm, dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])),
    "distilbert_cls": (distilbert_cls, dict(r=4, lora_alpha=8, target_modules=["q_lin", "k_lin", "v_lin", "out_lin",
                                                                                "lin1", "lin2"],
                                            modules_to_save=["pre_classifier", "classifier"])),
    "albert": (albert, dict(r=4, lora_alpha=8, target_modules=["query", "key", "value", "dense", "ffn", "ffn_output"])),
    **{name.lower(): (seq2seq(name, **({"decoder_start_token_id": 0, "pad_token_id": 1} if name == "Marian" else {})),
                      SEQ2SEQ_LORA) for name in SEQ2SEQ_MODELS},
    "bigbird": (encoder("BigBird", attention_type="original_full"), ENCODER_LORA),
    "roformer": (encoder("RoFormer"), ENCODER_LORA),
    "xlm_roberta": (encoder("XLMRoberta"), ENCODER_LORA),
    "roberta_prelayernorm": (encoder("RobertaPreLayerNorm"), ENCODER_LORA),
    "beit_cls": (beit_cls, dict(r=4, lora_alpha=8, target_modules=["query", "value", "dense"],
                                modules_to_save=["classifier"])),
    "dinov2": (dinov2, dict(r=4, lora_alpha=8, target_modules=["query", "value", "fc1", "fc2"])),
    "resnet_cls": (resnet_cls, dict(r=2, lora_alpha=4, target_modules=["convolution"],
                                    modules_to_save=["classifier.1"])),
    "wav2vec2_ctc": (wav2vec2_ctc, dict(r=4, lora_alpha=8, target_modules=r".*(q_proj|v_proj|intermediate_dense|"
                                        r"output_dense|conv_layers\.\d+\.conv|feature_projection\.projection)")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_architecture_parity(name, tmp_path):
    make, lora = CASES[name]
    torch_cls, flax_cls, cfg = make()
    inputs = INPUTS[name](cfg) if name in INPUTS else None
    twin = build_twin(tmp_path, torch_cls, flax_cls, cfg, lora, inputs=inputs)
    expose_conv_strides(twin.peft_model)
    want = torch_logits(twin.peft_model, twin.inputs)
    base = flax_logits_plain(twin, twin.flax_model.params)
    assert rel_err(base, want) > 100 * TOL, "the adapter should change the output"

    lora_params = jlora.load(twin.flax_model.params, twin.adapter_dir)
    assert rel_err(flax_logits_wrapped(twin, lora_params), want) <= TOL
    merged_want = torch_logits(twin.peft_model.merge_and_unload(), twin.inputs)
    assert rel_err(flax_logits_plain(twin, jlora.merge(lora_params)), merged_want) <= TOL
    assert_saves_back(lora_params, twin.adapter_dir, tmp_path / "saved")

