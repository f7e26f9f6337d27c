"""``save(lora_params, out_dir)``: write the adapter back in PEFT's format, atomically.

Writes ``adapter_config.json`` and ``adapter_model.safetensors`` (PyTorch layouts, PEFT key names)
that ``peft.PeftModel.from_pretrained`` loads with no missing or unexpected keys. Each file is
written to a temporary name in ``out_dir`` and renamed into place, so a failure leaves any
previous adapter there intact.

Example:
    >>> jlora.save(lora_params, "my-adapter")
    >>> PeftModel.from_pretrained(torch_model, "my-adapter")   # in PyTorch
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.flax import save_file

from .checkpoint import WEIGHTS_NAME
from .config import CONFIG_NAME
from .errors import AdapterError
from .layout import HfLayout, Layout
from .spec import PREFIX
from .tree import LORA_A, LORA_B, LORA_BIAS, MAGNITUDE, AdaptedModule, FactorSource, adapted_modules


def _source_tensors(node: AdaptedModule, source: FactorSource) -> dict[str, np.ndarray]:
    """PEFT's tensors (torch layout) for one source of an adapted kernel."""
    spec, pl = node.spec, source.placement
    children = {k: np.asarray(node[k]) for k in (LORA_A, LORA_B, MAGNITUDE, LORA_BIAS) if k in node}
    if spec.layer_axis is not None:
        children = {k: np.take(v, pl.layer, axis=min(spec.layer_axis, v.ndim - 1)) for k, v in children.items()}
    cols = slice(source.offset, source.offset + source.rank)
    a, b = children[LORA_A][..., cols], children[LORA_B][cols]
    out_axis = None if pl.part_axis is None else pl.part_axis - pl.in_ndim
    if out_axis is not None:
        b = np.take(b, pl.part, axis=1 + out_axis)
    values = {LORA_A: pl.a_to_torch(a), LORA_B: pl.b_to_torch(b)}
    for child in (MAGNITUDE, LORA_BIAS):
        if child in children:
            v = children[child] if out_axis is None else np.take(children[child], pl.part, axis=out_axis)
            values[child] = pl.out_to_torch(v)
    return {f"{PREFIX}{source.peft_name}.{suffix}": values[child] for child, suffix in source.file_keys}


def to_peft_tensors(lora_params: Any, layout: Layout | None = None) -> dict[str, np.ndarray]:
    """``{PEFT key: array}`` (PyTorch layouts) for every adapter tensor in ``lora_params``.

    Stacked kernels come back as per-layer keys, fused ones as per-part keys, padding dropped.

    Example:
        >>> to_peft_tensors(lora_params)["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape
        (8, 64)
    """
    layout = layout or HfLayout()
    out: dict[str, np.ndarray] = {}
    for _, node in adapted_modules(lora_params):
        if node.spec.adapters:
            raise AdapterError("the tree holds several adapters: save each with jlora.select(params, name)")
        for source in node.spec.sources:
            out.update(_source_tensors(node, source))
        for child, suffix in node.spec.file_keys:
            value = node[child]
            if child in node.base_children():
                value = layout.torch_param(child)[1](value)
            out[f"{PREFIX}{node.spec.peft_name}.{suffix}"] = np.asarray(value)
    return out


def _config_json(lora_params: Any) -> str:
    configs = {node.spec.config_json for _, node in adapted_modules(lora_params)}
    if not configs:
        raise AdapterError("save: the tree holds no adapter (no AdaptedModule); load or init one first")
    if len(configs) > 1:
        raise AdapterError("save: the tree holds adapters with different configs; save them one at a time")
    return configs.pop()


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(lora_params: Any, out_dir: str | os.PathLike) -> Path:
    """Write ``lora_params``' adapter to ``out_dir`` in PEFT's format (see module docstring).

    Example:
        >>> jlora.save(lora_params, "out/my-adapter")
    """
    out = Path(out_dir)
    tensors = {k: jnp.asarray(np.ascontiguousarray(v)) for k, v in to_peft_tensors(lora_params).items()}
    config_json = _config_json(lora_params)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _atomic_write(out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(config_json + "\n", encoding="utf-8"))
    return out
