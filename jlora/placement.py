"""Where adapter leaves live, and the one step that turns host tensors into jax arrays.

Each new leaf's sharding is derived from the base leaf it belongs to. With the kernel's canonical
axes ``(inputs..., outputs...)``: ``lora_A`` ``(inputs..., r)`` takes the kernel's input-axis
sharding with the rank replicated, ``lora_B`` ``(r, outputs...)`` its output-axis sharding, DoRA
magnitudes and ``lora_bias`` the output axes; replaced tensors (biases, ``modules_to_save``) take
the base leaf's sharding and trainable-token rows the embedding's feature axis. A base leaf without
a sharding (a numpy array) puts the leaf on the default device. ``load(..., sharding=...)``
overrides this: ``"replicated"``, one ``Sharding`` for every new leaf (scalar ``lora_scale`` leaves:
replicated on its devices), or a callable ``fn(path, leaf) -> Sharding | None`` (``leaf`` a
``ShapeDtypeStruct`` carrying the derived sharding; ``None`` keeps it); ``load(..., device=d)`` puts
every new leaf on ``d``.

Committed or not: a new leaf is committed to its devices (as ``jax.device_put(x, device)`` commits) only where
its base leaf is committed or the caller asked for a placement (``device=``, ``sharding=``, a sharding the
callable returned). Beside an uncommitted base leaf (``model.params`` of a transformers model, ``module.init``'s
output, numpy arrays) it stays uncommitted on the base leaf's device, as ``jnp.asarray`` would put it. jit's cache
key holds each argument's committedness, and its outputs are committed when any argument is: committed adapter
leaves beside uncommitted base and optimizer state would make a training step's second call compile again.

Host to device: the file's bytes move in the file's dtype (a bfloat16 file's float32 factors are cast
on the device: half the transfer, no host pass). A leaf on one device is read straight from the
memory-mapped file; on an accelerator it travels in the file's memory order and is transposed there,
on the CPU the copy into the device buffer transposes it. The casts and transposes of all such leaves
then run in :meth:`Placer.finish` as jitted calls over up to ``CAST_CHUNK`` leaves of one shape each: a
few dispatches per load instead of one per leaf, and a few small programs to compile however many leaves
there are. (:meth:`Placer.put` hands back a placeholder that :meth:`Placer.resolve` swaps for the array;
the moved copies and the results are held together until then.) A sharded leaf: every addressable
device's shard is read from the host array and transposed by its copy, then cast on the devices. No other host copy
is made and no process reads more than its devices' shards.
Device arrays never alias the memory-mapped file (jax would on CPU): rewriting the file in place later
cannot change or fault them.

Example:
    >>> placer = Placer(sharding="replicated")
    >>> a = placer.put(host_a, jnp.float32, path=("q_proj", "lora_A"), base=kernel, axes=(0, None))
    >>> placer.finish()   # raises one AdapterError listing every leaf that could not be placed
    >>> a = placer.resolve(a)
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from .checkpoint import all_finite
from .errors import AdapterError, CheckpointError

ShardingArg = Union[None, str, Sharding, Callable[[str, jax.ShapeDtypeStruct], Union[Sharding, None]]]
# For each axis of a new leaf: the axis of its base leaf whose sharding it takes, or None (replicated).
Axes = tuple[Union[int, None], ...]

REPLICATED = "replicated"


def lora_axes(role: str, in_ndim: int, kernel_perm: tuple[int, ...], layer_axis: int | None = None,
              ndim: int | None = None) -> Axes:
    """The kernel axes behind each axis of an adapter leaf (``kernel = canonical.transpose(kernel_perm)``,
    with a stacked kernel's layer axis at ``layer_axis``, which the adapter leaves share).

    Example:
        >>> lora_axes("lora_A", 1, (1, 0))   # GPT-2 Conv1D kernel (out, in): A (in, r) follows kernel axis 1
        (1, None)
    """
    kernel_axis = [int(i) for i in np.argsort(kernel_perm)]  # canonical axis -> kernel axis (no layer)
    if layer_axis is not None:
        kernel_axis = [k + (k >= layer_axis) for k in kernel_axis]
    ins, outs = tuple(kernel_axis[:in_ndim]), tuple(kernel_axis[in_ndim:])
    if role == "lora_A":
        axes = ins + (None,)
    elif role == "lora_B":
        axes = (None,) + outs
    elif role == "lora_scale":  # a scalar, or per rank column
        axes = () if ndim == 0 else (None,) * (in_ndim + 1)
    elif role == "lora_diag":  # KaSA's singular values, one per rank column
        axes = (None,)
    else:
        axes = outs  # DoRA magnitude, lora_bias
    if layer_axis is not None:
        at = min(layer_axis, len(axes))
        axes = axes[:at] + (layer_axis,) + axes[at:]
    return axes


def default_device() -> jax.Device:
    """The device a plain ``jnp.asarray`` would use (respects ``jax.default_device``)."""
    dev = jax.config.jax_default_device
    if isinstance(dev, jax.Device):
        return dev
    return jax.local_devices(backend=dev)[0] if isinstance(dev, str) else jax.local_devices()[0]


def derive(base_sharding: Sharding | None, base_ndim: int, axes: Axes) -> Sharding | None:
    """The sharding of a leaf whose axes follow ``axes`` of a base leaf sharded by ``base_sharding``.

    None when it cannot be derived (a sharding other than Named/SingleDevice that is not replicated).

    Example:
        >>> derive(NamedSharding(mesh, P("data", "model")), 2, (0, None)).spec
        PartitionSpec('data', None)
    """
    if base_sharding is None:
        return SingleDeviceSharding(default_device())
    if isinstance(base_sharding, NamedSharding):
        spec = tuple(base_sharding.spec) + (None,) * (base_ndim - len(base_sharding.spec))
        new = PartitionSpec(*(None if a is None else spec[a] for a in axes))
        return NamedSharding(base_sharding.mesh, new, memory_kind=base_sharding.memory_kind)
    if isinstance(base_sharding, SingleDeviceSharding):
        return base_sharding
    if base_sharding.is_fully_replicated:
        return replicated_like(base_sharding)
    return None


def replicated_like(base_sharding: Sharding | None) -> Sharding:
    """A fully replicated sharding over the devices of ``base_sharding`` (any rank)."""
    if base_sharding is None:
        return SingleDeviceSharding(default_device())
    if isinstance(base_sharding, NamedSharding):
        return NamedSharding(base_sharding.mesh, PartitionSpec(), memory_kind=base_sharding.memory_kind)
    if len(base_sharding.device_set) == 1:
        return SingleDeviceSharding(next(iter(base_sharding.device_set)))
    devices = sorted(base_sharding.device_set, key=lambda d: (d.process_index, d.id))
    return NamedSharding(Mesh(np.array(devices), ("replicas",)), PartitionSpec())


def is_committed(leaf: Any) -> bool:
    """Whether ``leaf`` is a jax array committed to its devices (numpy arrays and uncommitted jax arrays are not).

    Example:
        >>> is_committed(jnp.zeros(3)), is_committed(jax.device_put(np.zeros(3), jax.devices()[0]))
        (False, True)
    """
    return isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer) and bool(leaf.committed)


def device_of(leaf: Any) -> jax.Device:
    """The one device of an uncommitted (single-device) leaf; the default device for numpy arrays.

    Example:
        >>> device_of(np.zeros(3)) == jax.devices()[0]
        True
    """
    devices = getattr(leaf, "devices", None)
    return next(iter(devices())) if callable(devices) else default_device()


def put_uncommitted(value: Any, device: jax.Device) -> jax.Array:
    """``value`` (a host or jax array) on ``device``, uncommitted: as ``jnp.asarray`` puts it on the default
    device, so that jit may combine it with other uncommitted arguments without a new compilation.

    Example:
        >>> put_uncommitted(np.ones(3), jax.devices()[0]).committed
        False
    """
    with jax.default_device(device):
        return jax.device_put(value if not is_committed(value) else np.asarray(value))


def place_like(value: Any, like: Any, sharding: Sharding | None = None) -> jax.Array:
    """``value`` placed as ``like`` is: committed to ``sharding`` (default: ``like``'s) where ``like`` is a
    committed jax array, else uncommitted on ``like``'s device (the default device for numpy arrays).

    Example:
        >>> place_like(np.zeros((4, 8)), node["lora_A"]).committed == node["lora_A"].committed
        True
    """
    if not is_committed(like):
        return put_uncommitted(value, device_of(like))
    return jax.device_put(value, sharding if sharding is not None else like.sharding)


def _memory_order(x: np.ndarray) -> tuple[int, ...]:
    """Axis order in which ``x``'s elements lie in memory (outermost first)."""
    return tuple(sorted(range(x.ndim), key=lambda i: (-abs(x.strides[i]), i)))


def host_shard(host: np.ndarray, index: tuple, dtype: np.dtype) -> np.ndarray:
    """``host[index]`` in ``dtype``: a view when the dtype matches, else one cast in memory order."""
    part = host[index]
    if part.dtype == dtype:
        return part
    order = _memory_order(part)
    return part.transpose(order).astype(dtype).transpose(np.argsort(order))


def _unaliased(part: np.ndarray) -> np.ndarray:
    """A copy of a read-only contiguous array (a view of the memory-mapped file), which jax would otherwise
    alias on CPU: the device array must not change or fault when the file is rewritten in place."""
    return np.array(part) if not part.flags.writeable and part.flags.c_contiguous else part


def _transfer_dtype(host_dtype: np.dtype, dtype: np.dtype) -> np.dtype:
    """The dtype to move to the device in: the host's own when jax holds it as is (then cast there)."""
    try:
        supported = jax.dtypes.canonicalize_dtype(host_dtype) == host_dtype
    except TypeError:
        supported = False
    return host_dtype if supported else dtype


def to_device(host: np.ndarray, sharding: Sharding, dtype: Any = None,
              inspect: Callable[[np.ndarray], None] | None = None, committed: bool = True) -> jax.Array:
    """``host`` as a ``jax.Array`` with ``sharding``, cast to ``dtype``: each addressable device
    receives its shard, read from ``host`` (a view is fine) and copied once into the device buffer.
    ``inspect`` sees every distinct host shard before it is cast (e.g. a finiteness check).
    ``committed=False`` (a single-device ``sharding`` only): the array stays uncommitted on that device.

    Example:
        >>> to_device(mmapped.T, NamedSharding(mesh, P("model", None)), jnp.float32)
    """
    host = host if isinstance(host, np.ndarray) else np.asarray(host)
    dtype = np.dtype(host.dtype if dtype is None else dtype)
    moved = _transfer_dtype(host.dtype, dtype)
    cache: dict[tuple, np.ndarray] = {}

    def shard(index):
        index = tuple(index) if index is not None else (slice(None),) * host.ndim
        key = tuple(s.indices(n) if isinstance(s, slice) else s for s, n in zip(index, host.shape))
        if key not in cache:  # replicated shards are read, inspected and cast once
            if inspect is not None:
                inspect(host[index])
            cache[key] = _unaliased(host_shard(host, index, moved))
        return cache[key]

    if committed:
        array = jax.make_array_from_callback(host.shape, sharding, shard, dtype=moved)
        return array if moved == dtype else array.astype(dtype)
    (device,) = sharding.device_set
    with jax.default_device(device):  # uncommitted there (the cast too: uncommitted operands go to the default device)
        array = jax.device_put(shard(None))
        return array if moved == dtype else array.astype(dtype)


@dataclasses.dataclass(frozen=True)
class Pending:
    """A leaf :meth:`Placer.put` has moved but not yet cast or transposed: see :meth:`Placer.resolve`."""
    index: int


def transposes_on_device(device: jax.Device) -> bool:
    """Whether a leaf for ``device`` travels in the file's memory order and is transposed there: on
    accelerators; not on the CPU, where XLA's transposes are slower than the transposing host copy."""
    return device.platform != "cpu"


# leaves per compiled cast/transpose call in Placer.finish: calls for leaves of one shape reuse one program, so
# compile time stays bounded however many leaves an adapter has (one program for 3000 leaves compiled for 5.6 s)
CAST_CHUNK = 16


@functools.partial(jax.jit, static_argnames=("perms", "dtypes"))
def _transpose_cast(arrays: tuple, perms: tuple, dtypes: tuple) -> tuple:
    """Every ``arrays[i].transpose(perms[i]).astype(dtypes[i])``, in one compiled call."""
    return tuple(a.transpose(p).astype(d) for a, p, d in zip(arrays, perms, dtypes))


def _check_arg(device: Any, sharding: ShardingArg) -> None:
    if device is not None and sharding is not None:
        raise AdapterError("pass either device= or sharding=, not both")
    if device is not None and not isinstance(device, jax.Device):
        raise AdapterError(f"device must be a jax.Device (e.g. jax.devices()[0]), found {type(device).__name__}")
    if isinstance(sharding, str) and sharding != REPLICATED:
        raise AdapterError(f"sharding={sharding!r}: use None (derived from the base kernels), {REPLICATED!r}, "
                           "a jax.sharding.Sharding or a callable (path, leaf) -> Sharding | None")
    if not (sharding is None or isinstance(sharding, (str, Sharding)) or callable(sharding)):
        raise AdapterError(f"sharding must be None, {REPLICATED!r}, a jax.sharding.Sharding or a callable, "
                           f"found {type(sharding).__name__}")


class Placer:
    """One load's placement policy (see module docstring); collects every problem for :meth:`finish`.

    Example:
        >>> placer = Placer(device=jax.devices()[1])
    """

    def __init__(self, *, device: jax.Device | None = None, sharding: ShardingArg = None,
                 check_finite: bool = False, source: str = "adapter_model.safetensors"):
        _check_arg(device, sharding)
        self.device, self.sharding, self.check_finite, self.source = device, sharding, check_finite, source
        self.problems: list[str] = []
        self.nonfinite: list[str] = []
        self._pending: list[tuple[jax.Array, tuple[int, ...], np.dtype]] = []
        self._done: list[jax.Array] = []

    def sharding_for(self, path: str, shape: tuple, dtype: np.dtype, base: Any,
                     axes: Axes) -> tuple[Sharding, bool] | None:
        """The sharding of a new leaf at ``path`` whose axes follow ``axes`` of ``base``, and whether the leaf is
        committed to it (see module docstring); or None, with a problem recorded.

        Example:
            >>> Placer().sharding_for("q/lora_A", (32, 4), np.dtype("float32"), jnp.zeros((32, 32)), (0, None))
            (SingleDeviceSharding(device=CpuDevice(id=0), memory_kind=device), False)
        """
        base_sharding = getattr(base, "sharding", None)
        commit = True  # (device= and sharding= commit)
        if self.device is not None:
            chosen = SingleDeviceSharding(self.device)
        elif self.sharding == REPLICATED:
            chosen = replicated_like(base_sharding)
        elif isinstance(self.sharding, Sharding):  # scalars (lora_scale) replicated over its devices
            chosen = replicated_like(self.sharding) if len(shape) == 0 else self.sharding
        else:
            chosen = derive(base_sharding, len(base.shape), axes)
            if chosen is None:
                self.problems.append(f"{path}: cannot derive a sharding from the base leaf's {base_sharding} "
                                     "(use NamedSharding for the base, or pass sharding=)")
                return None
            mine = self.sharding(path, jax.ShapeDtypeStruct(shape, dtype, sharding=chosen)) \
                if callable(self.sharding) else None
            if mine is not None and not isinstance(mine, Sharding):
                self.problems.append(f"{path}: the sharding callable returned {mine!r}, not a Sharding")
                return None
            commit = mine is not None or is_committed(base)
            chosen = mine or chosen
        try:
            chosen.check_compatible_aval(shape)
            chosen.shard_shape(shape)
        except (ValueError, IndexError) as err:
            self.problems.append(f"{path}: {chosen} does not fit shape {list(shape)} ({err})")
            return None
        if isinstance(base_sharding, Sharding) and base_sharding.num_devices > 1 and \
                chosen.device_set != base_sharding.device_set:
            self.problems.append(f"{path}: {chosen} uses other devices than the base leaf's {base_sharding}")
            return None
        return chosen, commit or len(chosen.device_set) > 1  # (an uncommitted array has one device)

    def check_values(self, host: np.ndarray, key: str) -> None:
        """Record ``key`` when ``host`` holds NaN or Inf (for tensors combined before placing)."""
        if self.check_finite and key not in self.nonfinite and not all_finite(host):
            self.nonfinite.append(key)

    def put(self, host: np.ndarray, dtype: Any, *, path: tuple, base: Any, axes: Axes, key: str = "",
            checked: bool = False) -> Any:
        """``host`` placed as the new leaf at ``path`` (None when it cannot be; see :meth:`finish`).
        ``checked``: its values were already checked with :meth:`check_values`."""
        dtype = np.dtype(dtype)
        name = "/".join(map(str, path))
        placed = self.sharding_for(name, tuple(host.shape), dtype, base, axes)
        if placed is None:
            return None
        sharding, commit = placed
        label = key or name

        def check(part: np.ndarray) -> None:
            if label not in self.nonfinite and not all_finite(part):
                self.nonfinite.append(label)

        inspect = check if self.check_finite and not checked else None
        if len(sharding.device_set) > 1:
            return to_device(host, sharding, dtype, inspect)
        host = host if isinstance(host, np.ndarray) else np.asarray(host)
        moved = _transfer_dtype(host.dtype, dtype)
        (device,) = sharding.device_set
        if transposes_on_device(device):  # the file's memory order travels, the transpose runs on the device
            if inspect is not None:
                inspect(host)
            order = _memory_order(host)
            moving = np.asarray(host_shard(host.transpose(order), (...,), moved), order="C")
            array = jax.device_put(moving, sharding) if commit else put_uncommitted(moving, device)
        else:  # (make_array_from_callback's transposing copy: ~1.7x faster than device_put's here)
            order = tuple(range(host.ndim))
            array = to_device(host, sharding, moved, inspect, committed=commit)
        perm = tuple(int(i) for i in np.argsort(order))
        if moved == dtype and perm == tuple(range(host.ndim)):
            return array
        self._pending.append((array, perm, dtype))
        return Pending(len(self._pending) - 1)

    def finish(self) -> None:
        """Raise every problem met so far, all at once; else run the pending casts and transposes."""
        if self.nonfinite:
            raise CheckpointError(f"{self.source}: tensors with NaN or Inf values (pass allow_nonfinite=True to "
                                  "load them anyway)", sorted(self.nonfinite))
        if self.problems:
            raise AdapterError(f"{self.source}: the adapter cannot be placed with these shardings", self.problems)
        groups: dict[tuple, list[int]] = {}  # leaves that one compiled program serves (committed ones apart: jit
        for i, (array, perm, dtype) in enumerate(self._pending):  # commits every output when an input is)
            key = (next(iter(array.devices())), array.committed, array.shape, array.dtype, perm, np.dtype(dtype).name)
            groups.setdefault(key, []).append(i)
        self._done = [None] * len(self._pending)
        for (device, _, _, _, perm, dtype), indices in groups.items():
            for start in range(0, len(indices), CAST_CHUNK):
                chunk = indices[start:start + CAST_CHUNK]
                with jax.default_device(device):  # (where uncommitted leaves run: their own device)
                    outs = _transpose_cast(tuple(self._pending[i][0] for i in chunk), perms=(perm,) * len(chunk),
                                           dtypes=(dtype,) * len(chunk))
                for i, out in zip(chunk, outs):
                    self._done[i] = out
        self._pending = []

    def resolve(self, value: Any) -> Any:
        """``value``, or the finished array when it is a :class:`Pending` placeholder (after :meth:`finish`)."""
        return self._done[value.index] if isinstance(value, Pending) else value

