"""``save(lora_params, out_dir)``: write the adapter back in PEFT's format, atomically.

Writes ``adapter_config.json`` and ``adapter_model.safetensors`` (PyTorch layouts, PEFT key names)
that ``peft.PeftModel.from_pretrained`` loads with no missing or unexpected keys. Both files are
first written completely to temporary names in ``out_dir`` (and flushed to disk), then renamed into
place, so a failure while writing leaves any previous adapter there intact.

Example:
    >>> jlora.save(lora_params, "my-adapter")
    >>> PeftModel.from_pretrained(torch_model, "my-adapter")   # in PyTorch
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.flax import save_file

from .checkpoint import WEIGHTS_NAME
from .config import CONFIG_NAME
from .errors import AdapterError
from .layout import HfLayout, flax_to_torch_factors
from .spec import PREFIX
from .tree import LORA_A, LORA_B, adapted_modules


def to_peft_tensors(lora_params: Any, layout: HfLayout | None = None) -> dict[str, jax.Array]:
    """``{PEFT key: array}`` (PyTorch layouts) for every adapter tensor in ``lora_params``.

    Example:
        >>> to_peft_tensors(lora_params)["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape
        (8, 64)
    """
    layout = layout or HfLayout()
    out: dict[str, jax.Array] = {}
    for _, node in adapted_modules(lora_params):
        spec = node.spec
        converted = {}
        if spec.has_lora:
            kernel_ndim = len(spec.kernel_perm)
            converted[LORA_A], converted[LORA_B] = flax_to_torch_factors(node[LORA_A], node[LORA_B], kernel_ndim)
        for child, suffix in spec.file_keys:
            value = converted.get(child)
            if value is None:
                value = layout.torch_param(child)[1](node[child]) if child in node.base_children() else node[child]
            out[f"{PREFIX}{spec.peft_name}.{suffix}"] = value
    return out


def _config_json(lora_params: Any) -> str:
    configs = {node.spec.config_json for _, node in adapted_modules(lora_params)}
    if not configs:
        raise AdapterError("save: the tree holds no adapter (no AdaptedModule); load or init one first")
    if len(configs) > 1:
        raise AdapterError("save: the tree holds adapters with different configs; save them one at a time")
    return configs.pop()


def _write_temp(path: Path, write) -> str:
    """``write(tmp)`` to a temporary file next to ``path``, flushed to disk; its name. Removed on failure."""
    tmp = str(path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp"))
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    mode = os.stat(tmp).st_mode  # what the umask allows, as for open(); kept even if `write` replaces the file
    try:
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def save(lora_params: Any, out_dir: str | os.PathLike) -> Path:
    """Write ``lora_params``' adapter to ``out_dir`` in PEFT's format (see module docstring).

    Example:
        >>> jlora.save(lora_params, "out/my-adapter")
    """
    out = Path(out_dir)
    config_json = _config_json(lora_params)
    tensors = {k: jnp.asarray(np.ascontiguousarray(np.asarray(v))) for k, v in to_peft_tensors(lora_params).items()}
    out.mkdir(parents=True, exist_ok=True)
    writers = {WEIGHTS_NAME: lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}),
               CONFIG_NAME: lambda tmp: Path(tmp).write_text(config_json + "\n", encoding="utf-8")}
    temps: dict[str, str] = {}
    try:  # both files complete before either replaces its old version
        for name, write in writers.items():
            temps[name] = _write_temp(out / name, write)
        for name, tmp in temps.items():
            os.replace(tmp, out / name)
    except BaseException:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise
    return out
