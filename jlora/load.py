"""``load(params, source)``: a PEFT LoRA adapter placed onto a Flax parameter tree.

Example:
    >>> model = FlaxLlamaForCausalLM.from_pretrained("tiny-llama")
    >>> lora_params = jlora.load(model.params, "user/my-adapter")      # or a local folder
    >>> logits = jax.jit(jlora.wrap(model.__call__))(ids, params=lora_params).logits
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from .checkpoint import PICKLE_WEIGHTS_NAME, WEIGHTS_NAME, read_safetensors, read_torch_pickle
from .config import CONFIG_NAME, LoraConfig, read_json
from .errors import AdapterError, CheckpointError, SourceError
from .hub import file_exists, resolve_file
from .inject import inject
from .layout_registry import get_layout
from .multi import stack_adapters
from .nnx_module import lora_module
from .param_targets import split_wrappers
from .placement import Placer, ShardingArg
from .replication import check_depth
from .spec import build_targets, group_keys
from .tree import as_param_tree

MANY_ADAPTERS = 8  # loading this many adapters at once shows a progress bar


def _check_dtypes(tensors: Mapping[str, np.ndarray], source: str) -> None:
    problems = [f"{k}: dtype {v.dtype} is not a floating-point type" for k, v in tensors.items()
                if not np.issubdtype(v.dtype, np.floating) and v.dtype.kind != "V" and "float" not in v.dtype.name]
    if problems:
        raise CheckpointError(f"{source}: adapter tensors must be floating point", problems)


def _refuse_model_object(params: Any, fn: str) -> None:
    """A transformers Flax model (``FlaxLlamaForCausalLM``...: not a mapping, with ``.params`` and ``.config``)
    passed where its parameter tree belongs: say to pass ``model.params``. NNX modules are left alone."""
    missing = object()  # getattr_static: transformers' params property raises for models made with _do_init=False
    if isinstance(params, Mapping) or any(inspect.getattr_static(params, a, missing) is missing
                                          for a in ("params", "config")):
        return
    if any(c.__module__.startswith("flax.nnx") for c in type(params).__mro__):
        return
    name = type(params).__name__
    raise AdapterError(f"{fn}: params is a {name} model object, not its parameter tree: pass "
                       f"jlora.{fn}(model.params, ...) (a model made with _do_init=False: the params "
                       "from_pretrained returned with it)")


def place(params: Mapping, config: LoraConfig, tensors: Mapping[str, np.ndarray], *, layout: Any = "auto",
          dtype: Any = None, source: str = WEIGHTS_NAME, allow_nonfinite: bool = False,
          device: jax.Device | None = None, sharding: ShardingArg = None, pad_rank: int | None = None) -> dict:
    """Place an adapter given as a config and ``{peft key: array}`` onto ``params`` (see :func:`load`
    for ``device`` and ``sharding``). Values are checked for NaN/Inf shard by shard as they are placed.

    Example:
        >>> lp = jlora.place(params, LoraConfig(r=4, target_modules=["q_proj"]), tensors)
    """
    _refuse_model_object(params, "place")
    params = as_param_tree(params)
    check_depth(params, config.layer_replication)
    placer = Placer(device=device, sharding=sharding, check_finite=not allow_nonfinite, source=source)
    _check_dtypes(tensors, source)
    bound = get_layout(layout).bind(params, list(group_keys(tensors.keys(), source)))
    tensors, parameters = split_wrappers(config, tensors, bound, source)  # (LoRA on parameters: per expert)
    bound.report_unused(list(group_keys(tensors.keys(), source)))
    targets = build_targets(config, tensors, bound, source, parameters)
    return inject(params, config, tensors, targets, bound, dtype=dtype, placer=placer, pad_rank=pad_rank)


def load(
    params: Mapping,
    source: str | os.PathLike | Mapping[str, str | os.PathLike],
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    layout: Any = "auto",
    dtype: Any = None,
    allow_nonfinite: bool = False,
    allow_pickle: bool = False,
    device: jax.Device | None = None,
    sharding: ShardingArg = None,
    pad_rank: int | None = None,
) -> dict:
    """Load a PEFT LoRA adapter (local folder or Hub repo id) onto a Flax parameter tree.

    ``params`` may also be an ``nnx.State`` (``nnx.split(model)[1]``): the result is then its pure dict
    with the adapter, to run through :func:`jlora.nnx_model`. An ``nnx.Module`` gives a new module (base arrays
    shared, ``params`` untouched) called like the original, that runs the adapter unmerged and holds it as
    ``nnx.LoRAParam`` variables (see :mod:`jlora.nnx_module`; ``jlora.merge`` and ``jlora.save`` take it).

    Returns a new tree in which every module the adapter changes is an ``AdaptedModule`` holding
    the base arrays (shared, not copied) plus ``lora_A``/``lora_B`` (and DoRA, bias, ... tensors).
    ``params`` is not modified. LoRA factors are float32 unless ``dtype`` is given. From the Hub, only
    the adapter's two files are downloaded, into the Hugging Face cache (``HF_HUB_OFFLINE=1`` uses
    the cache alone). An adapter that only has the pickled ``adapter_model.bin`` is refused unless
    ``allow_pickle=True``, which reads it with ``torch.load(weights_only=True)`` (needs torch).

    Layout: where each PEFT module lands in the tree. ``"auto"`` (the default) tries the built-in layouts
    (transformers' Flax naming ``"hf"``, ``"tunix"``, ``"maxtext"``) and takes the first that places every
    module; name one, ``"torch"`` for PyTorch state dicts, or pass a :class:`jlora.Layout` of your own.

    Placement: each new leaf is read from the memory-mapped file straight into the devices that
    hold it. By default its sharding follows its base leaf (``lora_A`` the kernel's input axes,
    ``lora_B`` its output axes, rank replicated, a stacked layer axis as the kernel's; replaced
    tensors the base leaf's sharding; numpy base leaves: the default device). ``device=`` puts every
    new leaf on one device; ``sharding=`` is ``"replicated"``, a ``jax.sharding.Sharding`` for every
    non-scalar new leaf, or a callable ``(path, leaf: ShapeDtypeStruct with the derived sharding) -> Sharding | None``.

    Hot swap: a jitted function compiled for one adapter is reused for any other with the same targets
    and ranks (lora_alpha, rank/alpha patterns and the config text may differ: scales are leaves).
    ``pad_rank=R`` zero-pads every module's rank to ``R`` (each part's block, for fused kernels), so
    adapters of different ranks share one compiled function too; padding changes no output and
    :func:`save` drops it.

    Example:
        >>> lp = jlora.load(model.params, "adapter_dir")
        >>> lp = jlora.load(model.params, "user/repo", revision="v1", subfolder="sft")
        >>> lp = jlora.load(model.params, {"a": "adapter_a", "b": "user/b"})  # several: see jlora.wrap's adapter_ids
        >>> lp = jlora.load(sharded_params, "adapter_dir", sharding="replicated")
        >>> lp = jlora.load(model.params, "adapter_r8", pad_rank=64)   # same shapes as any r <= 64 adapter
        >>> lora_model = jlora.load(nnx_model, "adapter_dir")            # an nnx.Module: a new adapted module
    """
    _refuse_model_object(params, "load")
    if isinstance(params, nnx.Module):  # a new module holding the adapter (see jlora.nnx_module)
        graphdef, state = nnx.split(params)
        return lora_module(graphdef, load(state, source, revision=revision, subfolder=subfolder, token=token,
                                          cache_dir=cache_dir, layout=layout, dtype=dtype,
                                          allow_nonfinite=allow_nonfinite, allow_pickle=allow_pickle, device=device,
                                          sharding=sharding, pad_rank=pad_rank))
    if isinstance(source, Mapping):
        if not source:
            raise AdapterError("load: the dict of adapter sources is empty")
        params = as_param_tree(params)
        bar = tqdm(source.items(), total=len(source), desc="jlora: loading adapters", unit="adapter",
                   disable=len(source) < MANY_ADAPTERS)
        singles = {name: load(params, src, revision=revision, subfolder=subfolder, token=token, cache_dir=cache_dir,
                              layout=layout, dtype=dtype, allow_nonfinite=allow_nonfinite, allow_pickle=allow_pickle,
                              device=device, sharding=sharding, pad_rank=pad_rank)
                   for name, src in bar}
        return stack_adapters(params, singles, head_tied=get_layout(layout).bind(params).head_tied_to_embedding())
    config, tensors, weights_path = read_adapter(source, revision=revision, subfolder=subfolder, token=token,
                                                 cache_dir=cache_dir, allow_pickle=allow_pickle)
    return place(params, config, tensors, layout=layout, dtype=dtype, source=str(weights_path),
                 allow_nonfinite=allow_nonfinite, device=device, sharding=sharding, pad_rank=pad_rank)


def read_adapter(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_pickle: bool = False,
) -> tuple[LoraConfig, dict[str, np.ndarray], Path]:
    """An adapter's files, parsed: ``(config, {PEFT key: array}, weights path)`` (see :func:`load`).

    Example:
        >>> config, tensors, path = read_adapter("user/repo")
    """
    hub = dict(revision=revision, subfolder=subfolder, token=token, cache_dir=cache_dir)
    config_path = resolve_file(source, CONFIG_NAME, **hub)
    config = LoraConfig.from_dict(read_json(config_path), source=str(config_path))
    try:
        weights_path = resolve_file(source, WEIGHTS_NAME, **hub)
    except SourceError:
        if not file_exists(source, PICKLE_WEIGHTS_NAME, **hub):
            raise
        if not allow_pickle:
            raise CheckpointError(f"{source}: only {PICKLE_WEIGHTS_NAME} (a pickle) is present; jlora reads "
                                  f"{WEIGHTS_NAME}. Convert it with PEFT (save_pretrained(..., "
                                  "safe_serialization=True)), or pass allow_pickle=True to read it with "
                                  "torch.load(weights_only=True) (needs torch)") from None
        weights_path = resolve_file(source, PICKLE_WEIGHTS_NAME, **hub)
        return config, read_torch_pickle(weights_path), weights_path
    return config, read_safetensors(weights_path), weights_path
