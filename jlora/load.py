"""``load(params, source)``: a PEFT LoRA adapter placed onto a Flax parameter tree.

Example:
    >>> model = FlaxLlamaForCausalLM.from_pretrained("tiny-llama")
    >>> lora_params = jlora.load(model.params, "user/my-adapter")      # or a local folder
    >>> logits = jax.jit(jlora.wrap(model.__call__))(ids, params=lora_params).logits
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import PICKLE_WEIGHTS_NAME, WEIGHTS_NAME, read_safetensors, read_torch_pickle
from .config import CONFIG_NAME, LoraConfig, read_json
from .errors import CheckpointError, SourceError
from .hub import file_exists, resolve_file
from .inject import inject
from .layout import get_layout
from .spec import build_targets, group_keys


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
    _check_values(tensors, source, allow_nonfinite)
    names = list(group_keys(tensors.keys(), source))
    bound = get_layout(layout).bind(params, names)
    targets = build_targets(config, tensors, bound, source)
    return inject(params, config, tensors, targets, bound, dtype=dtype)


def load(
    params: Mapping,
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    layout: Any = "hf",
    dtype: Any = None,
    allow_nonfinite: bool = False,
    allow_pickle: bool = False,
) -> dict:
    """Load a PEFT LoRA adapter (local folder or Hub repo id) onto a Flax parameter tree.

    Returns a new tree in which every module the adapter changes is an ``AdaptedModule`` holding
    the base arrays (shared, not copied) plus ``lora_A``/``lora_B`` (and DoRA, bias, ... tensors).
    ``params`` is not modified. LoRA factors are float32 unless ``dtype`` is given. From the Hub, only
    the adapter's two files are downloaded, into the Hugging Face cache (``HF_HUB_OFFLINE=1`` uses
    the cache alone). An adapter that only has the pickled ``adapter_model.bin`` is refused unless
    ``allow_pickle=True``, which reads it with ``torch.load(weights_only=True)`` (needs torch).

    Example:
        >>> lp = jlora.load(model.params, "adapter_dir")
        >>> lp = jlora.load(model.params, "user/repo", revision="v1", subfolder="sft")
    """
    config, tensors, weights_path = read_adapter(source, revision=revision, subfolder=subfolder, token=token,
                                                 cache_dir=cache_dir, allow_pickle=allow_pickle)
    return place(params, config, tensors, layout=layout, dtype=dtype, source=str(weights_path),
                 allow_nonfinite=allow_nonfinite)


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
