"""``save(lora_params, out_dir)``: write the adapter back in PEFT's format, atomically.

Writes ``adapter_config.json`` and ``adapter_model.safetensors`` (PyTorch layouts, PEFT key names)
that ``peft.PeftModel.from_pretrained`` loads with no missing or unexpected keys. Each file is
written to a temporary name in ``out_dir`` and renamed into place, so a failure leaves any
previous adapter there intact. Tensors are gathered to the host one leaf at a time (sharded
trees included); in a multi-process run every process calls ``save`` and process 0 writes.

Example:
    >>> jlora.save(lora_params, "my-adapter")
    >>> PeftModel.from_pretrained(torch_model, "my-adapter")   # in PyTorch
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from .checkpoint import WEIGHTS_NAME, write_safetensors
from .config import CONFIG_NAME
from .errors import AdapterError
from .layout import HfLayout, flax_to_torch_factors
from .spec import PREFIX
from .tree import LORA_A, LORA_B, adapted_modules


def _stub(x: Any) -> np.ndarray:
    """A zero-byte stand-in with ``x``'s shape and dtype (to learn output shapes without data)."""
    return np.broadcast_to(np.zeros((), np.dtype(x.dtype)), x.shape)


def _peft_tensor_makers(lora_params: Any, layout: HfLayout) -> dict[str, Callable[[Callable], Any]]:
    """``{PEFT key: make(fetch)}``: each tensor in PyTorch layout, built from ``fetch(leaf)`` of its leaf."""
    out: dict[str, Callable[[Callable], Any]] = {}
    for _, node in adapted_modules(lora_params):
        spec = node.spec
        base = node.base_children()
        for child, suffix in spec.file_keys:
            leaf = node[child]
            if spec.has_lora and child in (LORA_A, LORA_B):
                other, pos = (node[LORA_B], 0) if child == LORA_A else (node[LORA_A], 1)

                def make(fetch, leaf=leaf, other=other, pos=pos, ndim=len(spec.kernel_perm)):
                    pair = (fetch(leaf), _stub(other)) if pos == 0 else (_stub(other), fetch(leaf))
                    return flax_to_torch_factors(*pair, ndim)[pos]
            else:
                convert = layout.torch_param(child)[1] if child in base else (lambda x: x)

                def make(fetch, leaf=leaf, convert=convert):
                    return convert(fetch(leaf))
            out[f"{PREFIX}{spec.peft_name}.{suffix}"] = make
    return out


def to_peft_tensors(lora_params: Any, layout: HfLayout | None = None) -> dict[str, jax.Array]:
    """``{PEFT key: array}`` (PyTorch layouts) for every adapter tensor in ``lora_params``.

    Example:
        >>> to_peft_tensors(lora_params)["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape
        (8, 64)
    """
    makers = _peft_tensor_makers(lora_params, layout or HfLayout())
    return {key: make(lambda x: x) for key, make in makers.items()}


def _to_host(x: Any) -> np.ndarray:
    """One leaf gathered to this host (from every process when it spans several)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


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
    config_json = _config_json(lora_params)
    makers = _peft_tensor_makers(lora_params, HfLayout())
    entries = {}
    for key in sorted(makers):
        stub = makers[key](_stub)
        entries[key] = (tuple(stub.shape), np.dtype(stub.dtype))
    if jax.process_index() != 0:  # multi-process: every process gathers (collectively), process 0 writes
        for key in entries:
            makers[key](_to_host)
        return out
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / WEIGHTS_NAME, lambda tmp: write_safetensors(
        tmp, entries, lambda key: makers[key](_to_host), metadata={"format": "pt"}))
    _atomic_write(out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(config_json + "\n", encoding="utf-8"))
    return out
