"""``save(lora_params, out_dir)``: write the adapter back in PEFT's format, atomically.

Writes ``adapter_config.json`` and ``adapter_model.safetensors`` (PyTorch layouts, PEFT key names)
that ``peft.PeftModel.from_pretrained`` loads with no missing or unexpected keys. Both files are
first written completely to temporary names in ``out_dir`` (and flushed to disk), then renamed into
place, so a failure while writing leaves any previous adapter there intact. Tensors are gathered to
the host one module at a time (sharded trees included); in a multi-process run every process calls
``save`` and process 0 writes.

Example:
    >>> jlora.save(lora_params, "my-adapter")
    >>> PeftModel.from_pretrained(torch_model, "my-adapter")   # in PyTorch
"""
from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from .checkpoint import WEIGHTS_NAME, write_safetensors
from .config import CONFIG_NAME, LoraConfig
from .errors import AdapterError
from .layout import HfLayout, Layout
from .nnx_module import lora_tree
from .param_targets import wrapper_tensors
from .spec import PREFIX
from .targeting import module_scale
from .tree import (
    LORA_A,
    LORA_B,
    LORA_BIAS,
    LORA_DIAG,
    MAGNITUDE,
    RANK_SCALE,
    AdaptedModule,
    FactorSource,
    ModuleSpec,
    adapted_modules,
)


def _stub(x: Any) -> np.ndarray:
    """A zero-byte stand-in with ``x``'s shape and dtype (to learn output shapes without data)."""
    return np.broadcast_to(np.zeros((), np.dtype(x.dtype)), x.shape)


def _to_host(x: Any) -> np.ndarray:
    """One leaf gathered to this host (from every process when it spans several)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _source_values(node: AdaptedModule, source: FactorSource, fetch: Callable) -> dict[str, np.ndarray]:
    """PEFT's tensors (torch layout) for one source of an adapted kernel, by child key (``lora_A``, ...)."""
    spec, pl = node.spec, source.placement
    children = {k: fetch(node[k]) for k in (LORA_A, LORA_B, MAGNITUDE, LORA_BIAS, LORA_DIAG) if k in node}
    if spec.layer_axis is not None:
        children = {k: np.take(v, pl.layer, axis=min(spec.layer_axis, v.ndim - 1)) for k, v in children.items()}
    cols = slice(source.offset, source.offset + source.rank)
    padding = slice(cols.stop, spec.rank_block(source, children[LORA_A].shape[-1]).stop)
    if np.any(children[LORA_A][..., padding]) or np.any(children[LORA_B][padding]):
        raise AdapterError(f"save: {source.peft_name} has nonzero values in the padding past its rank {source.rank}. "
                           "The tree's metadata is probably stale: it came out of a jitted function first compiled "
                           "for another adapter (pad_rank makes different ranks share one). Rebuild it with "
                           "jlora.combine(trainable, frozen), `frozen` taken from this adapter's own load/init")
    a, b = children[LORA_A][..., cols], children[LORA_B][cols]
    off_blocks = [name for name, value, mask in ((LORA_A, a, pl.a_block_mask(source.rank)),
                                                 (LORA_B, b, pl.b_block_mask(source.rank)))
                  if mask is not None and np.any(value * (mask.reshape(value.shape) == 0))]
    if off_blocks:
        raise AdapterError(f"save: {source.peft_name}'s {' and '.join(off_blocks)} (block-diagonal: a grouped "
                           "convolution's LoRA or BD-LoRA) has nonzero values outside its diagonal blocks, which "
                           "PEFT's format cannot hold (train it through jlora.wrap or nnx_model, which keep them zero)")
    out_axis = None if pl.part_axis is None else pl.part_axis - pl.in_ndim
    if out_axis is not None:
        b = np.take(b, pl.part, axis=1 + out_axis)
    values = {LORA_A: pl.a_to_torch(a), LORA_B: pl.b_to_torch(b)}
    for child in (MAGNITUDE, LORA_BIAS):
        if child in children:
            v = children[child] if out_axis is None else np.take(children[child], pl.part, axis=out_axis)
            values[child] = pl.magnitude_to_torch(v) if child == MAGNITUDE else pl.out_to_torch(v)
    if LORA_DIAG in children:  # KaSA's singular values, one per rank column
        values[LORA_DIAG] = np.ascontiguousarray(children[LORA_DIAG][cols])
    return values


def _source_tensors(node: AdaptedModule, source: FactorSource, fetch: Callable) -> dict[str, np.ndarray]:
    """PEFT's tensors (torch layout, by PEFT key) for one source of an adapted kernel."""
    values = _source_values(node, source, fetch)
    return {f"{PREFIX}{source.peft_name}.{suffix}": values[child] for child, suffix in source.file_keys}


def _node_tensors(node: AdaptedModule, layout: Layout, fetch: Callable) -> dict[str, np.ndarray]:
    """Every PEFT tensor of one adapted module, its leaves read through ``fetch``."""
    if node.spec.adapters:
        raise AdapterError("the tree holds several adapters: save each with jlora.select(params, name)")
    if node.spec.wrapper:  # a LoRA on a parameter: its experts' factors as one ParamWrapper's two tensors
        return wrapper_tensors(node.spec.wrapper, [(source.placement.layer or 0, _source_values(node, source, fetch))
                                                   for source in node.spec.sources])
    out: dict[str, np.ndarray] = {}
    for source in node.spec.sources:
        out.update(_source_tensors(node, source, fetch))
    for child, suffix in node.spec.file_keys:
        value = fetch(node[child])
        if child in node.base_children():
            value = layout.torch_param(child)[1](value)
        out[f"{PREFIX}{node.spec.peft_name}.{suffix}"] = np.asarray(value)
    if node.spec.tied_copy:
        out.update(_tied_copy_tensors(node.spec, out))
    return out


def _tied_copy_tensors(spec: ModuleSpec, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tied output head's tensors that PEFT writes with ensure_weight_tying: the embedding's table (or
    base table) as is, and its LoRA factors as a Linear's: ``lora_A = lora_embedding_B.T``,
    ``lora_B = lora_embedding_A.T``."""
    own, head = f"{PREFIX}{spec.peft_name}.", f"{PREFIX}{spec.tied_copy}."
    renamed = {"weight": ("weight", False), "base_layer.weight": ("base_layer.weight", False),
               "lora_embedding_B": ("lora_A.weight", True), "lora_embedding_A": ("lora_B.weight", True)}
    out = {}
    for suffix, (head_suffix, transposed) in renamed.items():
        if own + suffix in tensors:
            value = tensors[own + suffix]
            out[head + head_suffix] = np.ascontiguousarray(value.T) if transposed else value
    return out


def to_peft_tensors(lora_params: Any, layout: Layout | None = None) -> dict[str, np.ndarray]:
    """``{PEFT key: array}`` (PyTorch layouts) for every adapter tensor in ``lora_params``.

    Stacked kernels come back as per-layer keys, fused ones as per-part keys, padding dropped.

    Example:
        >>> to_peft_tensors(lora_params)["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape
        (8, 64)
    """
    layout = layout or HfLayout()
    lora_params = lora_tree(lora_params) if isinstance(lora_params, nnx.Module) else lora_params
    out: dict[str, np.ndarray] = {}
    for _, node in adapted_modules(lora_params):
        out.update(_node_tensors(node, layout, _to_host))
    return out


def _source_scale(node: AdaptedModule, scale: np.ndarray, source: FactorSource) -> float:
    """The value of ``scale`` (the node's ``lora_scale`` on the host) that applies to ``source``'s rank columns."""
    if scale.ndim and node.spec.layer_axis is not None:
        scale = np.take(scale, source.placement.layer, axis=min(node.spec.layer_axis, scale.ndim - 1))
    return float(scale.reshape(-1)[source.offset])


def _config_json(lora_params: Any) -> str:
    """The adapter's config text, checked against the ``lora_scale`` leaves.

    ``config_json`` does not take part in jit cache keys, so a jitted function compiled for one adapter
    returns trees carrying that adapter's config text even when called with another of equal shapes.
    The scales are leaves and always current: a config that does not give them is such stale text.
    """
    nodes = [node for _, node in adapted_modules(lora_params)]
    configs = {node.spec.config_json for node in nodes}
    if not configs:
        raise AdapterError("save: the tree holds no adapter (no AdaptedModule); load or init one first")
    if len(configs) > 1:
        raise AdapterError("save: the tree holds adapters with different configs; save them one at a time")
    config_json = configs.pop()
    config = LoraConfig.from_dict(json.loads(config_json), source="the tree's adapter config", quiet=True)
    stale = []
    for node in (n for n in nodes if n.spec.sources):
        scale = _to_host(node[RANK_SCALE])  # once per module, however many layers/parts it holds
        for source in node.spec.sources:
            actual, expected = _source_scale(node, scale, source), module_scale(config, source.peft_name)
            if not math.isclose(actual, expected, rel_tol=1e-6):
                stale.append(f"{source.peft_name}: lora_scale {actual:g}, the config gives {expected:g}")
    if stale:
        raise AdapterError("save: the tree's adapter config does not match its lora_scale leaves. This tree probably "
                           "came out of a jitted function first compiled for another adapter of equal shapes (jit "
                           "outputs keep that adapter's config text). Rebuild it with jlora.combine(trainable, "
                           "frozen), `frozen` taken from this adapter's own load/init", stale)
    return config_json


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
    """Write ``lora_params``' adapter to ``out_dir`` in PEFT's format (see module docstring). ``lora_params`` may be
    an NNX module from ``jlora.load(model, source)``.

    Example:
        >>> jlora.save(lora_params, "out/my-adapter")
        >>> jlora.save(lora_model, "out/my-adapter")     # an adapted nnx.Module
    """
    lora_params = lora_tree(lora_params) if isinstance(lora_params, nnx.Module) else lora_params
    out = Path(out_dir)
    layout = HfLayout()
    nodes = [node for _, node in adapted_modules(lora_params)]
    owner, entries = {}, {}
    for i, node in enumerate(nodes):  # shapes first, from zero-byte stand-ins
        for key, stub in _node_tensors(node, layout, _stub).items():
            owner[key], entries[key] = i, (tuple(stub.shape), np.dtype(stub.dtype))
    config_json = _config_json(lora_params)
    current: dict[str, Any] = {"node": None, "tensors": {}}

    def produce(key: str) -> np.ndarray:  # one module's tensors on the host at a time
        if current["node"] != owner[key]:
            current["node"], current["tensors"] = owner[key], _node_tensors(nodes[owner[key]], layout, _to_host)
        return current["tensors"].pop(key)

    keys = sorted(entries, key=lambda k: (owner[k], k))
    entries = {k: entries[k] for k in keys}
    if jax.process_index() != 0:  # multi-process: every process gathers (collectively), process 0 writes
        for key in entries:
            produce(key)
        return out
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    writers = {WEIGHTS_NAME: lambda tmp: write_safetensors(tmp, entries, produce, metadata={"format": "pt"}),
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
        if created and not any(out.iterdir()):  # (a folder this call made: gone again, as if never called)
            out.rmdir()
        raise
    return out
