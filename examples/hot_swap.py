"""Hot swap: one compiled forward serves every adapter with the same targets.

Makes three variants of the bundled adapter (new values; another lora_alpha; a lower rank), loads each
with ``pad_rank=8`` so all have the same shapes, and runs them through one ``jax.jit(jlora.wrap(...))``:
it compiles once. Each output is checked against the merged model of that adapter.

    python examples/hot_swap.py
"""
import json
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import load_file, save_file
from transformers import FlaxLlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's jlora, installed or not
import jlora  # noqa: E402

ASSETS = Path(__file__).resolve().parent / "assets"


def variant(folder: Path, seed: int, *, rank: int | None = None, alpha: float | None = None) -> Path:
    """A copy of the bundled adapter with new random values, and optionally another rank or lora_alpha."""
    config = json.loads((ASSETS / "tiny-llama-lora" / "adapter_config.json").read_text())
    tensors = load_file(ASSETS / "tiny-llama-lora" / "adapter_model.safetensors")
    rng = np.random.default_rng(seed)
    rank = rank or config["r"]
    new = {}
    for key, value in tensors.items():
        value = value[:rank] if ".lora_A." in key else value[:, :rank]
        new[key] = (0.05 * rng.standard_normal(value.shape)).astype(value.dtype)
    config.update(r=rank, lora_alpha=alpha or config["lora_alpha"])
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(new, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def main() -> int:
    model = FlaxLlamaForCausalLM.from_pretrained(ASSETS / "tiny-llama")
    ids = np.arange(1, 9, dtype=np.int32)[None]
    compiles = []

    def logits(ids, params):
        compiles.append(1)  # runs once per trace: once for the probe, once per compilation
        return model(ids, params=params).logits

    forward = jax.jit(jlora.wrap(logits))
    with tempfile.TemporaryDirectory() as tmp:
        sources = {"bundled": ASSETS / "tiny-llama-lora",
                   "new values": variant(Path(tmp) / "a", 1),
                   "lora_alpha 64": variant(Path(tmp) / "b", 2, alpha=64),
                   "rank 4": variant(Path(tmp) / "c", 3, rank=4)}
        worst = 0.0
        for name, source in sources.items():
            lora_params = jlora.load(model.params, source, pad_rank=8)  # every adapter: rank axis 8 wide
            out = np.asarray(forward(ids, lora_params))
            want = np.asarray(model(ids, params=jlora.merge(lora_params)).logits)
            err = float(np.abs(out - want).max() / np.abs(want).max())
            worst = max(worst, err)
            print(f"{name:14s} traces so far: {len(compiles)}  max rel diff vs merged: {err:.1e}")
    ok = len(compiles) == 2 and worst < 1e-4
    print("OK: four adapters, one compilation" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
