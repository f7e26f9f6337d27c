"""PEFT adapters <-> qwix LoRA (google/qwix, the LoRA of tunix and MaxText), both ways.

qwix (``qwix.LoraProvider`` + ``qwix.apply_lora_to_model``) adds two ``nnx.LoRAParam`` leaves beside every kernel
its rules match, named after the kernel's leaf: ``w_lora_a`` / ``w_lora_b`` beside tunix's ``Einsum`` ``w``,
``kernel_lora_a`` / ``kernel_lora_b`` beside an ``nnx.Linear``'s ``kernel``. Their shapes follow the operation that
reads the kernel (``qwix/_src/providers/lora.py``):

- ``einsum``: ``lora_a`` holds the kernel's axes that the input shares (contracted or batch), in the kernel's order,
  then the rank; ``lora_b`` the rank, then the kernel's other (output) axes in its order. tunix Llama's ``q_proj``
  ``w`` ``(D, N, H)`` (``BTD,DNH->BTNH``): ``(D, r)`` and ``(r, N, H)``; ``o_proj`` ``(N, H, D)``: ``(N, H, r)`` and
  ``(r, D)``; Gemma's fused ``kv_einsum`` ``(2, K, D, H)`` (``BSD,CKDH->CBSKH``): one ``(D, r)`` for both parts and
  ``(r, 2, K, H)``.
- ``dot_general`` (``nnx.Linear``): ``(batch..., prod(contracting), r)`` and ``(batch..., r, prod(other))``, i.e.
  ``(in, r)`` and ``(r, out)`` for a Linear; ``conv_general_dilated``: ``(*kernel.shape[:-1], r)``, ``(r, out)``.

These are jlora's own factor layouts (``lora_A`` over the kernel's input axes, ``lora_B`` over its output axes, both
in the kernel's order), flattened where qwix flattens. qwix adds ``(alpha / rank) * x @ a @ b`` with one ``rank``
and ``alpha`` per rule (the first rule whose ``module_path`` regex full-matches the module's path ``layers/0/attn/
q_proj``), in the base weight's dtype; its ``a`` starts He-uniform, its ``b`` at zero.

:func:`to_qwix` fills a qwix model's LoRA leaves from an adapter loaded with :func:`jlora.load` (scales qwix cannot
express, rsLoRA and rank/alpha patterns, folded into ``b``; smaller ranks padded with zero rows of ``b``);
:func:`from_qwix` reads a qwix model's LoRA back as a jlora tree, which :func:`jlora.save` writes in PEFT's format.

Example:
    >>> provider = qwix.LoraProvider(module_path=".*_proj", rank=8, alpha=16.0)
    >>> lora_model = qwix.apply_lora_to_model(model, provider, **model.get_model_input())
    >>> jlora.to_qwix(jlora.load(nnx.state(model), "adapter", layout="tunix"), lora_model, provider)
    >>> ...                                                    # train lora_model with nnx.Optimizer(wrt=nnx.LoRAParam)
    >>> jlora.save(jlora.from_qwix(lora_model, provider), "trained-adapter")      # PEFT's format
"""
from __future__ import annotations

import collections
import dataclasses
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from .config import LoraConfig
from .errors import AdapterError, TargetMismatchError, UnsupportedAdapterError
from .layout import Layout, Placement
from .layout_registry import get_layout
from .load import place
from .spec import PREFIX
from .tree import (
    BASE_TABLE,
    LORA_A,
    LORA_B,
    LORA_BIAS,
    LORA_DIAG,
    MAGNITUDE,
    RANK_SCALE,
    TOKEN_DELTA,
    VARIANT_EXTRA,
    AdaptedModule,
    adapted_modules,
    as_param_tree,
    find_key,
    iter_modules,
    set_paths,
)

LORA_A_SUFFIX, LORA_B_SUFFIX = "_lora_a", "_lora_b"  # qwix: <kernel leaf name> + suffix
_LLAMA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_LLAMA_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class QwixRule:
    """The parts of a ``qwix.LoraRule`` that decide which modules get LoRA and how it is scaled.

    ``rank`` is None for a rule of another kind (a ``QtRule`` in the same provider): qwix adds no LoRA where such
    a rule matches first.
    """

    module_path: str
    rank: int | None
    alpha: float | None
    op_names: tuple[str, ...] = ()
    dropout: float = 0.0

    @property
    def scale(self) -> float:
        """qwix's multiplier of ``x @ a @ b``: ``alpha / rank``."""
        return float(self.alpha) / int(self.rank)


def qwix_rules(provider: Any) -> list[QwixRule]:
    """The rules of ``provider``, in qwix's order of precedence.

    Args:
        provider: a ``qwix.LoraProvider``, one ``qwix.LoraRule``, a sequence of them, or mappings with the same
            fields (``module_path``, ``rank``, ``alpha``; e.g. tunix's CLI ``lora_config``).

    Returns:
        One :class:`QwixRule` per rule.

    Raises:
        AdapterError: a rule without ``module_path``, or a LoRA rule with a rank that is not a positive integer.

    Example:
        >>> qwix_rules({"module_path": ".*q_proj", "rank": 4, "alpha": 8.0})[0].scale
        2.0
    """
    raw = getattr(provider, "_rules", None)  # qwix.LoraProvider keeps its (validated) rules there
    if raw is None:
        raw = list(provider) if isinstance(provider, Sequence) and not isinstance(provider, str) else [provider]
    rules, problems = [], []
    for i, rule in enumerate(raw):
        get = rule.get if isinstance(rule, Mapping) else (lambda key, rule=rule: getattr(rule, key, None))
        path, rank, alpha = get("module_path"), get("rank"), get("alpha")
        if path is None and isinstance(rule, Mapping):
            path = ".*"  # (qwix's default)
        if not isinstance(path, str):
            problems.append(f"rule {i}: no module_path (found {type(rule).__name__})")
            continue
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1):
            problems.append(f"rule {i} ({path!r}): rank must be a positive integer, found {rank!r}")
            continue
        rules.append(QwixRule(path, None if rank is None else int(rank), None if rank is None else float(alpha),
                              tuple(get("op_names") or ()), float(get("dropout") or 0.0)))
    if problems:
        raise AdapterError("qwix provider: unusable rules", problems)
    return rules


def _ops(kernel_key: str) -> set[str]:
    """The qwix operations that may read a kernel leaf of this name (for rules with ``op_names``)."""
    return {"dot_general", "conv_general_dilated"} if kernel_key == "kernel" else {"einsum", "dot_general"}


def rule_for(rules: Sequence[QwixRule], path: tuple, kernel_key: str) -> QwixRule | None:
    """The rule qwix applies to the module at ``path``: the first whose ``module_path`` full-matches the path joined
    with ``/`` (and whose ``op_names``, if any, include an operation that reads a leaf named ``kernel_key``).

    Args:
        rules: from :func:`qwix_rules`.
        path: the module's keys from the model's root, e.g. ``("layers", 0, "attn", "q_proj")``.
        kernel_key: the kernel leaf's name (``"w"``, ``"kernel"``).

    Returns:
        That rule, or None when none matches or the first match adds no LoRA (another kind of rule).

    Example:
        >>> rule_for(qwix_rules({"module_path": ".*attn/q_proj", "rank": 4, "alpha": 8}), ("layers", 0, "attn",
        ...          "q_proj"), "w").rank
        4
    """
    name = "/".join(map(str, path))
    for rule in rules:
        if re.fullmatch(rule.module_path, name) and (not rule.op_names or _ops(kernel_key) & set(rule.op_names)):
            return rule if rule.rank is not None else None
    return None


# ---- qwix states ---------------------------------------------------------------------------------------------------
def _pure(qwix_state: Any) -> dict:
    """The pure nested dict of a qwix model (``nnx.Module``), its ``nnx.State`` or a pure dict."""
    if isinstance(qwix_state, Mapping) and not hasattr(qwix_state, "to_pure_dict"):
        return qwix_state
    if hasattr(qwix_state, "to_pure_dict"):
        return as_param_tree(qwix_state)
    from flax import nnx

    if isinstance(qwix_state, nnx.Module):
        return nnx.to_pure_dict(nnx.state(qwix_state))
    raise AdapterError(f"expected a qwix model (nnx.Module), its nnx.State or its pure dict; found "
                       f"{type(qwix_state).__name__}")


def qwix_lora_leaves(tree: Mapping, prefix: tuple = ()) -> dict[tuple[tuple, str], tuple[Any, Any]]:
    """Every qwix LoRA pair in a pure dict.

    Args:
        tree: a qwix model's state as a pure dict (``nnx.to_pure_dict(nnx.state(lora_model))``).
        prefix: the keys leading to ``tree`` (for the recursion).

    Returns:
        ``{(module path, kernel leaf name): (lora_a, lora_b)}``.

    Example:
        >>> sorted(qwix_lora_leaves(nnx.to_pure_dict(nnx.state(lora_model))))[0]
        (('layers', 0, 'attn', 'q_proj'), 'w')
    """
    out: dict[tuple[tuple, str], tuple[Any, Any]] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(qwix_lora_leaves(value, prefix + (key,)))
        elif isinstance(key, str) and key.endswith(LORA_A_SUFFIX):
            kernel = key[:-len(LORA_A_SUFFIX)]
            if kernel + LORA_B_SUFFIX in tree:
                out[(prefix, kernel)] = (value, tree[kernel + LORA_B_SUFFIX])
    return out


def _without_lora(tree: Mapping) -> dict:
    """``tree`` without qwix's LoRA leaves (the base model's own)."""
    return {k: _without_lora(v) if isinstance(v, Mapping) else v for k, v in tree.items()
            if not (isinstance(k, str) and k.endswith((LORA_A_SUFFIX, LORA_B_SUFFIX)) and not isinstance(v, Mapping))}


def _placed_like(value: np.ndarray, old: Any) -> Any:
    """``value`` where the leaf it replaces lives: a ``jax.Array`` with the old leaf's sharding (a model sharded on a
    mesh stays so), else as it is."""
    sharding = getattr(old, "sharding", None)
    return jax.device_put(value, sharding) if isinstance(old, jax.Array) and sharding is not None else value


def _rebuild(qwix_state: Any, pure: Mapping, updates: dict[tuple, Any]) -> Any:
    """``qwix_state`` (whose pure dict is ``pure``) with ``updates`` (path -> array), each placed like the leaf it
    replaces: a new pure dict or ``nnx.State``; a model is updated in place."""
    old = {path: pure for path in updates}
    for path in updates:
        for key in path:
            old[path] = old[path][key]
    updates = {path: _placed_like(value, old[path]) for path, value in updates.items()}
    if isinstance(qwix_state, Mapping) and not hasattr(qwix_state, "to_pure_dict"):
        return set_paths(qwix_state, updates)
    from flax import nnx

    partial: dict = {}
    for path, value in updates.items():
        node = partial
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    if isinstance(qwix_state, nnx.Module):
        state = nnx.state(qwix_state)
        nnx.replace_by_pure_dict(state, partial)
        nnx.update(qwix_state, state)
        return qwix_state
    state = jax.tree.map(lambda x: x, qwix_state)  # a new State (Variables copied), the caller's left alone
    nnx.replace_by_pure_dict(state, partial)
    return state


def _resolve(tree: Mapping, path: tuple) -> tuple | None:
    """``path`` spelled with ``tree``'s own keys (str or int layer keys), or None if it is not there."""
    out = []
    for segment in path:
        if not isinstance(tree, Mapping):
            return None
        key = find_key(tree, str(segment))
        if key is None:
            return None
        out.append(key)
        tree = tree[key]
    return tuple(out)


# ---- jlora -> qwix -------------------------------------------------------------------------------------------------
def _replaced(node: AdaptedModule, qwix_module: Mapping | None) -> list[str]:
    """The module's own tensors that the adapter replaces or trains (``modules_to_save``, biases). PEFT also saves a
    targeted embedding's or head's base weight as it is (``base_layer.weight``): no change where it equals the qwix
    model's."""
    own = node.base_children()
    return [child for child, stored_as in node.spec.file_keys if child in own and not (
        stored_as.startswith("base_layer.") and qwix_module is not None and child in qwix_module
        and np.shape(qwix_module[child]) == np.shape(own[child])
        and np.array_equal(np.asarray(own[child]), np.asarray(qwix_module[child])))]


def _node_problems(node: AdaptedModule, qwix_module: Mapping | None) -> list[str]:
    """What qwix's ``x @ a @ b`` per kernel cannot hold in this module's adapter (``qwix_module``: the qwix state's
    dict of the same module, or None)."""
    spec, name = node.spec, node.spec.peft_name
    checks = [
        (bool(spec.adapters), "holds several adapters: convert one, jlora.select(lora_params, name)"),
        (spec.dora or MAGNITUDE in node, "DoRA (use_dora): qwix has no magnitude vector"),
        (LORA_BIAS in node, "lora_bias: qwix's LoRA has no bias"),
        (bool(_replaced(node, qwix_module)), "replaces the module's own tensors (modules_to_save, or bias='all' / "
                                             "'lora_only'): qwix trains LoRA factors only"),
        (TOKEN_DELTA in node or BASE_TABLE in node, "trainable tokens / a replaced embedding table"),
        (spec.kind == "embedding", "LoRA on an embedding: qwix adds LoRA to matmuls (einsum, dot_general, conv) only"),
        (bool(spec.wrapper), "LoRA on a parameter (target_parameters)"),
        (spec.activated, "activated LoRA (alora_invocation_tokens)"),
        (bool(spec.arrow), "Arrow routing"),
        (LORA_DIAG in node, "KaSA (kasa_config)"),
        (any(k.startswith(VARIANT_EXTRA) for k in node), "a LoRA variant's extra tensors (VeLoRA, MonteCLoRA)"),
        (bool(spec.tied_copy), "an embedding LoRA mirrored on a tied head (ensure_weight_tying)"),
        (spec.layer_axis is not None, "a stacked (scanned) kernel: qwix's NNX LoRA is per module"),
    ]
    return [f"{name}: {why}" for bad, why in checks if bad]


def _used_columns(node: AdaptedModule) -> np.ndarray:
    """The rank columns that hold the adapter's factors (each source's own rank; padding left out)."""
    return np.concatenate([np.arange(s.offset, s.offset + s.rank) for s in sorted(node.spec.sources,
                                                                                  key=lambda s: s.offset)])


def _fits(stored: tuple, qwix: tuple) -> bool:
    """Whether qwix's axes (``qwix``) are jlora's (``stored``), or those flattened into one axis."""
    return stored == qwix or (len(qwix) == 1 and int(np.prod(stored)) == qwix[0])


def _qwix_factors(node: AdaptedModule, a_q: Any, b_q: Any, rule: QwixRule) -> tuple[np.ndarray, np.ndarray] | str:
    """qwix's ``(lora_a, lora_b)`` holding ``node``'s adapter under ``rule``'s scale, or the reason it cannot.

    The adapter's columns come first, each column of ``b`` times (its PEFT scale / qwix's), in float64 rounded once
    to qwix's dtype (a ratio of 1 leaves the values bit for bit); columns past them keep qwix's ``a`` (its init,
    so they can still train) with zero ``b``: the sum is the adapter's exactly.
    """
    a, b = np.asarray(node[LORA_A]), np.asarray(node[LORA_B])
    a_q, b_q = np.asarray(a_q), np.asarray(b_q)
    rank, sources = a_q.shape[-1], node.spec.sources
    name = node.spec.peft_name if len(sources) < 2 else f"{' + '.join(s.peft_name for s in sources)} (one fused kernel)"
    if not (_fits(a.shape[:-1], a_q.shape[:-1]) and _fits(b.shape[1:], b_q.shape[1:]) and b_q.shape[0] == rank):
        return (f"{name}: qwix's factors {a_q.shape} / {b_q.shape} do not fit the adapter's {a.shape} / {b.shape} "
                "(another kernel, or qwix reads it with other contracting axes)")
    cols = _used_columns(node)
    if len(cols) > rank:
        ranks = " + ".join(str(s.rank) for s in sources) + " = " if len(sources) > 1 else ""
        return (f"{name}: rank {ranks}{len(cols)} is above the qwix rule's rank {rank} (rule {rule.module_path!r}): "
                "give the provider a rule with a rank at least the adapter's")
    if rule.alpha == 0:
        return f"{name}: the qwix rule {rule.module_path!r} has alpha 0, which scales every LoRA to nothing"
    scale = np.broadcast_to(np.asarray(node[RANK_SCALE], np.float64).reshape(-1), (a.shape[-1],))[cols]
    ratio = (scale / np.float64(rule.scale)).reshape(-1, *([1] * (b.ndim - 1)))
    new_a = a_q.reshape(*a.shape[:-1], rank).copy()
    new_a[..., :len(cols)] = a[..., cols]
    new_b = np.zeros((rank, *b.shape[1:]), b_q.dtype)
    new_b[:len(cols)] = (np.asarray(b[cols], np.float64) * ratio).astype(b_q.dtype)
    return new_a.astype(a_q.dtype).reshape(a_q.shape), new_b.reshape(b_q.shape)


def _rule_mismatch(rule: QwixRule | None, lora_a: Any, name: str, shown: str) -> list[str]:
    """Why ``rule`` (the provider's rule for the module at ``shown``) cannot be the one that made its qwix LoRA."""
    if rule is None:
        return [f"{name}: no LoRA rule of the provider matches {shown!r}, yet the state has qwix LoRA there: pass the "
                "provider the model was made with"]
    if rule.rank != np.shape(lora_a)[-1]:
        return [f"{name}: the provider's rule {rule.module_path!r} has rank {rule.rank}, the qwix LoRA at {shown!r} "
                f"rank {np.shape(lora_a)[-1]}: pass the provider the model was made with"]
    return []


def _node_leaves(node: AdaptedModule, path: tuple, pure: Mapping, pairs: Mapping, rules: Sequence[QwixRule]
                 ) -> tuple[tuple | None, dict, list[str], list[str]]:
    """One adapted module's qwix pair (its key in ``pairs``, or None), the leaves to write, what qwix cannot hold
    and the structural mismatches."""
    where, key = _resolve(pure, path), node.spec.kernel_key
    module = None
    if where is not None:
        module = pure
        for k in where:
            module = module[k]
    unsupported = _node_problems(node, module)  # (and the checks below too: every problem at once)
    name, shown = node.spec.peft_name, "/".join(map(str, path))
    if where is None or (where, key) not in pairs:
        missing = [] if unsupported else [f"{name}: the qwix state has no {key}{LORA_A_SUFFIX} / {key}{LORA_B_SUFFIX} "
                                          f"at {shown} (no provider rule matched {shown!r})"]
        return None, {}, unsupported, missing
    rule = rule_for(rules, where, key)
    mismatch = _rule_mismatch(rule, pairs[(where, key)][0], name, shown)
    if mismatch or node.spec.kind != "linear" or node.spec.layer_axis is not None or node.spec.adapters:
        return (where, key), {}, unsupported, mismatch
    factors = _qwix_factors(node, *pairs[(where, key)], rule)
    if isinstance(factors, str):
        return (where, key), {}, unsupported + [factors], []
    return (where, key), dict(zip((where + (key + LORA_A_SUFFIX,), where + (key + LORA_B_SUFFIX,)), factors)), \
        unsupported, []


def _fill(lora_params: Any, pure: Mapping, rules: Sequence[QwixRule]) -> tuple[dict, list[str], list[str]]:
    """The qwix leaves to write (path -> array), what qwix cannot hold, and the structural mismatches."""
    pairs = qwix_lora_leaves(pure)
    updates, unsupported, mismatched, claimed = {}, [], [], set()
    for path, node in adapted_modules(lora_params):
        pair, leaves, bad, off = _node_leaves(node, path, pure, pairs, rules)
        claimed.add(pair)
        updates.update(leaves)
        unsupported += bad
        mismatched += off
    for (where, key), (_, b_q) in pairs.items():  # qwix LoRA the adapter leaves alone: zero b, so it adds nothing
        if (where, key) not in claimed:
            updates[where + (key + LORA_B_SUFFIX,)] = np.zeros(np.shape(b_q), np.asarray(b_q).dtype)
    return updates, unsupported, mismatched


def to_qwix(lora_params: Any, qwix_state: Any, provider: Any) -> Any:
    """Fill a qwix LoRA model's ``*_lora_a`` / ``*_lora_b`` leaves with a PEFT adapter, so that it computes what
    PEFT computes (e.g. a tunix run resuming from a PEFT adapter).

    Each adapted kernel's factors go to qwix's leaves beside it, cast to their dtype. qwix scales every module by
    its rule's ``alpha / rank``; where PEFT's scale differs (another alpha or rank, rsLoRA, rank/alpha patterns,
    several ranks per fused kernel) ``lora_b`` is multiplied by (PEFT's scale / qwix's). A smaller rank fills the
    first columns; the rest keep qwix's ``lora_a`` and get a zero ``lora_b`` (exact, and still trainable). qwix LoRA
    on modules the adapter leaves alone gets a zero ``lora_b`` too. The base weights are not touched: ``lora_params``
    should come from the same base model.

    Args:
        lora_params: a single-adapter tree from :func:`jlora.load` (or ``init``) on the base model's state, e.g.
            ``jlora.load(nnx.state(model), "adapter", layout="tunix")`` with the model given to
            ``apply_lora_to_model`` (which works on a clone of it).
        qwix_state: what ``qwix.apply_lora_to_model`` returned (an ``nnx.Module``, updated in place and returned),
            its ``nnx.State`` (a new State is returned) or that state's pure dict (a new dict is returned).
        provider: the ``qwix.LoraProvider`` the model was made with (or its rules, see :func:`qwix_rules`).

    Returns:
        ``qwix_state`` with its LoRA leaves filled (same kind as given).

    Raises:
        UnsupportedAdapterError: what qwix cannot hold, every case listed: DoRA, ``lora_bias``, ``modules_to_save``
            and trained biases, trainable tokens, embedding LoRA, LoRA on parameters, aLoRA, Arrow, KaSA, VeLoRA /
            MonteCLoRA extras, stacked kernels, several adapters, ranks above the rule's rank, alpha 0 (structural
            mismatches listed with them).
        TargetMismatchError: adapted modules without qwix LoRA leaves (the provider's ``module_path`` misses
            them), or with leaves whose shapes do not fit.

    Example:
        >>> provider = qwix.LoraProvider(module_path=".*_proj", rank=8, alpha=16.0)
        >>> lora_model = qwix.apply_lora_to_model(model, provider, **model.get_model_input())
        >>> lora_params = jlora.load(nnx.state(model), "user/llama-lora", layout="tunix")
        >>> lora_model = jlora.to_qwix(lora_params, lora_model, provider)   # now PEFT's outputs
    """
    rules = qwix_rules(provider)
    pure = _pure(qwix_state)
    if not qwix_lora_leaves(pure):
        raise TargetMismatchError("to_qwix: the qwix state holds no LoRA leaves (*_lora_a / *_lora_b): pass what "
                                  "qwix.apply_lora_to_model returned, or its nnx.state")
    if not adapted_modules(lora_params):
        raise AdapterError("to_qwix: lora_params holds no adapter (no AdaptedModule): load one with jlora.load")
    updates, unsupported, mismatched = _fill(lora_params, pure, rules)
    if unsupported:
        raise UnsupportedAdapterError("to_qwix: qwix's LoRA cannot hold this adapter", unsupported + mismatched)
    if mismatched:
        raise TargetMismatchError("to_qwix: the adapter does not fit the qwix model's LoRA leaves", mismatched)
    return _rebuild(qwix_state, pure, updates)


# ---- qwix -> jlora -------------------------------------------------------------------------------------------------
def _is_tunix(layout: Any) -> bool:
    return (isinstance(layout, str) and layout == "tunix") or type(layout).__name__ == "TunixLayout"


def default_module_names(base: Mapping, layout: Any) -> list[str]:
    """PEFT module names to look for in ``base``: for the ``"tunix"`` layout, a causal LM's (Llama naming:
    ``model.layers.{i}.self_attn.q_proj``, ... ``mlp.down_proj``, ``lm_head``) for every layer of the tree; for
    other layouts, the tree's module paths joined with dots (transformers' Flax naming).

    Args:
        base: the base model's tree (pure dict).
        layout: the layout name or object :func:`from_qwix` uses.

    Returns:
        The candidate names; those no rule of the layout places where qwix put LoRA are ignored.

    Example:
        >>> default_module_names({"layers": {0: {}}}, "tunix")[:2]
        ['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.k_proj']
    """
    if _is_tunix(layout):
        layers = base.get("layers", {}) if isinstance(base, Mapping) else {}
        names = [f"model.layers.{i}.{group}.{proj}" for i in layers
                 for group, projs in (("self_attn", _LLAMA_ATTENTION), ("mlp", _LLAMA_MLP)) for proj in projs]
        return names + ["lm_head"]
    return [".".join(map(str, path)) for path, _ in iter_modules(base) if path]


def _claim(bound: Layout, names: Sequence[str], pairs: Mapping) -> dict[str, Placement]:
    """Each PEFT name whose placement is a kernel with qwix LoRA (``pairs`` keyed by :func:`_key`): name ->
    placement."""
    out = {}
    for name in names:
        try:
            placement = bound.place(name, "linear")
        except AdapterError:
            continue
        if placement is not None and _key(placement.path, placement.kernel_key) in pairs:
            out[name] = placement
    return out


def _peft_factors(placement: Placement, kernel: Any, a_q: Any, b_q: Any) -> tuple[np.ndarray, np.ndarray] | str:
    """PEFT's ``(lora_A, lora_B)`` (torch layouts) of one module from qwix's factors of its kernel, or why not."""
    if placement.layer_axis is not None:
        return "a stacked (scanned) kernel: PEFT's per-layer factors cannot be read from one qwix pair"
    canonical = tuple(np.shape(kernel)[j] for j in np.argsort(placement.kernel_perm))
    ins, outs = canonical[:placement.in_ndim], canonical[placement.in_ndim:]
    a_q, b_q = np.asarray(a_q), np.asarray(b_q)
    rank = a_q.shape[-1]
    if not (_fits(ins, a_q.shape[:-1]) and _fits(outs, b_q.shape[1:]) and b_q.shape[0] == rank):
        return f"qwix's factors {a_q.shape} / {b_q.shape} do not fit the kernel {np.shape(kernel)}"
    a, b = a_q.reshape(*ins, rank), b_q.reshape(rank, *outs)
    if placement.part_axis is not None:  # a fused kernel: this part's outputs (qwix's a is shared by the parts)
        b = np.take(b, placement.part, axis=1 + placement.part_axis - placement.in_ndim)
    return placement.a_to_torch(a), placement.b_to_torch(b)


def _by_suffix(values: Mapping[str, Any], covers: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """``{name: value}`` keyed by the module names' last part where one key says the same for every name it
    matches (PEFT matches ``target_modules`` entries and pattern keys as dot-bounded suffixes), by full name
    elsewhere. ``covers[suffix]``: every name such a key would match."""
    groups: dict[str, list[str]] = collections.defaultdict(list)
    for name in values:
        groups[name.rsplit(".", 1)[-1]].append(name)
    out: dict[str, Any] = {}
    for suffix, names in groups.items():
        same = len({repr(values[n]) for n in names}) == 1 and set(covers.get(suffix, ())) <= set(names)
        out.update({suffix: values[names[0]]} if same else {n: values[n] for n in names})
    return out


_COMPUTED_FIELDS = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora",
                    "peft_type")


def _peft_config(modules: Mapping[str, QwixRule], names: Sequence[str], fields: Mapping[str, Any]) -> LoraConfig:
    """PEFT's config for LoRA on ``modules`` (name -> its qwix rule): the most common (rank, alpha) as ``r`` /
    ``lora_alpha``, the others as rank/alpha patterns, so that every module's scale is its rule's ``alpha / rank``."""
    clash = sorted(set(fields) & set(_COMPUTED_FIELDS))
    if clash:
        raise AdapterError(f"from_qwix: {clash} come from the qwix provider and state; leave them out")
    (rank, alpha), _ = collections.Counter((m.rank, m.alpha) for m in modules.values()).most_common(1)[0]
    covers: dict[str, list[str]] = collections.defaultdict(list)
    for name in names:
        covers[name.rsplit(".", 1)[-1]].append(name)
    targets = _by_suffix({name: True for name in modules}, covers)
    ranks = {n: m.rank for n, m in modules.items() if m.rank != rank}
    alphas = {n: m.alpha for n, m in modules.items() if m.alpha != alpha}
    own = collections.defaultdict(list)  # pattern keys by suffix may only speak for adapted modules
    for name in modules:
        own[name.rsplit(".", 1)[-1]].append(name)
    dropouts = collections.Counter(m.dropout for m in modules.values())
    if len(dropouts) > 1:
        warnings.warn(f"from_qwix: the qwix rules have several dropout rates {sorted(dropouts)}; PEFT's config holds "
                      f"one: lora_dropout={dropouts.most_common(1)[0][0]}", stacklevel=3)
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted(targets),
                      rank_pattern=_by_suffix(ranks, own) if ranks else {},
                      alpha_pattern=_by_suffix(alphas, own) if alphas else {},
                      lora_dropout=dropouts.most_common(1)[0][0], **dict(fields))


def _key(path: tuple, kernel_key: str) -> tuple[tuple[str, ...], str]:
    return tuple(map(str, path)), kernel_key


def _collect(base: Mapping, bound: Layout, names: Sequence[str], pairs: Mapping, rules: Sequence[QwixRule]
             ) -> tuple[dict[str, np.ndarray], dict[str, QwixRule], list[str]]:
    """PEFT's tensors for every qwix LoRA pair, each module's rule, and the problems found."""
    pairs = {_key(*k): v for k, v in pairs.items()}
    tensors, modules, problems, seen = {}, {}, [], set()
    for name, placement in _claim(bound, names, pairs).items():
        key = _key(placement.path, placement.kernel_key)
        seen.add(key)
        a_q, b_q = pairs[key]
        rule, shown = rule_for(rules, placement.path, placement.kernel_key), "/".join(key[0])
        mismatch = _rule_mismatch(rule, a_q, name, shown)
        if mismatch:
            problems += mismatch
            continue
        kernel = base
        for k in placement.path:
            kernel = kernel[k]
        factors = _peft_factors(placement, kernel[placement.kernel_key], a_q, b_q)
        if isinstance(factors, str):
            problems.append(f"{name} ({shown}): {factors}")
            continue
        tensors[f"{PREFIX}{name}.lora_A.weight"], tensors[f"{PREFIX}{name}.lora_B.weight"] = factors
        modules[name] = rule
    problems += [f"qwix LoRA beside {'/'.join(path)}/{kernel}: no PEFT module name is placed there (pass "
                 "module_names=[...], the PyTorch model's module names)" for path, kernel in pairs
                 if (path, kernel) not in seen]
    return tensors, modules, problems


def from_qwix(qwix_state: Any, provider: Any, *, layout: Any = "tunix", module_names: Sequence[str] | None = None,
              base_params: Mapping | None = None, dtype: Any = None, **config_fields: Any) -> dict:
    """A qwix LoRA model's adapter as a jlora tree, for :func:`jlora.save` (PEFT's files), ``jlora.wrap`` /
    ``nnx_model`` or ``merge``.

    Every kernel with qwix LoRA becomes an ``AdaptedModule`` named by the PEFT module the layout places there (a
    fused kernel gives each part's module qwix's shared ``lora_a`` and its part of ``lora_b``). The config is PEFT's
    ``LoraConfig`` with ``r`` / ``lora_alpha`` of the most common qwix rule among the adapted modules, other rules'
    ranks and alphas as ``rank_pattern`` / ``alpha_pattern`` (so each module's scale is qwix's ``alpha / rank``),
    and ``target_modules`` the adapted modules (their last name part where every such module is adapted).

    Args:
        qwix_state: the qwix model (``nnx.Module``), its ``nnx.State`` or that state's pure dict.
        provider: the ``qwix.LoraProvider`` it was made with (or its rules, see :func:`qwix_rules`).
        layout: how PEFT module names map onto the tree (default ``"tunix"``; any :class:`jlora.Layout`).
        module_names: the PEFT (PyTorch) module names to look for; default :func:`default_module_names`.
        base_params: the tree to attach the adapter to (default: the qwix state without its LoRA leaves; pass the
            unquantized base for a QLoRA model, whose state holds quantized kernels).
        dtype: the factors' dtype (default float32, as PEFT keeps them).
        **config_fields: other ``LoraConfig`` fields for ``adapter_config.json``, e.g.
            ``base_model_name_or_path="meta-llama/Llama-3.2-1B"``, ``task_type="CAUSAL_LM"``.

    Returns:
        The base tree (pure dict) with the adapter, as :func:`jlora.load` returns it.

    Raises:
        TargetMismatchError: no qwix LoRA in the state, LoRA on a kernel no module name places, a provider whose
            rules do not give the state's ranks, factors that do not fit their kernel (all listed).
        AdapterError: ``config_fields`` that the provider decides (``r``, ``lora_alpha``, ``target_modules``, ...).

    Example:
        >>> lora_params = jlora.from_qwix(lora_model, provider, base_model_name_or_path="meta-llama/Llama-3.2-1B")
        >>> jlora.save(lora_params, "trained-adapter")        # PeftModel.from_pretrained(torch_model, ...)
    """
    rules = qwix_rules(provider)
    pure = _pure(qwix_state)
    pairs = qwix_lora_leaves(pure)
    if not pairs:
        raise TargetMismatchError("from_qwix: the qwix state holds no LoRA leaves (*_lora_a / *_lora_b)")
    base = as_param_tree(base_params) if base_params is not None else _without_lora(pure)
    names = list(module_names) if module_names is not None else default_module_names(base, layout)
    bound = get_layout(layout).bind(base, names)
    tensors, modules, problems = _collect(base, bound, names, pairs, rules)
    if problems:
        raise TargetMismatchError("from_qwix: the qwix LoRA cannot be written as PEFT modules", problems)
    config = _peft_config(modules, names, config_fields)
    return place(base, config, tensors, layout=layout, dtype=dtype, source="the qwix model's LoRA")
