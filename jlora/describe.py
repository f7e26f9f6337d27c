"""``describe_adapter(source)``: what a PEFT LoRA adapter contains, from its config and its safetensors
header and tensors alone (no model needed). Powers ``jlora inspect``.

Example:
    >>> info = describe_adapter("user/my-adapter")
    >>> info["groups"][0]["module"], info["groups"][0]["layers"]
    ('q_proj', '0-31')
"""
from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from typing import Any

import numpy as np

from .checkpoint import WEIGHTS_NAME, read_header, read_safetensors
from .config import CONFIG_NAME, LoraConfig, read_json
from .hub import resolve_file
from .param_targets import targeted_parameters, wrapped_modules
from .spec import group_keys
from .targeting import layer_index, module_scale

_KINDS = (("lora_A", "LoRA"), ("emb_A", "LoRA (embedding)"), ("magnitude", "DoRA magnitude"),
          ("lora_bias", "lora_bias"), ("token_delta", "trainable tokens"))


def ranges(numbers: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2, 5, 7-8"``.

    Example:
        >>> ranges([0, 1, 2, 5])
        '0-2, 5'
    """
    out, numbers = [], sorted(set(numbers))
    start = prev = None
    for n in numbers + [None]:
        if start is not None and n == prev + 1:
            prev = n
            continue
        if start is not None:
            out.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = n
    return ", ".join(out)


def _pattern(name: str) -> str:
    """The module name with its numeric segments (layer indices) as ``*``."""
    return ".".join("*" if seg.isdigit() else seg for seg in name.split("."))


def _short_labels(patterns: list[str]) -> dict[str, str]:
    """The shortest dot-suffix of each pattern that no other pattern shares (``q_proj``, ``attn.c_proj``)."""
    labels = {}
    for pat in patterns:
        segs = [s for s in pat.split(".") if s != "*"]
        for n in range(1, len(segs) + 1):
            label = ".".join(segs[-n:])
            if not any(o != pat and ".".join(s for s in o.split(".") if s != "*").endswith(label) for o in patterns):
                break
        labels[pat] = label
    return labels


def _is_float(array: np.ndarray) -> bool:
    return np.issubdtype(array.dtype, np.floating) or array.dtype.kind == "V"  # ml_dtypes floats are kind "V"


def _kind(roles: dict, params: dict) -> str:
    kinds = [text for role, text in _KINDS if role in roles]
    if params:
        kinds.append("replaced " + "/".join(sorted({p.rpartition(".")[2] for p in params})))
    return " + ".join(kinds)


def _blocks(cfg: LoraConfig, name: str) -> str:
    """BD-LoRA: which of the module's factors is block-diagonal, with how many blocks (empty for neither)."""
    a_blocks, b_blocks = cfg.block_diagonal(name)
    return "".join(f" ({factor} block-diagonal, {n} blocks)" for factor, n in (("A", a_blocks), ("B", b_blocks))
                   if n > 1)


def describe_adapter(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """A JSON-ready summary of an adapter: config (rank, alpha, patterns, scale), adapted modules grouped
    by name with their layers, per-layer coverage, parameter count, bytes, dtypes and non-finite tensors.

    Example:
        >>> describe_adapter("path/to/adapter")["parameters"]
        262144
    """
    hub = dict(revision=revision, subfolder=subfolder, token=token, cache_dir=cache_dir)
    config_path = resolve_file(source, CONFIG_NAME, **hub)
    cfg = LoraConfig.from_dict(read_json(config_path), source=str(config_path))
    weights_path = resolve_file(source, WEIGHTS_NAME, **hub)
    header, _, _ = read_header(weights_path)
    groups = group_keys(header.keys(), str(weights_path))
    tensors = read_safetensors(weights_path)
    nonfinite = sorted(k for k, v in tensors.items() if _is_float(v) and not np.isfinite(v.astype(np.float32)).all())

    wrapped = wrapped_modules(cfg, groups)  # key group -> module (LoRA on parameters: its ParamWrappers)
    by_pattern: dict[str, list[str]] = defaultdict(list)
    for name in groups:
        by_pattern[_pattern(wrapped.get(name, name))].append(name)
    labels = _short_labels(sorted(by_pattern))
    per_layer: dict[int, set[str]] = defaultdict(set)
    out_groups = []
    for pat in sorted(by_pattern, key=lambda p: (layer_index(cfg, by_pattern[p][0]) is None, p)):  # layers first
        names = by_pattern[pat]
        layers = sorted({i for i in (layer_index(cfg, n) for n in names) if i is not None})
        for i in layers:
            per_layer[i].add(labels[pat])
        rows = sorted({(header[key]["shape"] or [0])[0] for key in
                       (groups[n].roles.get("lora_A") or groups[n].roles.get("emb_A") for n in names) if key})
        params = [f"{wrapped[n]}.{p}" for n in names if n in wrapped for p in targeted_parameters(cfg, wrapped[n])]
        kinds = {_kind(groups[n].roles, groups[n].params) + _blocks(cfg, n) for n in names if n not in wrapped}
        if params:  # (a ParamWrapper's lora_A has rank x experts rows; which parameter it is needs the model)
            kinds.add(f"LoRA on parameters {'/'.join(dict.fromkeys(p.rpartition('.')[2] for p in params))} "
                      f"(lora_A rows = rank x experts: {'/'.join(map(str, rows))})")
        out_groups.append({
            "module": labels[pat], "pattern": pat, "count": len(names), "layers": ranges(layers),
            "kind": ", ".join(sorted(kinds)),
            "ranks": [] if params else rows,
            "scales": sorted({round(module_scale(cfg, n), 6) for n in params or names}) if rows else [],
            "parameters": sum(int(np.prod(header[k]["shape"], dtype=np.int64)) for n in names
                              for k in (*groups[n].roles.values(), *groups[n].params.values())),
        })
    coverage: dict[tuple, list[int]] = defaultdict(list)
    for i in sorted(per_layer):
        coverage[tuple(sorted(per_layer[i]))].append(i)
    nbytes = {k: e["data_offsets"][1] - e["data_offsets"][0] for k, e in header.items()}
    dtypes = Counter(e["dtype"] for e in header.values())
    return {
        "source": str(source), "revision": revision, "subfolder": subfolder,
        "peft_type": cfg.peft_type, "peft_version": cfg.peft_version, "base_model": cfg.base_model_name_or_path,
        "task_type": cfg.task_type,
        "r": cfg.r, "lora_alpha": cfg.lora_alpha, "scale_rule": cfg.scale_kind,
        "scale": cfg.lora_alpha / (math.sqrt(cfg.r) if cfg.use_rslora else cfg.r),
        "rank_pattern": cfg.rank_pattern, "alpha_pattern": cfg.alpha_pattern,
        "use_rslora": cfg.use_rslora, "use_dora": cfg.use_dora, "bias": cfg.bias, "lora_bias": cfg.lora_bias,
        "modules_to_save": cfg.modules_to_save, "trainable_token_indices": cfg.trainable_token_indices,
        "target_modules": cfg.target_modules, "target_parameters": cfg.target_parameters,
        "alora_invocation_tokens": cfg.alora_invocation_tokens, "use_bdlora": cfg.use_bdlora,
        "layer_replication": cfg.layer_replication, "kasa_config": cfg.kasa_config,
        "modules": len(groups), "groups": out_groups,
        "layers": {"count": len(per_layer), "indices": ranges(list(per_layer)),
                   "coverage": [{"layers": ranges(idx), "modules": list(mods)} for mods, idx in coverage.items()]},
        "tensors": len(header), "parameters": sum(int(np.prod(e["shape"], dtype=np.int64)) for e in header.values()),
        "bytes": sum(nbytes.values()), "dtypes": dict(sorted(dtypes.items())), "nonfinite": nonfinite,
    }


def format_description(info: dict[str, Any]) -> str:
    """The human-readable text ``jlora inspect`` prints for :func:`describe_adapter`'s result."""
    where = info["source"] + "".join(f" ({k} {info[k]})" for k in ("revision", "subfolder") if info[k])
    lines = [f"adapter     {where}"]
    about = [f"{info['peft_type']}"]
    if info["peft_version"]:
        about.append(f"PEFT {info['peft_version']}")
    if info["base_model"]:
        about.append(f"base model {info['base_model']}")
    if info["task_type"]:
        about.append(f"task {info['task_type']}")
    lines.append("type        " + ", ".join(about))
    rank = f"r={info['r']}, lora_alpha={info['lora_alpha']:g}, scale {info['scale_rule']} = {info['scale']:g}"
    for key in ("rank_pattern", "alpha_pattern"):
        if info[key]:
            rank += f"; {key} {info[key]}"
    lines.append("rank        " + rank)
    options = [name for name, on in (("DoRA", info["use_dora"]), ("rsLoRA", info["use_rslora"]),
                                     ("lora_bias", info["lora_bias"])) if on]
    if info["bias"] != "none":
        options.append(f"bias={info['bias']}")
    if info["modules_to_save"]:
        options.append(f"modules_to_save {info['modules_to_save']}")
    if info["trainable_token_indices"]:
        options.append(f"trainable tokens {info['trainable_token_indices']}")
    if info["target_parameters"]:
        options.append(f"target_parameters {info['target_parameters']}")
    if info["alora_invocation_tokens"]:
        options.append(f"aLoRA (invocation tokens {info['alora_invocation_tokens']})")
    if info["use_bdlora"]:
        options.append(f"BD-LoRA ({info['use_bdlora'].get('nblocks', 1)} blocks)")
    if info["kasa_config"] is not None:
        options.append(f"KaSA {info['kasa_config']}")
    if info["layer_replication"]:
        options.append(f"layer_replication {info['layer_replication']} (jlora.replicate_layers)")
    if options:
        lines.append("options     " + ", ".join(options))
    lines.append(f"modules     {info['modules']} adapted, in {len(info['groups'])} group"
                 f"{'s' if len(info['groups']) != 1 else ''}")
    width = max([len(g["module"]) for g in info["groups"]] + [6])
    for g in info["groups"]:
        layers = f"layers {g['layers']}" if g["layers"] else "no layer index"
        scales = "/".join(f"{s:g}" for s in g["scales"])
        rank = f"r={'/'.join(map(str, g['ranks']))} scale {scales}" if g["ranks"] else scales and f"scale {scales}"
        lines.append(f"  {g['module']:<{width}}  {layers:<18} x{g['count']:<4} {rank:<18} {g['kind']}".rstrip())
    layers = info["layers"]
    if layers["count"]:
        lines.append(f"layers      {layers['count']} adapted ({layers['indices']})")
        for cov in layers["coverage"]:
            lines.append(f"  {cov['layers']}: {', '.join(cov['modules'])}")
    dtypes = ", ".join(f"{k} x{v}" for k, v in info["dtypes"].items())
    lines.append(f"tensors     {info['tensors']}, {info['parameters']:,} parameters, {_size(info['bytes'])}; {dtypes}")
    bad = info["nonfinite"]
    lines.append("values      all finite" if not bad else f"values      NaN or Inf in {len(bad)} tensor"
                 f"{'s' if len(bad) > 1 else ''}: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
    return "\n".join(lines)


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
