"""LoRA on parameters (PEFT's ``target_parameters``): each targeted parameter as LoRA modules of its own.

PEFT's ``ParamWrapper`` puts a LoRA on an ``nn.Parameter`` (typically a mixture of experts' stacked expert
weights) and adds ``scale * B_e @ A_e`` to every expert's slice on each forward. Its file holds, per wrapped
parameter, ``lora_A`` ``(r * E, in)`` (rows expert-major: ``A_e`` is rows ``e*r:(e+1)*r``) and ``lora_B``
``(out, r * E)`` (columns expert-minor: ``B_e`` is columns ``e::E``). A 3-D parameter ``(E, d1, d2)`` is read as
``(E, out, in)``, or as ``(E, in, out)`` when the PyTorch class sets ``is_transposed``; a 2-D one as ``(out, in)``.
Several parameters of one module nest wrappers: the parameter the module registers first is innermost, its
keys ``<module>.base_layer.lora_A.weight`` (one ``base_layer.`` per level), the last one's
``<module>.lora_A.weight``.

jlora turns each wrapped parameter into LoRA modules that layouts place like any other: ``<module>.<param>.<e>``
for expert ``e`` of a 3-D parameter (``A_e`` ``(r, in)``, ``B_e`` ``(out, r)``; a layout rule stacks them with the
expert index as its ``layer`` group), ``<module>.<param>`` for a 2-D one. Which file keys belong to which
parameter, and how a 3-D one is read, is decided by the shapes that fit the tree.

Example:
    >>> tensors, parameters = split_wrappers(config, tensors, bound_layout, "adapter_model.safetensors")
    >>> parameters["model.layers.0.mlp.experts.down_proj.3"]
    ('model.layers.0.mlp.experts.down_proj', 'model.layers.0.mlp.experts')
"""
from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping

import numpy as np

from .config import LoraConfig
from .errors import TargetMismatchError
from .layout import HfLayout, Layout, Placement
from .spec import PREFIX, ModuleTensors, group_keys
from .targeting import module_rank

_WRAPPED = ".base_layer"


def _unwrapped(name: str) -> tuple[str, int]:
    """A PEFT key group's module name without its ``.base_layer`` levels, and their number (nesting depth)."""
    depth = 0
    while name.endswith(_WRAPPED):
        name, depth = name[: -len(_WRAPPED)], depth + 1
    return name, depth


def targeted_parameters(config: LoraConfig, module: str) -> list[str]:
    """The names of ``module``'s parameters that ``target_parameters`` selects (PEFT's match: the full name
    ``module.param`` equals an entry or ends with ``.`` + it)."""
    found = []
    for entry in config.target_parameters or ():
        param = entry.rpartition(".")[2]
        full = f"{module}.{param}"
        if (full == entry or full.endswith("." + entry)) and param not in found:
            found.append(param)
    return found


def wrapped_modules(config: LoraConfig, groups: Mapping[str, ModuleTensors]) -> dict[str, str]:
    """``{key group: module}`` for the groups of the file's keys (:func:`~jlora.spec.group_keys`) that are
    ParamWrappers: LoRA factors under a module (``.base_layer`` levels stripped) with targeted parameters."""
    out = {}
    for name, group in groups.items():
        module, _ = _unwrapped(name)
        if {"lora_A", "lora_B"} <= set(group.roles) and targeted_parameters(config, module):
            out[name] = module
    return out


def _fit(layout: Layout, placement: Placement | None, n_in: int, n_out: int, experts: int) -> bool:
    if placement is None or math.prod(placement.in_sizes) != n_in or math.prod(placement.out_sizes) != n_out:
        return False
    if not placement.stacked:
        return experts == 1
    return layout._module(placement.path)[placement.kernel_key].shape[placement.layer_axis] == experts


def split_wrappers(config: LoraConfig, tensors: Mapping[str, np.ndarray], layout: Layout,
                   source: str = "adapter_model.safetensors") -> tuple[Mapping, dict[str, tuple[str, str]]]:
    """``(tensors, parameters)``: the file's tensors with every ParamWrapper's factors split into per-expert LoRA
    modules (see module docstring), and for each such module ``(PEFT parameter name, wrapper module name)``.
    Raises a :class:`TargetMismatchError` listing every wrapper whose tensors fit none (or several) of its
    module's targeted parameters."""
    if not config.target_parameters:
        return tensors, {}
    levels: dict[str, dict[int, str]] = {}  # module -> {depth: key group}
    groups = group_keys(tensors.keys(), source)
    for name, module in wrapped_modules(config, groups).items():
        levels.setdefault(module, {})[_unwrapped(name)[1]] = name
    out = dict(tensors)
    parameters: dict[str, tuple[str, str]] = {}
    problems, square = [], []
    for module, by_depth in levels.items():
        candidates = targeted_parameters(config, module)
        fitting: dict[tuple[int, str], Placement] = {}
        for depth, param in itertools.product(by_depth, candidates):
            roles = groups[by_depth[depth]].roles
            a, b = tensors[roles["lora_A"]], tensors[roles["lora_B"]]
            rank = module_rank(config, f"{module}.{param}")
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] % rank or b.shape[1] != a.shape[0]:
                continue
            experts = a.shape[0] // rank
            fits = lambda p, a=a, b=b, e=experts: _fit(layout, p, a.shape[1], b.shape[0], e)  # noqa: E731
            placement = layout.place(f"{module}.{param}" + (".0" if experts > 1 else ""), "parameter", fits)
            if fits(placement):
                fitting[depth, param] = placement
        depths = sorted(by_depth)
        choices = [perm for perm in itertools.permutations(candidates, len(depths))
                   if all((d, p) in fitting for d, p in zip(depths, perm))]
        shapes = "; ".join(f"{PREFIX}{by_depth[d]}.lora_A/B.weight: "
                           f"{list(tensors[groups[by_depth[d]].roles['lora_A']].shape)} / "
                           f"{list(tensors[groups[by_depth[d]].roles['lora_B']].shape)}" for d in depths)
        if len(choices) != 1 or depths != list(range(len(depths))):
            what = "fit none" if not choices else "fit more than one assignment"
            problems.append(f"{module}: the LoRA factors of its {len(depths)} ParamWrapper(s) ({shapes}) {what} of "
                            f"its targeted parameters {candidates} in the {layout.tree_name} tree (rank "
                            f"{[module_rank(config, f'{module}.{p}') for p in candidates]}; a 3-D parameter's "
                            "lora_A has rank x experts rows)")
            continue
        for depth, param in zip(depths, choices[0]):
            wrapper = by_depth[depth]
            roles = groups[wrapper].roles
            a, b = np.asarray(tensors[roles["lora_A"]]), np.asarray(tensors[roles["lora_B"]])
            del out[roles["lora_A"]], out[roles["lora_B"]]
            name, rank = f"{module}.{param}", module_rank(config, f"{module}.{param}")
            experts = a.shape[0] // rank
            if experts == 1 and not fitting[depth, param].stacked:
                out[f"{PREFIX}{name}.lora_A.weight"], out[f"{PREFIX}{name}.lora_B.weight"] = a, b
                parameters[name] = (name, wrapper)
                continue
            placement = fitting[depth, param]
            if isinstance(layout, HfLayout) and math.prod(placement.in_sizes) == math.prod(placement.out_sizes):
                square.append(name)
            a_e, b_e = a.reshape(experts, rank, a.shape[1]), b.reshape(b.shape[0], rank, experts)
            for e in range(experts):
                out[f"{PREFIX}{name}.{e}.lora_A.weight"] = a_e[e]
                out[f"{PREFIX}{name}.{e}.lora_B.weight"] = b_e[:, :, e]
                parameters[f"{name}.{e}"] = (name, wrapper)
    if problems:
        raise TargetMismatchError(f"{source}: LoRA on parameters (target_parameters) that does not fit this "
                                  "parameter tree", problems)
    if square:
        warnings.warn(f"{len(square)} targeted expert weights have square experts ({square[0]}, ...): they are read "
                      "as (experts, out, in), as PEFT reads classes without `is_transposed`. For a class that sets "
                      "it (transformers >= 5 GptOssExperts: (experts, in, out)) place them with a jlora.Rule "
                      "'o i -> layer i o' (see the README)", stacklevel=3)
    return out, parameters


def wrapper_tensors(spec_wrapper: str, per_expert: list[tuple[int, dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    """The inverse of :func:`split_wrappers` for one parameter: PEFT's two tensors of its ParamWrapper
    ``spec_wrapper`` from each expert's ``(index, {"lora_A": (r, in), "lora_B": (out, r)})`` (2-D: one, index 0)."""
    per_expert = sorted(per_expert, key=lambda item: item[0])
    a = np.concatenate([v["lora_A"] for _, v in per_expert])  # (E r, in), expert-major
    b = np.stack([v["lora_B"] for _, v in per_expert], axis=-1)  # (out, r, E): expert-minor columns
    return {f"{PREFIX}{spec_wrapper}.lora_A.weight": a,
            f"{PREFIX}{spec_wrapper}.lora_B.weight": b.reshape(b.shape[0], -1)}
