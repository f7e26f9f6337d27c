"""Place resolved targets and their tensors onto a parameter tree (pure: nothing is mutated).

Targets that land on the same kernel (the layers of a stacked kernel, the parts of a fused one)
become one :class:`AdaptedModule` whose factors hold them all: per-part blocks of rank columns,
zero-padded to the largest rank, zeros for layers the adapter does not touch, and a per-column
``lora_scale`` (zero on padding, so padding never trains).

Example:
    >>> lora_params = inject(params, config, tensors, targets, layout)
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from .config import LoraConfig
from .errors import AdapterError, UnsupportedAdapterError
from .kasa import dropped_components
from .layout import Layout
from .placement import Placer, lora_axes
from .spec import Target, is_trainable_param
from .tree import (
    BASE_TABLE,
    KASA_DOWN,
    KASA_UP,
    LORA_A,
    LORA_B,
    LORA_BIAS,
    LORA_DIAG,
    MAGNITUDE,
    RANK_SCALE,
    TOKEN_DELTA,
    VARIANT_EXTRA,
    AdaptedModule,
    FactorSource,
    ModuleSpec,
    get_path,
    set_paths,
)

# PEFT role -> (jlora child key, PEFT key suffix), per kind
_SUFFIXES = {
    "linear": {"lora_A": (LORA_A, "lora_A.weight"), "lora_B": (LORA_B, "lora_B.weight"),
               "magnitude": (MAGNITUDE, "lora_magnitude_vector"), "lora_bias": (LORA_BIAS, "lora_B.bias"),
               "lora_diag": (LORA_DIAG, "lora_diag")},
    "embedding": {"lora_A": (LORA_A, "lora_embedding_A"), "lora_B": (LORA_B, "lora_embedding_B"),
                  "magnitude": (MAGNITUDE, "lora_magnitude_vector")},
}


def _pad(x: np.ndarray, axis: int, width: int | None) -> np.ndarray:
    """``x`` zero-padded along its rank ``axis`` to ``width`` columns (as is when None or equal)."""
    if width is None or x.shape[axis] == width:
        return x
    pads = [(0, 0)] * x.ndim
    pads[axis] = (0, width - x.shape[axis])
    return np.pad(x, pads)


def _factors(targets: list[Target], tensors, kernel_shape: tuple,
             pad_rank: int | None = None) -> tuple[dict, list[FactorSource]]:
    """Stored factors (and DoRA/bias vectors) for all targets of one kernel, as host arrays (views of
    the file where possible), each part's block of rank columns ``pad_rank`` wide if given."""
    first = targets[0].placement
    kind = first.kind
    a_list = [first.a_to_canonical(np.asarray(tensors[t.tensors.roles["lora_A"]])) for t in targets]
    b_list = [first.b_to_canonical(np.asarray(tensors[t.tensors.roles["lora_B"]])) for t in targets]
    simple = len(targets) == 1 and not first.stacked and not first.fused
    if simple:
        t = targets[0]
        children = {LORA_A: _pad(a_list[0], -1, pad_rank), LORA_B: _pad(b_list[0], 0, pad_rank),
                    RANK_SCALE: np.asarray(t.scale, np.float32)}
        for role, child in (("magnitude", MAGNITUDE), ("lora_bias", LORA_BIAS)):
            if role in t.tensors.roles:
                children[child] = first.out_to_canonical(np.asarray(tensors[t.tensors.roles[role]]))
        if "lora_diag" in t.tensors.roles:  # KaSA (simple Linear modules only: see build_targets)
            children[LORA_DIAG] = np.asarray(tensors[t.tensors.roles["lora_diag"]])  # (pad_rank refuses KaSA)
        keys = tuple(sorted(_SUFFIXES[kind][r] for r in t.tensors.roles if r in _SUFFIXES[kind]))
        source = FactorSource(t.parameter or t.name, a_list[0].shape[-1], 0, t.placement, keys)
        return children, [source]

    # stacked and/or fused: blocks of rank columns per part, layers along a leading axis for now
    parts = sorted({t.placement.part or 0 for t in targets})
    width = {p: pad_rank or max(a.shape[-1] for a, t in zip(a_list, targets) if (t.placement.part or 0) == p)
             for p in parts}
    offsets, total = {}, 0
    for p in parts:
        offsets[p], total = total, total + width[p]
    n_layers = kernel_shape[first.layer_axis] if first.stacked else 1
    in_shape = a_list[0].shape[:-1]
    no_layer_kernel = tuple(d for i, d in enumerate(kernel_shape) if i != first.layer_axis)
    canonical = tuple(no_layer_kernel[i] for i in np.argsort(first.kernel_perm))
    out_shape = canonical[first.in_ndim:]
    a = np.zeros((n_layers, *in_shape, total), np.float32)
    b = np.zeros((n_layers, total, *out_shape), np.float32)
    scale = np.zeros((n_layers, *([1] * len(in_shape)), total), np.float32)
    dora = any("magnitude" in t.tensors.roles for t in targets)
    magnitude = np.ones((n_layers, *out_shape), np.float32) if dora else None
    n_parts = out_shape[first.part_axis - first.in_ndim] if first.fused else 1
    if dora and len({(t.placement.layer, t.placement.part) for t in targets}) < n_layers * n_parts:
        raise UnsupportedAdapterError(
            f"{targets[0].name} and {len(targets) - 1} more: DoRA on a stacked or fused kernel needs the adapter "
            f"to cover all {n_layers} layer(s) x {n_parts} part(s) of it (untouched parts would need a magnitude "
            "that must not train)")
    sources = []
    for t, a_t, b_t in zip(targets, a_list, b_list):
        pl = t.placement
        layer, part, r = pl.layer or 0, pl.part or 0, a_t.shape[-1]
        cols = slice(offsets[part], offsets[part] + r)
        a[layer, ..., cols] = a_t
        scale[layer, ..., cols] = t.scale
        out_index = [slice(None)] * len(out_shape)
        if pl.fused:
            out_index[pl.part_axis - pl.in_ndim] = part
        b[(layer, cols, *out_index)] = b_t
        if "magnitude" in t.tensors.roles:
            magnitude[(layer, *out_index)] = pl.out_to_canonical(np.asarray(tensors[t.tensors.roles["magnitude"]]))
        keys = tuple(sorted(_SUFFIXES[kind][r_] for r_ in t.tensors.roles if r_ in _SUFFIXES[kind]))
        sources.append(FactorSource(t.parameter or t.name, r, offsets[part], pl, keys))
    children = {LORA_A: a, LORA_B: b, RANK_SCALE: scale}
    if dora:
        children[MAGNITUDE] = magnitude
    if first.stacked:
        children = {k: np.moveaxis(v, 0, min(first.layer_axis, v.ndim - 1)) for k, v in children.items()}
    else:
        children = {k: v[0] for k, v in children.items()}
    return children, sources


def _checked_pad_rank(targets: list[Target], tensors, pad_rank: int | None) -> int | None:
    """``pad_rank`` as an int (None stays None), after checking it fits every module's rank."""
    if pad_rank is None:
        return None
    if isinstance(pad_rank, bool) or not isinstance(pad_rank, (int, np.integer)) or pad_rank < 1:
        raise AdapterError(f"pad_rank must be a positive int, found {pad_rank!r}")
    pad_rank = int(pad_rank)
    blocked = [t.name for t in targets if t.placement.a_blocks > 1 or t.placement.b_blocks > 1
               or "lora_diag" in t.tensors.roles]
    if blocked:  # (its blocks of rank rows would move; rank-dependent layouts must not share a program)
        raise UnsupportedAdapterError("pad_rank: block-diagonal factors (LoRA on grouped convolutions, BD-LoRA) and "
                                      "KaSA are not supported", blocked)
    too_wide = [f"{t.name}: rank {tensors[t.tensors.roles['lora_A']].shape[0]}" for t in targets
                if "lora_A" in t.tensors.roles and tensors[t.tensors.roles["lora_A"]].shape[0] > pad_rank]
    if too_wide:
        raise AdapterError(f"pad_rank={pad_rank} is smaller than these modules' ranks", too_wide)
    return pad_rank


def inject(params: Mapping, config: LoraConfig, tensors: Mapping[str, np.ndarray], targets: list[Target],
           layout: Layout, *, dtype=None, placer: Placer | None = None, pad_rank: int | None = None) -> dict:
    """A new tree: ``params`` with each target's module dict replaced by an :class:`AdaptedModule`.

    LoRA factors are stored in ``dtype`` (default float32, as PEFT keeps adapters); replacement
    tensors (modules_to_save, biases, trainable-token rows) in the dtype of the leaf they replace.
    ``placer`` decides where each new leaf lives (default: derived from the base leaves' shardings).
    ``pad_rank``: zero-pad every module's rank axis (each part's block, for fused kernels) to this width.
    """
    pad_rank = _checked_pad_rank(targets, tensors, pad_rank)
    adapter_dtype = np.dtype(jnp.dtype(dtype or jnp.float32))
    placer = placer or Placer()
    config_json = config.to_json()
    by_module: dict[tuple, list[Target]] = defaultdict(list)
    for t in targets:  # (a LoRA on a parameter replaces the parameter's leaf: its node is a module of one array)
        by_module[t.placement.path + ((t.placement.kernel_key,) if t.wrapper else ())].append(t)
    updates = {}
    kasa = sum("lora_diag" in t.tensors.roles for t in targets)  # (one SVD of a kernel each: seconds on big ones)
    svd_bar = tqdm(total=kasa, desc="jlora: KaSA, SVD of the base kernels", unit="kernel", disable=kasa < 16)
    for path, group in by_module.items():
        module = {path[-1]: get_path(params, path)} if group[0].wrapper else get_path(params, path)
        children = dict(module)
        trainable, file_keys, sources, token_head = [], [], [], ()
        lora = [t for t in group if t.placement.kind != "none"]
        first = lora[0].placement if lora else group[0].placement
        if lora:
            kernel_keys = {t.placement.kernel_key for t in lora}
            if len(kernel_keys) > 1:
                raise NotImplementedError(f"{path}: adapters on several kernels of one module: {kernel_keys}")
            kernel = module[first.kernel_key]
            combined = len(lora) > 1 or first.stacked or first.fused
            roles = {v[0]: k for k, v in _SUFFIXES[first.kind].items()}  # child -> PEFT role
            for t in lora if combined else ():  # built from several tensors: check those before combining
                for key in (t.tensors.roles[r] for r in roles.values() if r in t.tensors.roles):
                    placer.check_values(tensors[key], key)
            factors, sources = _factors(lora, tensors, tuple(kernel.shape), pad_rank)
            for child, value in factors.items():  # simple modules: checked shard by shard as placed
                from_file = not combined and child != RANK_SCALE
                children[child] = placer.put(value, np.float32 if child == RANK_SCALE else adapter_dtype,
                                             path=path + (child,), base=kernel, checked=not from_file,
                                             key=lora[0].tensors.roles[roles[child]] if from_file else "",
                                             axes=lora_axes(child, first.in_ndim, first.kernel_perm, first.layer_axis,
                                                            value.ndim))
            frozen = {RANK_SCALE} if config.trains_lora_b else {RANK_SCALE, LORA_B, LORA_BIAS}  # (MiCA: all of lora_B)
            trainable += [k for k in factors if k not in frozen]
            if LORA_DIAG in factors:  # KaSA: the base weight's dropped components, frozen beside the base
                dropped = dropped_components(kernel, first.in_ndim, first.kernel_perm, sources[0].rank)
                for child, value, role in zip((KASA_DOWN, KASA_UP), dropped, ("lora_A", "lora_B")):
                    children[child] = placer.put(value, np.float32, path=path + (child,), base=kernel, checked=True,
                                                 axes=lora_axes(role, first.in_ndim, first.kernel_perm))
                svd_bar.update()
        for t in group:
            for extra, key in t.tensors.extras.items():  # (only with LoRA factors: see build_targets)
                child, host = VARIANT_EXTRA + extra, np.asarray(tensors[key])
                children[child] = placer.put(host, host.dtype, path=path + (child,), base=module[first.kernel_key],
                                             key=key, axes=(None,) * host.ndim)
                file_keys.append((child, extra))
            for stored_as, key in t.tensors.params.items():
                mapping = layout.param_mapping(path, stored_as.rpartition(".")[2])
                base = module[mapping.flax_key]
                children[mapping.flax_key] = placer.put(mapping.to_flax(tensors[key]), base.dtype, base=base, key=key,
                                                        path=path + (mapping.flax_key,), axes=tuple(range(base.ndim)))
                if mapping.flax_key == "embedding" and not lora and not t.tied_copy and layout.head_tied_to_embedding():
                    children[BASE_TABLE] = base  # modules_to_save: PEFT's tied head keeps the base table
                file_keys.append((mapping.flax_key, stored_as))
                if is_trainable_param(config, t.name, stored_as):
                    trainable.append(mapping.flax_key)
            if "token_delta" in t.tensors.roles:
                table = module[t.placement.kernel_key]
                children[TOKEN_DELTA] = placer.put(tensors[t.tensors.roles["token_delta"]], table.dtype, base=table,
                                                   path=path + (TOKEN_DELTA,), axes=(None, 1),
                                                   key=t.tensors.roles["token_delta"])
                trainable.append(TOKEN_DELTA)
                file_keys.append((TOKEN_DELTA, "token_adapter.trainable_tokens_delta"))
                head = layout.head_copying(table)  # PEFT ties trainable tokens to a tied head: its rows change too
                if head is not None and head not in by_module:  # (a head the adapter changes itself stays as is)
                    token_head = (len(path), head + ("kernel",))
        spec = ModuleSpec(
            peft_name=group[0].parameter or group[0].name,
            kind=first.kind if lora else "none",
            kernel_key=first.kernel_key,
            in_ndim=first.in_ndim,
            kernel_perm=first.kernel_perm,
            layer_axis=first.layer_axis,
            dora=MAGNITUDE in children,
            dropout=float(config.lora_dropout),
            token_indices=tuple(int(i) for t in group for i in t.token_indices),
            trainable=tuple(sorted(set(trainable))),
            file_keys=tuple(sorted(file_keys)),
            sources=tuple(sources),
            config_json=config_json,
            tied_copy=next((t.tied_copy for t in group if t.tied_copy), ""),
            token_head=token_head,
            wrapper=group[0].wrapper,
            activated=bool(lora) and bool(config.alora_invocation_tokens),
        )
        updates[path] = AdaptedModule(children, spec)
    svd_bar.close()
    placer.finish()
    updates = {path: AdaptedModule({k: placer.resolve(v) for k, v in node.items()}, node.spec)
               for path, node in updates.items()}
    return set_paths(params, updates)
