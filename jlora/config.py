"""LoraConfig: the contents of PEFT's ``adapter_config.json``, parsed and validated.

Example:
    >>> cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    >>> cfg.to_dict()["r"]
    8
    >>> cfg = LoraConfig.from_pretrained("path/to/adapter")   # or "user/repo"
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import numbers
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, UnsupportedAdapterError

CONFIG_NAME = "adapter_config.json"
MAX_RANK = 2**31 - 1  # larger ranks cannot be tensor dimensions of any real adapter

# PEFT init modes that rewrite the base weights: the adapter file alone cannot reproduce them.
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "astra")
KNOWN_INITS = (True, False, "gaussian", "kaiming", "orthogonal", "eva", "mica", "nora")

# Fields PEFT refuses as null (it fails on them); every other field's null means what PEFT makes of it.
NULL_REFUSED = ("r", "lora_alpha", "lora_dropout", "bias")
# PEFT tests ``init_lora_weights`` for truth: a null is False (no reset), not the default True.
NULL_MEANS = {"init_lora_weights": False}

# Keys of configs written by other tools, to say what a file is when it is not PEFT's.
FOREIGN_FORMATS = {
    "lora_parameters": "an mlx-lm adapter config (mlx_lm.lora writes lora_parameters / fine_tune_type)",
    "fine_tune_type": "an mlx-lm adapter config (mlx_lm.lora writes lora_parameters / fine_tune_type)",
    "lora_layers": "an mlx-lm adapter config (mlx_lm.lora writes lora_layers)",
}

# Fields PEFT knows whose non-default values change the model in ways jlora does not implement.
UNSUPPORTED_WHEN_SET = {
    "use_qalora": "QA-LoRA",
    "arrow_config": "an Arrow router adapter: load the task adapters together and route them with jlora.arrow",
    "megatron_config": "Megatron parallel layers",
}


@dataclass
class LoraConfig:
    """PEFT's LoraConfig, field for field (PEFT 0.22 defaults). Only ``r``, ``lora_alpha``,
    ``target_modules`` and friends change what jlora computes; the rest round-trips to
    ``adapter_config.json`` unchanged.

    Example:
        >>> LoraConfig(r=4, lora_alpha=8, target_modules="all-linear").scale_kind
        'alpha/r'
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False
    lora_bias: bool = False
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    task_type: str | None = None
    peft_type: str = "LORA"
    auto_mapping: dict | None = None
    peft_version: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    megatron_config: dict | None = None
    megatron_core: str | None = "megatron.core"
    loftq_config: dict = field(default_factory=dict)
    eva_config: dict | None = None
    corda_config: dict | None = None
    astra_config: dict | None = None
    lora_ga_config: dict | None = None
    velora_config: dict | None = None
    alora_invocation_tokens: list[int] | None = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: dict | None = None
    layer_replication: list | None = None
    target_parameters: list[str] | None = None
    use_bdlora: dict | None = None
    arrow_config: dict | None = None
    kasa_config: dict | None = None
    ensure_weight_tying: bool = False
    # Unknown fields of newer PEFT versions, kept so that saving writes them back.
    extra_fields: dict[str, Any] = field(default_factory=dict, repr=False)
    # The fields the parsed file had (None: made in code): a field the file lacked and that is still at its
    # default is not written back, so an older PEFT's file round-trips with the fields it knows.
    file_fields: frozenset[str] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        problems = _validate(self)
        if problems:
            raise ConfigError("invalid LoRA config", problems)

    @property
    def scale_kind(self) -> str:
        return "alpha/sqrt(r)" if self.use_rslora else "alpha/r"

    def block_diagonal(self, name: str) -> tuple[int, int]:
        """BD-LoRA (``use_bdlora``): how many diagonal blocks the module ``name``'s lora_A and lora_B have (1: a
        full factor), by PEFT's rule (a pattern contained in the module name).

        Example:
            >>> cfg = LoraConfig(use_bdlora={"target_modules_bd_a": ["o_proj"], "nblocks": 2})
            >>> cfg.block_diagonal("model.layers.0.self_attn.o_proj"), cfg.block_diagonal("lm_head")
            ((2, 1), (1, 1))
        """
        bd = self.use_bdlora
        if not bd:
            return 1, 1
        blocks = bd.get("nblocks", 1)
        in_a = any(p in name for p in bd.get("target_modules_bd_a") or [])
        in_b = any(p in name for p in bd.get("target_modules_bd_b") or [])
        return (blocks if in_a else 1), (blocks if in_b else 1)

    @property
    def trains_lora_b(self) -> bool:
        """False for MiCA adapters (``init_lora_weights="mica"``): PEFT freezes their lora_B, only lora_A trains."""
        return self.init_lora_weights != "mica"

    # ---- (de)serialisation -------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, *, source: str = "adapter_config.json", quiet: bool = False) -> "LoraConfig":
        """Parse a loaded ``adapter_config.json`` as PEFT reads it.

        Nulls mean what they mean to PEFT (a null flag is false, a null dict empty); fields PEFT does not
        know are kept (``save`` writes them back) and warned about, with the known field a typo was meant
        to be.

        Args:
            data: the JSON object.
            source: where it came from, for messages.
            quiet: no warning about unknown fields (for configs jlora wrote itself).

        Returns:
            The validated config.

        Raises:
            ConfigError: not a JSON object, not a PEFT config, or invalid fields (all listed).
            UnsupportedAdapterError: another PEFT type, or LoRA features jlora does not implement.

        Example:
            >>> LoraConfig.from_dict({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}).r
            4
        """
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, found {type(data).__name__}")
        _check_peft_type(data, source)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra_fields", "file_fields"}
        kwargs = {k: _null_meaning(k, v) for k, v in data.items() if k in known}
        unknown = {k: v for k, v in data.items() if k not in known and k != "runtime_config"}
        if unknown and not quiet:
            warnings.warn(f"{source}: {_describe_unknown(unknown, known)}", stacklevel=2)
        try:
            return cls(**kwargs, extra_fields=unknown, file_fields=frozenset(data))
        except ConfigError as err:
            raise ConfigError(f"{source}: invalid LoRA config", err.problems) from None

    @classmethod
    def from_pretrained(
        cls,
        source: str,
        *,
        revision: str | None = None,
        subfolder: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | None = None,
    ) -> "LoraConfig":
        """Read ``adapter_config.json`` from a local folder or a Hub repo id."""
        from .hub import resolve_file

        path = resolve_file(source, CONFIG_NAME, revision=revision, subfolder=subfolder,
                            token=token, cache_dir=cache_dir)
        return cls.from_dict(read_json(path), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict PEFT writes (keys sorted, unknown fields kept; a parsed file's absent fields
        stay absent while at their defaults)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("extra_fields", "file_fields") and not self._absent_default(f)}
        out.update(self.extra_fields)
        out["peft_type"] = "LORA"
        if isinstance(out["target_modules"], set):
            out["target_modules"] = sorted(out["target_modules"])
        return json.loads(json.dumps(out, sort_keys=True))

    def _absent_default(self, f: dataclasses.Field) -> bool:
        """Whether field ``f`` was not in the parsed file and still holds its default."""
        if self.file_fields is None or f.name in self.file_fields or f.name == "peft_type":
            return False
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        return getattr(self, f.name) == default

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2)


def _check_peft_type(data: dict, source: str) -> None:
    """Refuse what is not a PEFT LoRA config: another PEFT type, or another tool's file (no ``peft_type``)."""
    if "peft_type" not in data:
        foreign = next((what for key, what in FOREIGN_FORMATS.items() if key in data), None)
        found = f"it looks like {foreign}" if foreign else f"its fields are {sorted(data)[:8]}"
        raise ConfigError(f"{source}: not a PEFT adapter config (no peft_type field); {found}. jlora reads "
                          "adapters saved by PEFT's save_pretrained (adapter_config.json with peft_type 'LORA')")
    if data["peft_type"] != "LORA":
        raise UnsupportedAdapterError(
            f"{source}: peft_type {data['peft_type']!r} is not supported; jlora reads LoRA adapters "
            "(peft_type 'LORA') only")


def _null_meaning(name: str, value: Any) -> Any:
    """A field's value with PEFT's meaning of null: the default (false, empty) where PEFT accepts one."""
    if value is not None or name in NULL_REFUSED:
        return value
    if name in NULL_MEANS:
        return NULL_MEANS[name]
    default = next(f for f in dataclasses.fields(LoraConfig) if f.name == name)
    if default.default_factory is not dataclasses.MISSING:
        return default.default_factory()
    return default.default


def _describe_unknown(unknown: dict, known: set[str]) -> str:
    """The warning for unknown fields, naming the known field each one is likely a typo of."""
    parts = []
    for key in sorted(unknown):
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.8)
        parts.append(f"unknown field {key!r}; did you mean {close[0]!r}?" if close else f"unknown field {key!r}")
    return ("; ".join(parts) + " (ignored: PEFT does not know it either, "
            "or it comes from a newer PEFT than jlora knows)")


def read_json(path) -> Any:
    """Read a JSON file, turning every failure into a ConfigError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (ValueError, RecursionError) as err:  # bad UTF-8 or JSON, over-long integers, absurd nesting
        raise ConfigError(f"{path}: not valid JSON ({type(err).__name__}: {str(err)[:200]})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err})") from None


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    """A finite real number (not a bool) that fits a float."""
    if not isinstance(x, numbers.Real) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


def _is_rank(x: Any) -> bool:
    return _is_int(x) and 0 < x <= MAX_RANK


def _regex_problem(field_name: str, pattern: str, template: str = "{}") -> str | None:
    """Why ``pattern`` (used by PEFT inside ``template``) is not a valid regular expression, or None."""
    try:
        re.compile(template.format(pattern))
    except (re.error, RecursionError, OverflowError, ValueError) as err:
        return f"{field_name}: {pattern!r} is not a valid regular expression ({err})"[:300]
    return None


def _is_str_list(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(s, str) for s in x)


def _validate(cfg: LoraConfig) -> list[str]:
    """Every problem of a config, not just the first."""
    p: list[str] = []
    if not _is_rank(cfg.r):
        p.append(f"r must be a positive integer (at most {MAX_RANK}), found {cfg.r!r}"[:300])
    if not _is_number(cfg.lora_alpha):
        p.append(f"lora_alpha must be a finite number, found {cfg.lora_alpha!r}"[:300])
    for name in ("target_modules", "exclude_modules"):
        v = getattr(cfg, name)
        if v is not None and not isinstance(v, str) and not _is_str_list(v):
            p.append(f"{name} must be a string, a list of strings or null, found {v!r}")
    if cfg.modules_to_save is not None and not _is_str_list(cfg.modules_to_save):
        p.append(f"modules_to_save must be a list of strings or null, found {cfg.modules_to_save!r}")
    if not _is_number(cfg.lora_dropout) or not 0 <= cfg.lora_dropout < 1:
        p.append(f"lora_dropout must be a number in [0, 1), found {cfg.lora_dropout!r}")
    if cfg.bias not in ("none", "all", "lora_only"):
        p.append(f"bias must be 'none', 'all' or 'lora_only', found {cfg.bias!r}")
    for name in ("use_rslora", "use_dora", "lora_bias", "fan_in_fan_out", "inference_mode"):
        if not isinstance(getattr(cfg, name), bool):
            p.append(f"{name} must be true or false, found {getattr(cfg, name)!r}")
    ltt = cfg.layers_to_transform
    if ltt is not None and not _is_int(ltt) and not (isinstance(ltt, list) and all(_is_int(i) for i in ltt)):
        p.append(f"layers_to_transform must be an integer, a list of integers or null, found {ltt!r}")
    lp = cfg.layers_pattern
    if lp is not None and not isinstance(lp, str) and not _is_str_list(lp):
        p.append(f"layers_pattern must be a string, a list of strings or null, found {lp!r}")
    for name, check, what in (("rank_pattern", _is_rank, "positive integers"),
                              ("alpha_pattern", _is_number, "finite numbers")):
        pat = getattr(cfg, name)
        if pat is None:
            setattr(cfg, name, {})
        elif not isinstance(pat, dict) or not all(isinstance(k, str) and check(v) for k, v in pat.items()):
            p.append(f"{name} must map module-name patterns to {what}, found {pat!r}"[:300])
        else:
            p.extend(filter(None, (_regex_problem(name, k, r"(.*\.)?({})$") for k in pat)))
    p.extend(_regex_problems(cfg))
    tti = cfg.trainable_token_indices
    if tti is not None:
        ok = (isinstance(tti, list) and all(_is_int(i) and i >= 0 for i in tti)) or (
            isinstance(tti, dict)
            and all(isinstance(k, str) and isinstance(v, list) and all(_is_int(i) and i >= 0 for i in v)
                    for k, v in tti.items()))
        if not ok:
            p.append(f"trainable_token_indices must be a list of token ids or a dict of them, found {tti!r}")
    init = cfg.init_lora_weights
    if isinstance(init, str) and init.startswith(BASE_REWRITING_INITS):
        raise UnsupportedAdapterError(
            f"init_lora_weights={init!r} rewrites the base model's weights, which the adapter file alone "
            "cannot reproduce; convert the adapter to plain LoRA in PEFT first "
            "(save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    if init not in KNOWN_INITS and not (isinstance(init, str) and init.startswith(BASE_REWRITING_INITS)):
        p.append(f"init_lora_weights {init!r} is not a PEFT init mode")
    if init == "mica" and cfg.use_dora:
        p.append("init_lora_weights='mica' with use_dora: PEFT has no such variant combination")
    at = cfg.alora_invocation_tokens
    if at is not None and not (isinstance(at, list) and all(_is_int(t) and t >= 0 for t in at)):
        p.append(f"alora_invocation_tokens must be a list of token ids or null, found {at!r}")
    elif at and cfg.use_dora:
        p.append("alora_invocation_tokens with use_dora: PEFT has no such variant combination")
    p.extend(_bdlora_problems(cfg))
    p.extend(_kasa_problems(cfg))
    lr = cfg.layer_replication
    if lr is not None and not (isinstance(lr, list) and all(
            isinstance(pair, list) and len(pair) == 2 and all(_is_int(i) for i in pair) and 0 <= pair[0] < pair[1]
            for pair in lr)):
        p.append(f"layer_replication must be a list of [start, end) layer pairs or null, found {lr!r}"[:300])
    tp = cfg.target_parameters
    if tp is not None and not _is_str_list(tp):
        p.append(f"target_parameters must be a list of parameter names or null, found {tp!r}")
    elif tp:  # PEFT's ParamWrapper refuses these (it merges W + s * B @ A on every forward)
        p.extend(f"target_parameters with {what} (PEFT refuses it)" for what, on in (
            ("lora_dropout != 0", cfg.lora_dropout), ("fan_in_fan_out", cfg.fan_in_fan_out),
            ("lora_bias", cfg.lora_bias), ("use_dora", cfg.use_dora)) if on)
    unsupported = [
        f"{name}={getattr(cfg, name)!r} ({what})"
        for name, what in UNSUPPORTED_WHEN_SET.items()
        if getattr(cfg, name) not in (None, False, {}, [])
    ]
    if unsupported:
        raise UnsupportedAdapterError("this LoRA adapter uses PEFT features jlora does not implement",
                                      unsupported)
    return p


_BDLORA_FIELDS = {"target_modules_bd_a", "target_modules_bd_b", "nblocks", "match_strict"}


def _bdlora_problems(cfg: LoraConfig) -> list[str]:
    """What is wrong with ``use_bdlora`` (PEFT's BdLoraConfig, saved as a dict)."""
    bd = cfg.use_bdlora
    if bd is None or bd is False:
        return []
    if not isinstance(bd, dict):
        return [f"use_bdlora must be a BD-LoRA config (an object) or null, found {bd!r}"[:300]]
    p = [f"use_bdlora: unknown field {k!r}" for k in sorted(set(bd) - _BDLORA_FIELDS)]
    for name in ("target_modules_bd_a", "target_modules_bd_b"):
        if bd.get(name) is not None and not _is_str_list(bd[name]):
            p.append(f"use_bdlora.{name} must be a list of module-name patterns or null, found {bd[name]!r}"[:300])
    if not _is_rank(bd.get("nblocks", 1)):
        p.append(f"use_bdlora.nblocks must be a positive integer, found {bd.get('nblocks')!r}"[:300])
    if not isinstance(bd.get("match_strict", True), bool):
        p.append(f"use_bdlora.match_strict must be true or false, found {bd.get('match_strict')!r}")
    if not p:
        both = set(bd.get("target_modules_bd_a") or []) & set(bd.get("target_modules_bd_b") or [])
        if both:
            p.append(f"use_bdlora: patterns {sorted(both)} are in both target_modules_bd_a and target_modules_bd_b")
    variants = (("use_dora", cfg.use_dora), ("alora_invocation_tokens", cfg.alora_invocation_tokens),
                ("velora_config", cfg.velora_config), ("monteclora_config", cfg.monteclora_config),
                ("init_lora_weights='mica'", cfg.init_lora_weights == "mica"))
    others = [name for name, on in variants if on]
    if others:
        p.append(f"use_bdlora with {', '.join(others)}: PEFT has no such variant combination")
    return p


def _kasa_problems(cfg: LoraConfig) -> list[str]:
    """What is wrong with ``kasa_config`` (PEFT's KasaConfig, saved as a dict)."""
    kasa = cfg.kasa_config
    if kasa is None:
        return []
    if not isinstance(kasa, dict) or not all(k in ("beta", "gamma") and _is_number(v) for k, v in kasa.items()):
        return [f"kasa_config must be an object of numbers beta and gamma, or null, found {kasa!r}"[:300]]
    variants = (("use_dora", cfg.use_dora), ("alora_invocation_tokens", cfg.alora_invocation_tokens),
                ("use_bdlora", cfg.use_bdlora), ("velora_config", cfg.velora_config),
                ("monteclora_config", cfg.monteclora_config), ("fan_in_fan_out", cfg.fan_in_fan_out),
                ("init_lora_weights='mica'", cfg.init_lora_weights == "mica"))
    others = [name for name, on in variants if on]
    return [f"kasa_config with {', '.join(others)}: PEFT has no such variant"] if others else []


def _regex_problems(cfg: LoraConfig) -> list[str]:
    """Patterns that PEFT (and jlora's targeting) compile as regular expressions, checked up front."""
    found = []
    for name in ("target_modules", "exclude_modules"):
        if isinstance(getattr(cfg, name), str):
            found.append(_regex_problem(name, getattr(cfg, name)))
    if isinstance(cfg.layers_pattern, str) or _is_str_list(cfg.layers_pattern):
        lp = [cfg.layers_pattern] if isinstance(cfg.layers_pattern, str) else cfg.layers_pattern
        found += [_regex_problem("layers_pattern", x, r"(?:^|.*?\.){}\.(\d+)\.") for x in lp]
    if _is_str_list(cfg.modules_to_save):
        found += [_regex_problem("modules_to_save", x, r"(^|.*\.){}($|\..*)") for x in cfg.modules_to_save]
    return [f for f in found if f]
