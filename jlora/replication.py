"""Layer replication (PEFT's ``layer_replication``): a deeper model made of the base model's layers, weights shared.

PEFT's map ``[[0, 4], [2, 5]]`` turns layers ``0 1 2 3 4`` into ``0 1 2 3 2 3 4``: seven layers, the repeated ones
sharing their base weights, each with its own LoRA (the adapter's keys count the new layers). In JAX the model is
built for the new depth and the parameter tree repeats the layers by reference:

Example:
    >>> deep = jlora.replicate_layers(model.params, [[0, 4], [2, 5]])     # 7 layers, no array copied
    >>> config.num_hidden_layers = 7; deeper = FlaxLlamaForCausalLM(config, _do_init=False)
    >>> logits = jlora.wrap(deeper.__call__)(ids, params=jlora.load(deep, "adapter_dir")).logits
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .errors import AdapterError
from .tree import as_param_tree, get_path, set_paths

# where PEFT looks for the layer list (after any number of ``model.``), as Flax trees spell it
_CONTAINERS = (("layers",), ("encoder", "layer"), ("h",), ("decoder", "layers"))


def replicated_depth(layer_map: Sequence[Sequence[int]]) -> int:
    """How many layers ``layer_map`` makes."""
    return sum(end - start for start, end in layer_map)


def layer_container(params: Mapping) -> tuple | None:
    """The path of the tree's list of transformer layers (a mapping with keys ``0 .. N-1``), where PEFT looks for
    it: ``layers`` (Llama, Mistral, ...), ``encoder/layer`` (BERT) or ``h`` (GPT-2, Falcon) under any number of
    ``model`` (or ``transformer``, ``bert``) levels; None when there is none."""
    node, path = params, ()
    while True:
        for tail in _CONTAINERS:
            found = _at(node, tail)
            if isinstance(found, Mapping) and found and _indexed(found):
                return path + tail
        nxt = next((k for k in ("model", "transformer", "bert") if isinstance(node.get(k), Mapping)), None)
        if nxt is None:
            return None
        node, path = node[nxt], path + (nxt,)


def _at(node: Mapping, keys: tuple) -> Any:
    for key in keys:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def _indexed(layers: Mapping) -> bool:
    return sorted(int(k) for k in layers if str(k).isdigit()) == list(range(len(layers)))


def _layer_key(layers: Mapping, i: int) -> Any:
    return i if i in layers else str(i)


def replicate_layers(params: Mapping, layer_map: Sequence[Sequence[int]], *, path: Sequence | None = None) -> dict:
    """``params`` with its layer list (found by :func:`layer_container`, or at ``path``) rebuilt as PEFT's
    ``replicate_layers`` does: for each ``[start, end)`` of ``layer_map``, layers ``start .. end - 1`` in turn,
    repeated layers sharing their arrays (nothing is copied; ``params`` is not modified).

    Example:
        >>> deep = jlora.replicate_layers(params, [[0, 4], [2, 5]])   # layers 0 1 2 3 2 3 4
    """
    params = as_param_tree(params)
    where = tuple(path) if path is not None else layer_container(params)
    layers = _at(params, where) if where is not None else None
    if not isinstance(layers, Mapping) or not _indexed(layers):
        raise AdapterError("replicate_layers: no list of layers (keys 0 .. N-1) found"
                           + (f" at {'/'.join(map(str, where))}" if where else "; pass path=(...)"))
    bad = [list(pair) for pair in layer_map
           if len(pair) != 2 or not 0 <= pair[0] < pair[1] <= len(layers)]
    if bad or not layer_map:
        raise AdapterError(f"replicate_layers: layer_map {list(map(list, layer_map))} needs [start, end) pairs "
                           f"within the tree's {len(layers)} layers" + (f"; not: {bad}" if bad else ""))
    sample = next(iter(layers))
    new = {}
    for start, end in layer_map:
        for i in range(start, end):
            new[len(new) if isinstance(sample, int) else str(len(new))] = layers[_layer_key(layers, i)]
    return set_paths(params, {where: new})


def check_depth(params: Mapping, layer_map: Sequence[Sequence[int]] | None) -> None:
    """Raise when an adapter made on PEFT's replicated layers meets a tree that has not been replicated."""
    if not layer_map:
        return
    where = layer_container(params)
    if where is None:
        return  # (a custom layout: its rules place the layers)
    depth, want = len(get_path(params, where)), replicated_depth(layer_map)
    if depth != want:
        raise AdapterError(f"this adapter was trained on PEFT's replicated layers (layer_replication={layer_map}: "
                           f"{want} layers), the tree has {depth}: run jlora.replicate_layers(params, "
                           f"{layer_map}) and build the model with {want} layers (e.g. num_hidden_layers={want})")
