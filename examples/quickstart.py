"""jlora quickstart: a PEFT LoRA adapter on a google-tunix Qwen3, unmerged under jit, merged, and saved.

Needs jax, flax, jlora and google-tunix (no torch, no peft, no transformers Flax classes):

    pip install -e ".[demo]"
    python examples/quickstart.py

The bundled tiny Qwen3 (``assets/tiny-qwen3``: a Hugging Face checkpoint, ``config.json`` + torch-format
``model.safetensors``) is loaded with tunix's own converter into its NNX model. The bundled PEFT adapter
(``assets/tiny-qwen3-lora``, rank 8 on every projection) is placed on the model's state by ``jlora.load`` (layout
"auto" finds tunix's) and run unmerged under ``jax.jit`` through ``jlora.nnx_model``, then merged, then saved in
PEFT's format and loaded back. Every result is checked against the logits PEFT itself computed for the same prompt
(``reference_logits.json``; regenerate the assets with ``python examples/make_assets.py tiny-qwen3``), and the
script exits non-zero on a mismatch.
"""
import json
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tunix.models.qwen3 import model as qwen3_model
from tunix.models.qwen3 import params as qwen3_params

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's jlora, installed or not
import jlora  # noqa: E402
from jlora.tree import adapted_modules  # noqa: E402

ASSETS = Path(__file__).resolve().parent / "assets"
MODEL, ADAPTER = ASSETS / "tiny-qwen3", ASSETS / "tiny-qwen3-lora"
TOLERANCE = 1e-4  # max |jlora - PEFT| / max |PEFT| over every position's logits
TUNIX_ROPE_THETA = 1_000_000  # tunix's Qwen3 rotates with this base whatever its config says


def tunix_config(folder: Path) -> qwen3_model.ModelConfig:
    """tunix's Qwen3 config for the Hugging Face checkpoint in ``folder`` (its ``config.json``)."""
    hf = json.loads((folder / "config.json").read_text())
    if hf["rope_theta"] != TUNIX_ROPE_THETA:
        raise ValueError(f"rope_theta {hf['rope_theta']}: tunix's Qwen3 uses {TUNIX_ROPE_THETA:.0e}")
    return qwen3_model.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"], num_heads=hf["num_attention_heads"], head_dim=hf["head_dim"],
        num_kv_heads=hf["num_key_value_heads"], rope_theta=TUNIX_ROPE_THETA, norm_eps=hf["rms_norm_eps"],
        use_tied_embedding=hf["tie_word_embeddings"])


def causal_inputs(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A plain causal forward's arguments for tunix's call on ``ids`` (batch, length), the cache (None) left out:
    the ids, their positions and the causal attention mask."""
    b, t = ids.shape
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    mask = np.broadcast_to(np.tril(np.ones((t, t), bool)), (b, t, t))
    return ids, positions, mask


def relative_error(got, want: np.ndarray) -> float:
    """max |got - want| / max |want|."""
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def main() -> int:
    model = qwen3_params.create_model_from_safe_tensors(str(MODEL), tunix_config(MODEL))  # tunix's own loader
    graphdef, state = nnx.split(model)
    lora_params = jlora.load(state, ADAPTER)  # layout "auto": tunix's
    ref = json.loads((ADAPTER / "reference_logits.json").read_text())
    inputs = causal_inputs(np.asarray(ref["input_ids"], dtype=np.int32))
    peft_ref, base_ref = np.asarray(ref["peft_logits"]), np.asarray(ref["base_logits"])

    @jax.jit
    def unmerged(lp, ids, positions, mask):  # the adapter beside each projection: x@W + s*(x@A)@B
        return jlora.nnx_model(graphdef, lp)(ids, positions, None, mask)[0]

    @jax.jit
    def plain(st, ids, positions, mask):  # tunix's forward of plain weights (the base, or merged ones)
        return nnx.merge(graphdef, st)(ids, positions, None, mask)[0]

    results = {"unmerged": unmerged(lora_params, *inputs)[0], "merged": plain(jlora.merge(lora_params), *inputs)[0]}
    with tempfile.TemporaryDirectory() as tmp:
        saved = jlora.save(lora_params, Path(tmp) / "adapter")  # PEFT's format again
        files = {f.name: f.stat().st_size for f in sorted(saved.iterdir())}
        results["saved, reloaded"] = unmerged(jlora.load(state, saved), *inputs)[0]
    base = np.asarray(plain(state, *inputs)[0])

    print(f"adapted modules: {len(adapted_modules(lora_params))}, prompt ids: {inputs[0][0].tolist()}")
    for name, got in results.items():
        print(f"max |jlora {name:15s} - PEFT| = {np.abs(got - peft_ref).max():.2e} "
              f"(relative {relative_error(got, peft_ref):.2e})")
    print(f"max |tunix base - PEFT's base| = {np.abs(base - base_ref).max():.2e}; "
          f"the adapter moves the logits by {np.abs(peft_ref - base_ref).max():.2e}")
    print("saved: " + ", ".join(f"{name} ({size:,} bytes)" for name, size in files.items()))
    print(f"next token (greedy): jlora {int(results['unmerged'][-1].argmax())}, PEFT {int(peft_ref[-1].argmax())}, "
          f"base model {int(base_ref[-1].argmax())}")

    worst = max(relative_error(got, peft_ref) for got in results.values())
    if worst > TOLERANCE or relative_error(base, base_ref) > TOLERANCE:
        print(f"FAIL: relative difference {worst:.2e} (base {relative_error(base, base_ref):.2e}) > {TOLERANCE:.0e}")
        return 1
    print(f"OK: jlora matches PEFT (relative difference {worst:.2e} <= {TOLERANCE:.0e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
