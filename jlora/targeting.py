"""PEFT's rules for which module a LoRA config targets, and with what rank, alpha and scale.

Names are PyTorch module names without the ``base_model.model.`` prefix, e.g.
``model.layers.0.self_attn.q_proj``.

Example:
    >>> cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"], rank_pattern={"layers.0.q_proj": 4})
    >>> is_targeted(cfg, "model.layers.0.self_attn.q_proj"), module_scale(cfg, "model.layers.0.self_attn.q_proj")
    (True, 4.0)
"""
from __future__ import annotations

import math
import re

from .config import LoraConfig


def _pattern_key(patterns: dict, name: str) -> str | None:
    """The first pattern key matching ``name`` as a whole or as a dot-bounded suffix (PEFT's rule)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def module_rank(cfg: LoraConfig, name: str) -> int:
    key = _pattern_key(cfg.rank_pattern, name)
    return cfg.r if key is None else cfg.rank_pattern[key]


def module_alpha(cfg: LoraConfig, name: str) -> float:
    key = _pattern_key(cfg.alpha_pattern, name)
    return cfg.lora_alpha if key is None else cfg.alpha_pattern[key]


def module_scale(cfg: LoraConfig, name: str) -> float:
    """``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA), with rank/alpha patterns applied."""
    r, alpha = module_rank(cfg, name), module_alpha(cfg, name)
    return alpha / math.sqrt(r) if cfg.use_rslora else alpha / r


def _matches_name_list(names: list[str], name: str) -> bool:
    return name in names or any(name.endswith("." + n) for n in names)


def is_excluded(cfg: LoraConfig, name: str) -> bool:
    ex = cfg.exclude_modules
    if not ex:
        return False
    return bool(re.fullmatch(ex, name)) if isinstance(ex, str) else _matches_name_list(ex, name)


def is_module_to_save(cfg: LoraConfig, name: str) -> bool:
    """True when ``name`` is (inside) one of ``modules_to_save``."""
    return any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in cfg.modules_to_save or ())


def layer_index(cfg: LoraConfig, name: str) -> int | None:
    """The layer number PEFT reads from a module name for ``layers_to_transform``."""
    patterns = cfg.layers_pattern
    if not patterns:
        m = re.match(r".*?\.[^.]*\.(\d+)\.", name)
    else:
        m = None
        for p in [patterns] if isinstance(patterns, str) else patterns:
            m = re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", name)
            if m:
                break
    return int(m.group(1)) if m else None


def is_targeted(cfg: LoraConfig, name: str) -> bool:
    """PEFT's ``check_target_module_exists`` for a single module name."""
    if is_excluded(cfg, name) or is_module_to_save(cfg, name):
        return False
    targets = cfg.target_modules
    if targets is None:
        return False
    if isinstance(targets, str):
        return bool(re.fullmatch(targets, name))
    if name in targets:
        return True
    if not any(name.endswith("." + t) for t in targets):
        return False
    wanted = cfg.layers_to_transform
    if wanted is None or wanted == []:
        return True
    idx = layer_index(cfg, name)
    if idx is None:
        return False
    return idx == wanted if isinstance(wanted, int) else idx in wanted
