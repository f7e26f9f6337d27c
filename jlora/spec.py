"""From PEFT checkpoint keys + config + layout to a target spec: what goes where, checked.

Every problem (unknown key, missing module, shape mismatch, config disagreement) is collected and
raised together in one :class:`TargetMismatchError`.

Example:
    >>> targets = build_targets(config, tensors, layout.bind(params, names))
    >>> targets[0].name, targets[0].placement.path
    ('model.layers.0.self_attn.q_proj', ('model', 'layers', '0', 'self_attn', 'q_proj'))
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from .config import LoraConfig
from .errors import CheckpointError, TargetMismatchError
from .layout import Layout, Placement
from .targeting import is_module_to_save, module_rank, module_scale

PREFIX = "base_model.model."

# PEFT key suffix -> role of the tensor in its module
_ROLES = (
    (".lora_A.weight", "lora_A"),
    (".lora_B.weight", "lora_B"),
    (".lora_B.bias", "lora_bias"),
    (".lora_embedding_A", "emb_A"),
    (".lora_embedding_B", "emb_B"),
    (".lora_magnitude_vector", "magnitude"),
    (".lora_magnitude_vector.weight", "magnitude"),
    (".token_adapter.trainable_tokens_delta", "token_delta"),
    (".lora_diag", "lora_diag"),
)
# tensors of LoRA variants whose forward at inference is plain LoRA: PEFT key part -> (the config field that enables
# the variant, its name)
VARIANT_TENSORS = {".lora_velora_embed": ("velora_config", "VeLoRA"),
                   ".lora_monteclora_sampler.": ("monteclora_config", "MonteCLoRA")}


def variant_of(extra: str) -> tuple[str, str]:
    """(config field, name) of the LoRA variant whose tensor has the PEFT key suffix ``extra``."""
    return next(v for part, v in VARIANT_TENSORS.items() if f".{extra}".startswith(part))


@dataclasses.dataclass
class ModuleTensors:
    """The file's tensors for one PEFT module: role -> full key; params: torch param -> full key."""

    name: str
    roles: dict[str, str] = dataclasses.field(default_factory=dict)
    params: dict[str, str] = dataclasses.field(default_factory=dict)
    extras: dict[str, str] = dataclasses.field(default_factory=dict)  # variant tensor (PEFT key suffix) -> full key


@dataclasses.dataclass
class Target:
    """One module of the tree that the adapter changes, fully resolved and shape-checked."""

    name: str
    placement: Placement
    tensors: ModuleTensors
    scale: float = 1.0
    token_indices: tuple[int, ...] = ()
    tied_copy: str = ""  # PEFT name of an output head whose tensors mirror this embedding's (ensure_weight_tying)
    parameter: str = ""  # a LoRA on a parameter (jlora.param_targets): its PEFT name (``module.param``)
    wrapper: str = ""  # ... and its ParamWrapper module's PEFT key group


def group_keys(keys, source: str = "adapter_model.safetensors") -> dict[str, ModuleTensors]:
    """Group checkpoint keys by PEFT module name (``base_model.model.`` stripped)."""
    groups: dict[str, ModuleTensors] = {}
    bad = []
    for key in keys:
        if not key.startswith(PREFIX):
            bad.append(f"{key!r} does not start with {PREFIX!r}")
            continue
        rest = key[len(PREFIX):]
        extra = next((rest.index(part) for part in VARIANT_TENSORS if part in rest), None)
        if extra is not None and extra > 0:
            groups.setdefault(rest[:extra], ModuleTensors(rest[:extra])).extras[rest[extra + 1:]] = key
            continue
        for suffix, role in _ROLES:
            if rest.endswith(suffix):
                name = rest[: -len(suffix)]
                group = groups.setdefault(name, ModuleTensors(name))
                group.roles[role] = key
                break
        else:
            name, _, param = rest.rpartition(".")
            if not name:
                bad.append(f"{key!r} names no module")
                continue
            stored_as = param
            if name.endswith(".base_layer"):
                name, stored_as = name[: -len(".base_layer")], "base_layer." + param
            groups.setdefault(name, ModuleTensors(name)).params[stored_as] = key
    if bad:
        raise CheckpointError(f"{source}: keys that are not PEFT LoRA keys", bad)
    return groups


def _token_indices(config: LoraConfig, name: str) -> tuple[int, ...] | None:
    tti = config.trainable_token_indices
    if tti is None:
        return None
    if isinstance(tti, list):
        return tuple(tti)
    for key, idx in tti.items():
        if name == key or name.endswith("." + key):
            return tuple(idx)
    return None


def _mirrors(head: ModuleTensors, embedding: ModuleTensors, tensors: Mapping[str, np.ndarray]) -> bool:
    """Whether ``head``'s tensors are the tied copy PEFT saves of ``embedding``'s (ensure_weight_tying): the same
    modules_to_save table, or LoRA factors ``lora_A = lora_embedding_B.T``, ``lora_B = lora_embedding_A.T``
    (plus the same base table)."""
    def equal(key: str, other: str, transposed: bool = False) -> bool:
        x, y = np.asarray(tensors[key]), np.asarray(tensors[other])
        return np.array_equal(x, y.T if transposed else y)

    if set(head.params) - {"weight", "base_layer.weight"} or not all(
            p in embedding.params and equal(k, embedding.params[p]) for p, k in head.params.items()):
        return False
    if not head.roles and not embedding.roles:
        return "weight" in head.params
    return (set(head.roles) == {"lora_A", "lora_B"} and set(embedding.roles) == {"emb_A", "emb_B"}
            and equal(head.roles["lora_A"], embedding.roles["emb_B"], transposed=True)
            and equal(head.roles["lora_B"], embedding.roles["emb_A"], transposed=True))


def _tied_head_copies(config: LoraConfig, groups: dict[str, ModuleTensors], tensors, layout: Layout) -> dict[str, str]:
    """``{embedding module: head module}`` for output heads saved as tied copies of the input embedding's adapter
    (PEFT with ``ensure_weight_tying``) when the tree ties its head to that table, so the head has no place."""
    if not config.ensure_weight_tying or not layout.head_tied_to_embedding():
        return {}
    heads = [n for n in groups if n.rpartition(".")[2] in ("lm_head", "embed_out") and layout.place(n, None) is None]
    embeddings = [n for n, g in groups.items() if "emb_A" in g.roles or (
        "weight" in g.params and (p := layout.place(n, None)) is not None and "embedding" in layout._module(p.path))]
    if len(heads) != 1 or len(embeddings) != 1 or not _mirrors(groups[heads[0]], groups[embeddings[0]], tensors):
        return {}
    return {embeddings[0]: heads[0]}


def build_targets(config: LoraConfig, tensors: Mapping[str, np.ndarray], layout: Layout,
                  source: str = "adapter_model.safetensors",
                  parameters: Mapping[str, tuple[str, str]] | None = None) -> list[Target]:
    """Resolve every module of the checkpoint against the tree; raise all problems at once. ``parameters``: the
    modules that are LoRAs on parameters, with their PEFT parameter and wrapper names (``param_targets``)."""
    parameters = parameters or {}
    groups = group_keys(tensors.keys(), source)
    tied = _tied_head_copies(config, groups, tensors, layout)
    for head in tied.values():
        del groups[head]
    problems: list[str] = []
    targets: list[Target] = []
    tree_name = getattr(layout, "tree_name", "Flax")  # "Flax", "PyTorch": how messages call the tree

    def shape(key):
        return tuple(tensors[key].shape)

    for name, group in groups.items():
        roles = group.roles
        emb = "emb_A" in roles or "emb_B" in roles
        if emb:
            roles["lora_A"], roles["lora_B"] = roles.pop("emb_A", None), roles.pop("emb_B", None)
        has_lora = "lora_A" in roles or "lora_B" in roles
        for need in ("lora_A", "lora_B"):
            if has_lora and not roles.get(need):
                problems.append(f"{name}: has {'lora_B' if need == 'lora_A' else 'lora_A'} but no {need}")
        if has_lora and not (roles.get("lora_A") and roles.get("lora_B")):
            continue
        if "magnitude" in roles and not config.use_dora:
            problems.append(f"{roles['magnitude']}: DoRA magnitude in the file but use_dora is false")
        if has_lora and config.use_dora and "magnitude" not in roles:
            problems.append(f"{name}: use_dora is true but the file has no lora_magnitude_vector")
        if "lora_bias" in roles and not config.lora_bias:
            problems.append(f"{roles['lora_bias']}: lora_B bias in the file but lora_bias is false")
        if ("magnitude" in roles or "lora_bias" in roles) and not has_lora:
            problems.append(f"{name}: DoRA/lora_bias tensors without lora_A/lora_B")
            continue
        for extra, key in group.extras.items():
            field, _ = variant_of(extra)
            if not getattr(config, field):
                problems.append(f"{key}: a tensor of the LoRA variant {field} set, but the config does not set it")
            elif not has_lora:
                problems.append(f"{key}: variant tensors without lora_A/lora_B")

        parameter, wrapper = parameters.get(name, ("", ""))
        kind = "parameter" if parameter else "embedding" if emb else "linear"
        fits = None
        if parameter:  # (of the readings of a parameter, the one its factors fit: see param_targets)
            a_in, b_out = shape(roles["lora_A"])[1:], shape(roles["lora_B"])[:1]
            fits = lambda p: (int(np.prod(p.in_sizes)),) == a_in and (int(np.prod(p.out_sizes)),) == b_out  # noqa: E731
        placement = layout.place(name, kind if has_lora else None, fits)
        if placement is None:
            problems.append(layout.explain_missing(name))
            continue
        module = layout._module(placement.path)
        target = Target(name, placement, group, tied_copy=tied.get(name, ""), parameter=parameter, wrapper=wrapper)
        pattern_name = parameter or name  # (rank and alpha patterns see a parameter's name, as PEFT matches them)

        if has_lora and config.alora_invocation_tokens and (emb or placement.b_tail or parameter):
            problems.append(f"{name}: aLoRA (alora_invocation_tokens) on an embedding, a convolution or a parameter: "
                            "PEFT's aLoRA adapts Linear layers only")
        if has_lora:
            where = "/".join(map(str, placement.path + (placement.kernel_key,)))
            found_leaf = f"{tree_name} {placement.kernel_key} {list(module[placement.kernel_key].shape)} at {where}"
            a, b = shape(roles["lora_A"]), shape(roles["lora_B"])
            rank = module_rank(config, pattern_name)
            out_total = int(np.prod(placement.out_sizes))
            grouped = placement.b_tail and a[:1] == (rank,) and len(b) > 1 and 0 < b[1] < rank and rank % b[1] == 0
            if grouped:  # PEFT gives a grouped conv's lora_B the base layer's groups: (out, r / groups, 1, ...)
                placement = placement.with_groups(rank // b[1])
                target.placement = placement
                if "magnitude" in roles or placement.stacked:
                    problems.append(f"{name}: LoRA on a grouped convolution (groups={placement.groups}) with "
                                    f"{'DoRA' if 'magnitude' in roles else 'stacked layers'} is not supported")
                    continue
                b = (b[0], rank, *b[2:])  # (checked as its block-diagonal (out, r) below)
                if out_total % placement.groups:
                    problems.append(f"{name}: {out_total} output channels do not split into {placement.groups} groups")
            a_blocks, b_blocks = config.block_diagonal(name)
            strict = (config.use_bdlora or {}).get("match_strict", True)
            if config.use_bdlora and strict and a_blocks == b_blocks == 1:
                problems.append(f"{name}: BD-LoRA (use_bdlora, match_strict) but the module matches neither "
                                "target_modules_bd_a nor target_modules_bd_b")
            if a_blocks > 1 or b_blocks > 1:
                blocks = max(a_blocks, b_blocks)
                if emb or placement.b_tail or parameter or placement.stacked or placement.fused:
                    problems.append(f"{name}: BD-LoRA (use_bdlora) on an embedding, a convolution or a parameter "
                                    "(PEFT's BD-LoRA adapts Linear layers only), or on a stacked or fused kernel "
                                    "(not supported)")
                    continue
                in_total = int(np.prod(placement.in_sizes))
                if rank % blocks or (in_total if a_blocks > 1 else out_total) % blocks:
                    problems.append(f"{name}: BD-LoRA with {blocks} blocks needs the rank ({rank}) and the "
                                    f"{'input' if a_blocks > 1 else 'output'} size "
                                    f"({in_total if a_blocks > 1 else out_total}) divisible by {blocks}")
                    continue
                placement = placement.with_blocks(a_blocks, b_blocks)
                target.placement = placement
                if b_blocks > 1 and b[1:2] == (rank // b_blocks,):
                    b = (b[0], rank, *b[2:])  # (checked as its block-diagonal (out, r) below)
            if "lora_diag" in roles or config.kasa_config:
                in_total = int(np.prod(placement.in_sizes))
                if not config.kasa_config or "lora_diag" not in roles:
                    problems.append(f"{name}: KaSA's lora_diag and kasa_config come together (one is missing)")
                elif emb or placement.b_tail or parameter or placement.stacked or placement.fused:
                    problems.append(f"{name}: KaSA on an embedding, a convolution or a parameter (PEFT's KaSA adapts "
                                    "Linear layers only), or on a stacked or fused kernel (not supported)")
                elif shape(roles["lora_diag"]) != (rank,) or not rank < min(in_total, out_total):
                    problems.append(f"{roles['lora_diag']}: shape {list(shape(roles['lora_diag']))} for rank {rank} "
                                    f"(KaSA needs r < min(in, out) = {min(in_total, out_total)})")
            if a[:1] != (rank,) or b[1:2] != (rank,):
                problems.append(f"{name}: rank {a[0] if a else None} (lora_A {list(a)}, lora_B {list(b)}) but "
                                f"the config gives rank {rank}")
            if a[1:] != placement.a_tail:
                problems.append(f"{roles['lora_A']}: shape {list(a)} does not fit the {found_leaf} "
                                f"(expected input size {list(placement.a_tail)})")
            if b[:1] != (out_total,) or b[2:] != placement.b_tail:
                problems.append(f"{roles['lora_B']}: shape {list(b)} does not fit the {found_leaf} "
                                f"(expected output size {out_total})")
            for role, want in (("magnitude", placement.magnitude_shape), ("lora_bias", (out_total,))):
                if role in roles and shape(roles[role]) != want:
                    problems.append(f"{roles[role]}: shape {list(shape(roles[role]))}, expected {list(want)}")
            if "lora_bias" in roles and (placement.stacked or placement.fused):
                problems.append(f"{roles['lora_bias']}: lora_bias on a stacked or fused kernel is not supported")
            if group.extras and (placement.stacked or placement.fused):
                problems.append(f"{name}: variant tensors {sorted(group.extras)} on a stacked or fused kernel are not "
                                "supported")
            if group.params and (placement.stacked or placement.fused):
                problems.append(f"{name}: replacement tensors {sorted(group.params)} for a stacked or fused "
                                "kernel are not supported")
            target.scale = module_scale(config, pattern_name)

        if "token_delta" in roles:
            indices = _token_indices(config, name)
            delta = shape(roles["token_delta"])
            table_key = layout.embedding_key(placement.path)
            emb_table = module[table_key] if table_key else None
            if indices is None:
                problems.append(f"{roles['token_delta']}: trainable token delta in the file but the config's "
                                "trainable_token_indices does not cover this module")
            elif emb_table is None:
                problems.append(f"{roles['token_delta']}: trainable tokens need an embedding table at "
                                f"{'/'.join(map(str, placement.path))}")
            else:
                if delta != (len(indices), emb_table.shape[1]):
                    problems.append(f"{roles['token_delta']}: shape {list(delta)}, expected "
                                    f"{[len(indices), emb_table.shape[1]]} ({len(indices)} token indices)")
                too_big = [i for i in indices if i >= emb_table.shape[0]]
                if too_big:
                    problems.append(f"{name}: trainable token indices {too_big} exceed the vocabulary size "
                                    f"{emb_table.shape[0]} of the {tree_name} embedding")
                target.token_indices = indices
                if placement.kind == "none":  # the table is the module's kernel for merging the rows
                    target.placement = dataclasses.replace(placement, kernel_key=table_key)

        for stored_as, key in group.params.items():
            param = stored_as.rpartition(".")[2]
            mapping = layout.param_mapping(placement.path, param)
            if mapping is None:
                problems.append(f"{key}: module {'/'.join(map(str, placement.path))} has no parameter "
                                f"for PyTorch {param!r} (has {sorted(map(str, module))})")
                continue
            base = module[mapping.flax_key]
            found = mapping.to_flax(np.empty(shape(key), np.bool_)).shape if len(shape(key)) == base.ndim else None
            if found != tuple(base.shape):
                what = "vocabulary sizes differ (resized embeddings?): " if mapping.flax_key == "embedding" else ""
                as_flax = f" (as {tree_name} {list(found)})" if found is not None and found != shape(key) else ""
                problems.append(f"{key}: {what}shape {list(shape(key))}{as_flax} does not match "
                                f"{'/'.join(map(str, placement.path + (mapping.flax_key,)))} {list(base.shape)}")
        targets.append(target)

    if problems:
        raise TargetMismatchError(f"{source}: the adapter does not fit this parameter tree "
                                  f"({len(problems)} problem{'s' if len(problems) > 1 else ''})", problems)
    return targets


def is_trainable_param(config: LoraConfig, name: str, stored_as: str) -> bool:
    """Whether PEFT trains a saved replacement tensor (modules_to_save, or bias with bias != none)."""
    if is_module_to_save(config, name):
        return True
    return stored_as.rpartition(".")[2] == "bias" and config.bias != "none"
