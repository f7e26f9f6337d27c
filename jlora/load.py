"""``load(params, source)``: a PEFT LoRA adapter placed onto a Flax parameter tree.

Example:
    >>> model = FlaxLlamaForCausalLM.from_pretrained("tiny-llama")
    >>> lora_params = jlora.load(model.params, "user/my-adapter")      # or a local folder
    >>> logits = jax.jit(jlora.wrap(model.__call__))(ids, params=lora_params).logits
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from .checkpoint import PICKLE_WEIGHTS_NAME, WEIGHTS_NAME, read_safetensors
from .config import CONFIG_NAME, LoraConfig, read_json
from .errors import AdapterError, CheckpointError, SourceError
from .hub import file_exists, resolve_file
from .inject import inject
from .layout import get_layout
from .multi import stack_adapters
from .spec import build_targets, group_keys
from .tree import as_param_tree


def _check_values(tensors: Mapping[str, np.ndarray], source: str, allow_nonfinite: bool) -> None:
    problems = [f"{k}: dtype {v.dtype} is not a floating-point type" for k, v in tensors.items()
                if not np.issubdtype(v.dtype, np.floating) and v.dtype.kind != "V" and "float" not in v.dtype.name]
    if problems:
        raise CheckpointError(f"{source}: adapter tensors must be floating point", problems)
    if not allow_nonfinite:
        bad = [k for k, v in tensors.items() if not np.isfinite(np.asarray(v, dtype=np.float32)).all()]
        if bad:
            raise CheckpointError(f"{source}: tensors with NaN or Inf values (pass allow_nonfinite=True to "
                                  "load them anyway)", bad)


def place(params: Mapping, config: LoraConfig, tensors: Mapping[str, np.ndarray], *, layout: Any = "hf",
          dtype: Any = None, source: str = WEIGHTS_NAME, allow_nonfinite: bool = False) -> dict:
    """Place an adapter given as a config and ``{peft key: array}`` onto ``params``.

    Example:
        >>> lp = jlora.place(params, LoraConfig(r=4, target_modules=["q_proj"]), tensors)
    """
    params = as_param_tree(params)
    _check_values(tensors, source, allow_nonfinite)
    names = list(group_keys(tensors.keys(), source))
    bound = get_layout(layout).bind(params, names)
    bound.report_unused(names)
    targets = build_targets(config, tensors, bound, source)
    return inject(params, config, tensors, targets, bound, dtype=dtype)


def load(
    params: Mapping,
    source: str | os.PathLike | Mapping[str, str | os.PathLike],
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    layout: Any = "hf",
    dtype: Any = None,
    allow_nonfinite: bool = False,
) -> dict:
    """Load a PEFT LoRA adapter (local folder or Hub repo id) onto a Flax parameter tree.

    ``params`` may also be an ``nnx.State`` (``nnx.split(model)[1]``): the result is then its pure dict
    with the adapter, to run through ``nnx.merge`` (see the README).

    Returns a new tree in which every module the adapter changes is an ``AdaptedModule`` holding
    the base arrays (shared, not copied) plus ``lora_A``/``lora_B`` (and DoRA, bias, ... tensors).
    ``params`` is not modified. LoRA factors are float32 unless ``dtype`` is given.

    Example:
        >>> lp = jlora.load(model.params, "adapter_dir")
        >>> lp = jlora.load(model.params, "user/repo", revision="v1", subfolder="sft")
        >>> lp = jlora.load(model.params, {"a": "adapter_a", "b": "user/b"})  # several: see jlora.wrap's adapter_ids
    """
    if isinstance(source, Mapping):
        if not source:
            raise AdapterError("load: the dict of adapter sources is empty")
        params = as_param_tree(params)
        singles = {name: load(params, src, revision=revision, subfolder=subfolder, token=token, cache_dir=cache_dir,
                              layout=layout, dtype=dtype, allow_nonfinite=allow_nonfinite)
                   for name, src in source.items()}
        return stack_adapters(params, singles)
    hub = dict(revision=revision, subfolder=subfolder, token=token, cache_dir=cache_dir)
    config_path = resolve_file(source, CONFIG_NAME, **hub)
    config = LoraConfig.from_dict(read_json(config_path), source=str(config_path))
    try:
        weights_path = resolve_file(source, WEIGHTS_NAME, **hub)
    except SourceError:
        if file_exists(source, PICKLE_WEIGHTS_NAME, **hub):
            raise CheckpointError(f"{source}: only {PICKLE_WEIGHTS_NAME} (a pickle) is present; jlora reads "
                                  f"{WEIGHTS_NAME}. Convert it with PEFT (save_pretrained(..., "
                                  "safe_serialization=True))") from None
        raise
    tensors = read_safetensors(weights_path)
    return place(params, config, tensors, layout=layout, dtype=dtype, source=str(weights_path),
                 allow_nonfinite=allow_nonfinite)
