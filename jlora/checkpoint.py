"""Read adapter weights: ``adapter_model.safetensors`` as memory-mapped numpy arrays (no copies,
bfloat16 included), or, only when asked, PEFT's older pickled ``adapter_model.bin``; write
safetensors one tensor at a time.

The safetensors header is validated completely (offsets, sizes, dtypes, duplicates) before any
tensor is touched, so a truncated or crafted file is a :class:`CheckpointError`, never a crash.
The pickle is read with ``torch.load(weights_only=True)``, which runs no code from the file.

Example:
    >>> tensors = read_safetensors("adapter/adapter_model.safetensors")
    >>> tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape
    (8, 64)
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from .errors import CheckpointError

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
SAFETENSORS_NAMES = {v: k for k, v in DTYPES.items()}
# floats whose Inf/NaN are "exponent all ones" (float8_e4m3fn has no Inf: checked by a cast)
_IEEE_FLOATS = tuple(DTYPES[k] for k in ("F64", "F32", "F16", "BF16", "F8_E5M2"))
_NUMPY_FLOATS = tuple(DTYPES[k] for k in ("F64", "F32", "F16"))


def _no_duplicates(pairs):
    out = dict(pairs)
    if len(out) < len(pairs):
        seen: set = set()
        dupes = sorted({k for k, _ in pairs if k in seen or seen.add(k)})
        raise CheckpointError(f"duplicate tensor names in the safetensors header: {dupes}")
    return out


def read_header(path: str | os.PathLike) -> tuple[dict, dict, int]:
    """``(entries, metadata, data_start)`` of a safetensors file, fully validated."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: too short to be a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"{path}: header claims {n} bytes but the file has {size} "
                                      "(truncated or not a safetensors file)")
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err})") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    except (ValueError, RecursionError) as err:  # bad UTF-8 or JSON, over-long integers, absurd nesting
        raise CheckpointError(f"{path}: header is not valid JSON ({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings, found {metadata!r}"[:500])
    data_len = size - 8 - n
    problems, past_end = _check_entries(header, data_len)
    if problems:
        raise CheckpointError(f"{path}: invalid safetensors header", problems + [
            f"{len(past_end)} more tensors end past the file's {data_len} data bytes (truncated?)"] * bool(past_end))
    if past_end:
        raise CheckpointError(f"{path}: truncated: the header's tensors need {max(past_end)} data bytes, the file "
                              f"holds {data_len} ({len(past_end)} of {len(header)} tensors do not fit); download or "
                              "copy it again")
    return header, metadata, 8 + n


def _check_entries(header: dict, data_len: int) -> tuple[list[str], list[int]]:
    """Every problem of the header's tensor entries in ``data_len`` data bytes, and apart from them the end
    offsets of well-formed entries that lie past the data (a truncated file)."""
    problems, spans, past_end = [], [], []
    for key, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(entry["shape"])
            begin, end = entry["data_offsets"]
            if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise ValueError
            if not all(isinstance(d, int) and not isinstance(d, bool) for d in (begin, end)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            problems.append(f"{key!r}: malformed entry {entry!r}"[:500])
            continue
        if int(np.prod([d for d in shape if d], dtype=object)) * dtype.itemsize >= 2**63:
            problems.append(f"{key!r}: shape {list(shape)} is too large")
            continue
        nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if 0 <= begin and data_len < end and end - begin == nbytes:
            past_end.append(end)
        elif not 0 <= begin <= end <= data_len or end - begin != nbytes:
            problems.append(f"{key!r}: data_offsets {[begin, end]} do not fit shape {list(shape)} "
                            f"{entry['dtype']} in {data_len} data bytes")
        else:
            spans.append((begin, end, key))
    spans.sort()
    for (_, e0, k0), (b1, _, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            problems.append(f"{k0!r} and {k1!r} overlap in the file")
    return problems, past_end


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a read-only memory-mapped numpy array."""
    header, _, start = read_header(path)
    if not header:
        return {}
    try:
        mm = np.asarray(np.memmap(path, dtype=np.uint8, mode="r"))  # plain ndarray views of the mapping
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot memory-map ({err})") from None
    out = {}
    for key, entry in header.items():
        begin, end = entry["data_offsets"]
        dtype = DTYPES[entry["dtype"]]
        out[key] = mm[start + begin:start + end].view(dtype).reshape(entry["shape"])
    return out


def write_safetensors(path: str | os.PathLike, entries: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                      produce: Callable[[str], np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file one tensor at a time: ``entries`` gives every tensor's shape and dtype
    (the header is written first), ``produce(key)`` its values, called once per key in ``entries``'
    order and released before the next, so only one tensor's host copy is alive at a time.

    Example:
        >>> write_safetensors("a.safetensors", {"w": ((2, 3), np.dtype("float32"))}, lambda k: np.ones((2, 3)))
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, (shape, dtype) in entries.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[key] = {"dtype": SAFETENSORS_NAMES[np.dtype(dtype)], "shape": [int(d) for d in shape],
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, (shape, dtype) in entries.items():
            value = np.asarray(produce(key), order="C")
            if value.shape != tuple(shape) or value.dtype != np.dtype(dtype):
                raise CheckpointError(f"{path}: {key} produced {value.dtype}{list(value.shape)}, "
                                      f"announced {np.dtype(dtype)}{list(shape)}")
            f.write(value.reshape(-1).view(np.uint8).data)
            del value

def all_finite(x: np.ndarray) -> bool:
    """No NaN or Inf in ``x``, read in one pass without a float copy (IEEE bit patterns)."""
    dtype = np.dtype(x.dtype)
    if x.size == 0:
        return True
    if dtype in _NUMPY_FLOATS:
        return bool(np.isfinite(x).all())
    info = _ieee(dtype)
    if info is None:  # float8 variants without Inf etc.: small tensors, compare after a cast
        return bool(np.isfinite(x.astype(np.float32)).all())
    uint, abs_mask, inf_bits = info
    return int(np.bitwise_and(x.view(uint), abs_mask).max()) < inf_bits


def _ieee(dtype: np.dtype) -> tuple[type, int, int] | None:
    """(unsigned view type, mask without the sign bit, bit pattern of +Inf) for IEEE-like floats."""
    if dtype not in _IEEE_FLOATS:
        return None
    info = ml_dtypes.finfo(dtype)
    bits = dtype.itemsize * 8
    uint = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[dtype.itemsize]
    exp_bits = bits - 1 - int(info.nmant)
    return uint, (1 << (bits - 1)) - 1, ((1 << exp_bits) - 1) << int(info.nmant)


def _torch_to_numpy(tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu().contiguous()
    reinterpret = {torch.bfloat16: (torch.int16, DTYPES["BF16"]),
                   getattr(torch, "float8_e4m3fn", None): (torch.uint8, DTYPES["F8_E4M3"]),
                   getattr(torch, "float8_e5m2", None): (torch.uint8, DTYPES["F8_E5M2"])}
    if tensor.dtype in reinterpret:
        raw, dtype = reinterpret[tensor.dtype]
        return tensor.view(raw).numpy().view(dtype)
    return tensor.numpy()


def read_torch_pickle(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a pickled ``adapter_model.bin``, read with ``torch.load(weights_only=True)``
    (no code from the file runs). Needs torch.

    Example:
        >>> tensors = read_torch_pickle("old-adapter/adapter_model.bin")
    """
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: reading a pickled adapter (allow_pickle=True) needs torch: install it "
                              "(pip install torch), or convert the adapter to safetensors with PEFT") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - UnpicklingError (forbidden globals), RuntimeError/EOFError (corrupt)
        raise CheckpointError(f"{path}: not a weights-only torch checkpoint ({type(err).__name__}: "
                              f"{str(err).strip().splitlines()[0] if str(err).strip() else ''})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensor names to tensors, found {type(state).__name__}")
    out, problems = {}, []
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            problems.append(f"{key!r}: expected a tensor name and a tensor, found {type(value).__name__}")
            continue
        try:
            out[key] = _torch_to_numpy(value)
        except (TypeError, RuntimeError) as err:
            problems.append(f"{key!r}: dtype {value.dtype} cannot be read ({err})")
    if problems:
        raise CheckpointError(f"{path}: invalid adapter checkpoint", problems)
    return out
