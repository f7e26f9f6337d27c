"""``merge_checkpoint(base, adapter, out)``: a PEFT LoRA adapter merged into a Hugging Face PyTorch-format
safetensors checkpoint (``model.safetensors`` or shards listed in ``model.safetensors.index.json``),
without torch. Powers ``jlora merge``.

The checkpoint's tensors (memory-mapped) are nested into a tree and the adapter is placed on it with the
``"torch"`` layout, the same machinery as for Flax trees, so every problem is reported before anything is
written. Then, one shard at a time, the adapted modules of that shard are merged with :func:`jlora.merge`
and the shard is written: peak memory is about one shard plus the adapter. Other files of the base
(config, tokenizer, ...) are copied; other weight formats are not. The result appears in ``out`` only
when complete (it is built in a temporary folder next to it).

Example:
    >>> merge_checkpoint("path/to/llama", "user/llama-lora", "merged")
    PosixPath('merged')
"""
from __future__ import annotations

import fnmatch
import json
import os
import secrets
import shutil
import sys
import warnings
from collections import defaultdict
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from .checkpoint import read_header, read_safetensors
from .config import read_json
from .errors import AdapterError, CheckpointError
from .hub import file_exists, resolve_file, resolve_folder
from .load import place, read_adapter
from .merge import merge
from .torch_layout import nest_keys
from .tree import AdaptedModule, adapted_modules

INDEX_NAME = "model.safetensors.index.json"
HEAD_KEY = "lm_head.weight"  # where transformers' causal / seq2seq LM classes keep an untied output head
LM_HEAD_CLASSES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")  # ... the classes that name it so
SINGLE_NAME = "model.safetensors"
# weight files never downloaded (Hub) nor copied: only the safetensors checkpoint is read and rewritten
WEIGHT_PATTERNS = ["*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.gguf", "*.onnx",
                   "*.onnx_data", "*.ot", "*.tflite", "*.mlmodel", "*.npz", "*.pkl"]


def _is_shard_name(name: object) -> bool:
    """A plain ``*.safetensors`` file name: no folders, no '..', nothing hidden (no writes outside ``out``)."""
    return (isinstance(name, str) and name.endswith(".safetensors") and PurePosixPath(name).name == name
            and "\\" not in name and "\x00" not in name and not name.startswith("."))


def _read_index(path: Path) -> tuple[dict[str, str], dict]:
    """``(weight_map, metadata)`` of ``model.safetensors.index.json``, validated."""
    data = read_json(path)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path}: expected a JSON object with a non-empty \"weight_map\"")
    bad = [f"{key!r} -> {shard!r}" for key, shard in weight_map.items() if not _is_shard_name(shard)]
    if bad:
        raise CheckpointError(f"{path}: shard names must be plain *.safetensors file names in the checkpoint "
                              "folder", bad[:20])
    metadata = data.get("metadata")
    return weight_map, metadata if isinstance(metadata, dict) else {}


def _base_files(base: str, revision: str | None, token: str | bool | None,
                cache_dir: str | None) -> tuple[Path, list[str], dict[str, str] | None, dict]:
    """``(folder, shard names, weight_map or None, index metadata)``; Hub bases are downloaded."""
    folder = resolve_folder(base, revision=revision, token=token, cache_dir=cache_dir, ignore_patterns=WEIGHT_PATTERNS)
    on_hub = not Path(base).expanduser().is_dir()
    hub = dict(revision=folder.name, token=token, cache_dir=cache_dir)  # the snapshot's commit
    # as transformers: model.safetensors if there is one, else the shards of the index
    single = file_exists(base, SINGLE_NAME, **hub) if on_hub else (folder / SINGLE_NAME).is_file()
    if not single and (folder / INDEX_NAME).is_file():
        weight_map, metadata = _read_index(folder / INDEX_NAME)
        shards = sorted(set(weight_map.values()))
    else:
        weight_map, metadata, shards = None, {}, [SINGLE_NAME]
    missing = []
    for shard in shards:
        if on_hub:
            try:
                resolve_file(base, shard, **hub)
            except AdapterError as err:
                missing.append(str(err))
        elif not (folder / shard).is_file():
            missing.append(f"{folder / shard}: file not found")
    if missing:
        raise CheckpointError(f"{base}: no complete safetensors checkpoint ({SINGLE_NAME}, or {INDEX_NAME} and its "
                              "shards); jlora merge reads the safetensors format only", missing)
    return folder, shards, weight_map, metadata


def _check_out(out: Path, base_folder: Path | None = None) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AdapterError(f"--out {out} already exists and is not an empty folder; jlora merge never overwrites: "
                           "choose a new folder")
    if base_folder is None:
        return
    o, b = out.resolve(), base_folder.resolve()
    if o == b or o.is_relative_to(b) or b.is_relative_to(o):
        raise AdapterError(f"--out {out} must be outside the base checkpoint folder {base_folder} (and not contain it)")


def _copy_other_files(folder: Path, dest: Path) -> list[str]:
    """Copy every file of ``folder`` but weights, the index and hidden files (symlinks followed)."""
    copied = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            rel = Path(root, name).relative_to(folder).as_posix()
            if name.startswith(".") or rel == INDEX_NAME or any(fnmatch.fnmatch(name, p) for p in WEIGHT_PATTERNS):
                continue
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(root, name), dest / rel)
            copied.append(rel)
    return sorted(copied)


def _tied_vocab_size(config: dict) -> int | None:
    """The vocabulary size of a model whose output head is tied to its input embedding (``tie_word_embeddings``,
    true by default in transformers), from its ``config.json``; None when untied or unknown."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
    vocab = config.get("vocab_size", text.get("vocab_size"))
    return vocab if tied is True and isinstance(vocab, int) else None


def _replaces_table(node, vocab: int) -> bool:
    """Whether the node replaces (modules_to_save) a ``(vocab, dim)`` table: the input embedding a tied head reads."""
    weight = node.get("weight")
    return (not node.spec.has_lora and "weight" in dict(node.spec.file_keys) and weight is not None
            and weight.ndim == 2 and weight.shape[0] == vocab)


def _untie_config(path: Path) -> None:
    """Set ``tie_word_embeddings`` to false in a copied ``config.json`` (and in a nested ``text_config``)."""
    config = read_json(path)
    config["tie_word_embeddings"] = False
    if isinstance(config.get("text_config"), dict):
        config["text_config"]["tie_word_embeddings"] = False
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _checkpoint_keys(prefix: str, node: AdaptedModule, values: Any) -> dict[str, Any]:
    """``{checkpoint key: value}`` for a node at ``prefix`` and its module's ``values`` (``{child: value}``; a LoRA
    on a parameter stands for the parameter itself: its value is the array)."""
    if node.spec.wrapper:
        return {prefix: values if not isinstance(values, dict) else values[node.spec.kernel_key]}
    return {f"{prefix}.{child}": value for child, value in values.items()}


def merge_checkpoint(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    base_revision: str | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """Merge ``adapter`` (folder or Hub id; ``revision``/``subfolder`` are the adapter's) into the safetensors
    checkpoint ``base`` (folder or Hub id) and write the result to the new folder ``out``.

    Example:
        >>> merge_checkpoint("path/to/llama", "path/to/adapter", "merged", progress=False)
        PosixPath('merged')
    """
    from tqdm import tqdm

    out = Path(out)
    base = str(base)
    _check_out(out)
    config, tensors, weights_path = read_adapter(adapter, revision=revision, subfolder=subfolder, token=token,
                                                 cache_dir=cache_dir)
    folder, shards, weight_map, index_metadata = _base_files(base, base_revision, token, cache_dir)
    _check_out(out, folder)

    # every shard memory-mapped (nothing read yet), checked against the index
    arrays, shard_metadata, problems, seen = {}, {}, [], set()
    for shard in shards:
        header, shard_metadata[shard], _ = read_header(folder / shard)
        if weight_map is not None:
            listed = {k for k, s in weight_map.items() if s == shard}
            problems += [f"{shard}: {k!r} is not listed for this shard in {INDEX_NAME}"
                         for k in header if k not in listed]
            problems += [f"{INDEX_NAME}: {k!r} is not in {shard}" for k in sorted(listed - set(header))]
        problems += [f"{shard}: {k!r} is also in another shard" for k in header if k in seen]
        seen.update(header)
        arrays[shard] = read_safetensors(folder / shard)
    if problems:
        raise CheckpointError(f"{base}: the checkpoint's shards and index disagree", problems[:50])

    # place the whole adapter on the whole checkpoint: every problem is reported before anything is written
    lora_tree = place(nest_keys({k: v for a in arrays.values() for k, v in a.items()}), config, tensors,
                      layout="torch", source=str(weights_path))
    key_shard = {k: shard for shard, a in arrays.items() for k in a}
    base_config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    tied_vocab = None if HEAD_KEY in key_shard else _tied_vocab_size(base_config)
    lm_head = any(str(a).endswith(LM_HEAD_CLASSES) for a in base_config.get("architectures") or [])
    nodes_by_shard: dict[str, list] = defaultdict(list)
    heads: dict[str, dict[str, np.ndarray]] = defaultdict(dict)  # shard -> untied head tensors to add
    not_float = []
    for path, node in adapted_modules(lora_tree):
        prefix = ".".join(map(str, path))
        if tied_vocab and _replaces_table(node, tied_vocab):
            if lm_head:  # untie: the head keeps the old table
                shard = key_shard[f"{prefix}.weight"]
                heads[shard][HEAD_KEY] = arrays[shard][f"{prefix}.weight"]
            else:
                warnings.warn(f"jlora merge: the adapter replaces {prefix}.weight, a table this model's tied output "
                              "head may read; PEFT's merge_and_unload unties them (the head keeps the old table), "
                              f"but jlora cannot tell where this architecture keeps its head (not {HEAD_KEY}): in "
                              "the merged checkpoint the head reads the new table", stacklevel=2)
        for shard in sorted({key_shard[key] for key in _checkpoint_keys(prefix, node, node.base_children())}):
            nodes_by_shard[shard].append((prefix, node))  # a module split over two shards is merged for each
        weight = node[node.spec.kernel_key] if node.spec.kernel_key in node else None
        if weight is not None and not (np.issubdtype(weight.dtype, np.floating) or weight.dtype.kind == "V"):
            not_float.append(f"{prefix}.{node.spec.kernel_key}: {weight.dtype}")
    if not_float:
        raise CheckpointError(f"{base}: cannot merge into non-floating-point (quantized?) weights", not_float)
    del lora_tree  # from here on each shard's memory map is released once that shard is written
    untie = bool(heads)
    total = sum(int(v.nbytes) for a in arrays.values() for v in a.values()) + \
        sum(int(v.nbytes) for h in heads.values() for v in h.values())

    tmp = out.parent / f".{out.name}.jlora-{secrets.token_hex(4)}"
    tmp.mkdir(parents=True)
    try:
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="jlora merge", file=sys.stderr,
                  disable=not progress) as bar:
            for shard in shards:
                bar.set_postfix_str(shard)
                tensors_out = arrays.pop(shard)
                nodes = nodes_by_shard.pop(shard, [])
                for (prefix, node), merged in zip(nodes, merge([node for _, node in nodes]) if nodes else []):
                    for key, value in _checkpoint_keys(prefix, node, merged).items():
                        if key in tensors_out:
                            tensors_out[key] = np.asarray(value)
                tensors_out.update({k: np.asarray(v) for k, v in heads.pop(shard, {}).items()})
                if weight_map is not None:
                    weight_map.update({k: shard for k in tensors_out if k not in weight_map})
                save_file(tensors_out, str(tmp / shard), metadata=shard_metadata[shard] or {"format": "pt"})
                bar.update(sum(int(v.nbytes) for v in tensors_out.values()))
                del tensors_out, nodes
        if weight_map is not None:
            index = {"metadata": {**index_metadata, "total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _copy_other_files(folder, tmp)
        if untie:
            _untie_config(tmp / "config.json")
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
