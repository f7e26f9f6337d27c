"""``nnx_model(graphdef, lora_params)``: an NNX model that runs its adapter unmerged.

NNX modules have no method interceptors, so :func:`jlora.wrap` can only fold an adapter into the
kernels inside the call. ``nnx_model`` instead builds the model with ``nnx.merge`` and puts a thin
caller in front of every adapted ``nnx.Linear``, ``LinearGeneral``, ``Einsum``, ``Embed`` and ``Conv`` (and
every einsum-of-one-parameter module of model zoos, such as google-tunix's ``Einsum``: see
:func:`jlora.side_paths.is_param_einsum`, and every dense layer naming its input axes, such as MaxText's
``DenseGeneral``: see :func:`jlora.side_paths.is_axis_dense`): it
runs the module, then adds ``s * (x @ A) @ B`` through the same side paths as linen models (PEFT's precision,
``lora_dropout``, DoRA, several adapters per batch). Stacked layers (a module built with ``nnx.vmap`` and run
by ``nnx.scan``) run unmerged too: their adapter entries (and the dropout key) become ``nnx.Param``
attributes that the scan slices with the kernel (with several adapters, so are each example's adapter
indices). Other module types get their kernel merged in the call, with a warning. The model is built for one call
(inside ``jax.jit`` or a loss function): the adapter arrays are its inputs, so gradients reach them.

Example:
    >>> graphdef, state = nnx.split(model)
    >>> lp = jlora.load(state, "adapter_dir", layout=my_layout)
    >>> forward = jax.jit(lambda lp, ids: jlora.nnx_model(graphdef, lp)(ids))
    >>> logits = forward(lp, ids)
"""
from __future__ import annotations

import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .merge import merged_module, plain_module, tied_head_columns
from .side_paths import CallContext, fused_nnx_linear, is_axis_dense, side_for
from .tree import AdaptedModule, ModuleSpec, is_adapted, keyed, set_paths
from .wrap import LAYER_INDEX, lora_dropout, require_adapter_ids, side_entries


class _NnxModuleView:
    """The part of a linen module's interface that the side paths use, answered for an NNX module."""

    def __init__(self, module: nnx.Module):
        self.module = module

    @property
    def axis(self) -> Any:
        return self.module.axis

    @property
    def einsum_str(self) -> str | None:
        return self.module.einsum_str

    def get_variable(self, collection: str, name: str) -> jax.Array | None:
        variable = getattr(self.module, name, None)
        return None if variable is None else variable[...]

    def apply_with(self, params: dict, x: jax.Array) -> jax.Array:
        """The module's output for ``x`` with ``params`` in place of its own parameters."""
        graphdef, state = nnx.split(self.module)
        return nnx.merge(graphdef, {**nnx.to_pure_dict(state), **params})(x)

    def clone(self, **fields: Any) -> "_BiasFree | _ConvDown":
        """The module without bias (DoRA's base term on the dropped input), or, given ``features``, a
        convolution like this one with that many output features (a conv side path's ``x @ A``)."""
        return _ConvDown(self.module, fields) if "features" in fields else _BiasFree(self)


class _BiasFree:
    """``apply(variables, x)``: the module's own output for ``x`` without its bias (variables: its kernel)."""

    def __init__(self, view: _NnxModuleView):
        self.view = view

    def apply(self, variables: dict, x: jax.Array) -> jax.Array:
        y = self.view.module(x)
        bias = self.view.get_variable("params", "bias")
        return y if bias is None else y - bias


class _ConvDown:
    """``apply({"params": {"kernel": a}}, x)``: ``nnx.Conv`` ``module``'s convolution (strides, padding,
    dilation) with kernel ``a`` and no bias."""

    def __init__(self, module: nnx.Conv, fields: dict):
        self.module, self.fields = module, fields

    def apply(self, variables: dict, x: jax.Array) -> jax.Array:
        m, kernel = self.module, variables["params"]["kernel"]
        down = nnx.Conv(m.in_features, self.fields["features"], m.kernel_size, strides=m.strides, padding=m.padding,
                        input_dilation=m.input_dilation, kernel_dilation=m.kernel_dilation, use_bias=False,
                        dtype=self.fields.get("dtype"), param_dtype=kernel.dtype, precision=m.precision,
                        kernel_init=nnx.initializers.zeros, rngs=nnx.Rngs(0))
        down.kernel = nnx.Param(kernel)
        return down(x)


class _SideCaller:
    """Stands in for an adapted NNX module: the module's own call, plus its side path."""

    def __init__(self, module: nnx.Module, side, entries: dict, spec: ModuleSpec, ctx: CallContext,
                 fused: bool = False):
        self.module, self.side, self.entries, self.spec, self.ctx = module, side, entries, spec, ctx
        self.fused = fused and type(module) is nnx.Linear  # (a subclass may compute otherwise)

    def __call__(self, *args, **kwargs):
        if self.fused and (out := fused_nnx_linear(self.module, args, kwargs, self.entries, self.spec,
                                                    self.ctx)) is not None:
            return out
        y = self.module(*args, **kwargs)
        return self.side(_NnxModuleView(self.module), args, kwargs, y, self.entries, self.spec, self.ctx)

    def __getattr__(self, name: str) -> Any:  # the model may read the module's attributes (e.g. its kernel)
        return getattr(self.module, name)


def _stacked_call(self, *args, **kwargs):
    """The call of an NNX module of stacked layers (built with ``nnx.vmap``, run with ``nnx.scan``) whose adapter
    entries are ``nnx.Param`` attributes with the kernel's layer axis: the scan slices them with the kernel, and
    the side path adds the adapter of the layer at hand to the module's own output (with that layer's own
    ``lora_dropout`` mask: the dropout key is stacked along the layer axis too, and the layer index folded in)."""
    entries = {key: getattr(self, ENTRY_PREFIX + key)[...] for key in self.jlora_entries}
    drop = None
    if self.jlora_dropout is not None:
        rate, site, name, impl = self.jlora_dropout
        data = getattr(self, ENTRY_PREFIX + "dropout_key")[...]
        key = data.reshape(data.shape[-1:]) if impl is None else \
            jax.random.wrap_key_data(data.reshape(data.shape[-1:]), impl=impl)
        drop = lora_dropout(key, rate, site, name, entries.get(LAYER_INDEX))
    ids = getattr(self, ENTRY_PREFIX + ADAPTER_IDS, None)
    ids = None if ids is None else ids[...].reshape(ids.shape[-1:])
    offsets = getattr(self, ENTRY_PREFIX + ALORA_OFFSETS, None)
    ctx = CallContext(drop, ids, None if offsets is None else offsets[...].reshape(offsets.shape[-1:]))
    if self.jlora_fused and (out := fused_nnx_linear(self, args, kwargs, entries, self.jlora_spec, ctx)) is not None:
        return out
    y = super(type(self), self).__call__(*args, **kwargs)
    return self.jlora_side(_NnxModuleView(self), args, kwargs, y, entries, self.jlora_spec, ctx)


def _along_layers(value: jax.Array, layer_axis: int | None, layers: int | None) -> jax.Array:
    """``value`` repeated along a stacked kernel's layer axis (put before its own axes), so that a scan over the
    layers hands each layer ``value`` again (its shape then ``(1,) * layer_axis + value.shape``); ``value`` itself
    for an unstacked kernel (``layer_axis`` None)."""
    if layer_axis is None:
        return value
    return jnp.broadcast_to(value, (1,) * layer_axis + (layers,) + value.shape)


ENTRY_PREFIX = "jlora_"
ADAPTER_IDS = "adapter_ids"  # (a stacked module's attribute ENTRY_PREFIX + this: each example's adapter, per layer)
ALORA_OFFSETS = "alora_offsets"  # (... and each example's aLoRA offset, per layer)
# the module classes whose stacked instances get a side path (exact types: a subclass may call differently); the
# subclasses only override __call__, so an instance can change class in place
_STACKED = {cls: type(f"Stacked{cls.__name__}", (cls,), {"__call__": _stacked_call})
            for cls in (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Embed, nnx.Conv)}


@functools.cache
def _stacked_subclass(cls: type) -> type:
    """``cls`` with :func:`_stacked_call` as its call: one class per model class (so two calls' graphdefs match)."""
    return type(f"Stacked{cls.__name__}", (cls,), {"__call__": _stacked_call})


def _stacked_class(module: Any) -> type | None:
    """The class a stacked ``module`` becomes to run its adapter (see :func:`_make_stacked`), or None when its class
    has no stacked side path: the ``_STACKED`` classes, and axis-dense modules of model zoos (MaxText's
    ``DenseGeneral``, see :func:`jlora.side_paths.is_axis_dense`)."""
    if type(module) in _STACKED:
        return _STACKED[type(module)]
    return _stacked_subclass(type(module)) if is_axis_dense(module) else None


def _runs_stacked(node: AdaptedModule, module: Any) -> bool:
    """Whether a stacked kernel's adapter(s) can run unmerged: LoRA factors (of one adapter or several) and a
    module class with a stacked side path."""
    spec = node.spec
    return (spec.layer_axis is not None and spec.has_lora and not spec.merged_in_call
            and _stacked_class(module) is not None)


def _make_stacked(module: nnx.Module, side, node: AdaptedModule, dropout_key: jax.Array | None, site: int,
                  name: str, adapter_ids: jax.Array | None = None, fused: bool = False,
                  alora_offsets: jax.Array | None = None) -> None:
    """Turn a stacked module (or an unstacked model-zoo one: see :func:`nnx_model`) into its stacked class (see
    :func:`_stacked_class`, :func:`_stacked_call`), holding the adapter entries and, repeated along the layer axis,
    the data of the key that applies ``lora_dropout`` and, for several adapters, each example's adapter index
    (``adapter_ids``). ``fused``: an ``nnx.Linear`` tries the fused kernel."""
    spec = node.spec
    entries = side_entries(node)
    for key, value in entries.items():
        setattr(module, ENTRY_PREFIX + key, nnx.Param(value))
    layers = None if spec.layer_axis is None else node[spec.kernel_key].shape[spec.layer_axis]
    module.jlora_dropout = None
    if dropout_key is not None and spec.dropout > 0:
        typed = jax.dtypes.issubdtype(dropout_key.dtype, jax.dtypes.prng_key)
        data = jax.random.key_data(dropout_key) if typed else dropout_key
        setattr(module, ENTRY_PREFIX + "dropout_key", nnx.Param(_along_layers(data, spec.layer_axis, layers)))
        module.jlora_dropout = (spec.dropout, site, name, jax.random.key_impl(dropout_key) if typed else None)
    if spec.adapters:
        ids = jnp.asarray(adapter_ids, jnp.int32)
        setattr(module, ENTRY_PREFIX + ADAPTER_IDS, nnx.Param(_along_layers(ids, spec.layer_axis, layers)))
    if spec.activated and alora_offsets is not None:
        offsets = jnp.asarray(alora_offsets, jnp.int32)
        setattr(module, ENTRY_PREFIX + ALORA_OFFSETS, nnx.Param(_along_layers(offsets, spec.layer_axis, layers)))
    module.jlora_entries, module.jlora_spec, module.jlora_side = tuple(entries), spec, side
    module.jlora_fused = fused and type(module) is nnx.Linear
    module.__class__ = _stacked_class(module)


def _child(node: Any, key: Any) -> Any:
    return getattr(node, key) if isinstance(key, str) and hasattr(node, key) else node[key]


def _at(root: Any, path: tuple) -> Any:
    for key in path:
        root = _child(root, key)
    return root


def _replace_child(node: Any, key: Any, value: Any) -> None:
    if isinstance(key, str) and hasattr(node, key):
        setattr(node, key, value)
    else:
        node[key] = value


def nnx_model(graphdef: Any, lora_params: Any, *, lora_dropout_key: jax.Array | None = None,
              adapter_ids: jax.Array | None = None, fused: bool = False,
              alora_offsets: jax.Array | None = None) -> nnx.Module:
    """``nnx.merge(graphdef, ...)`` of a LoRA parameter tree (from ``jlora.load(nnx_state, ...)``), with
    every adapted ``Linear`` / ``LinearGeneral`` / ``Einsum`` / ``Embed`` / ``Conv`` running its adapter unmerged.

    ``lora_dropout_key``: apply the adapter's ``lora_dropout`` (training, as PEFT in train mode).
    ``adapter_ids``: each example's adapter index for a tree holding several adapters (-1 = base).
    ``fused`` (experimental, for GPUs): as :func:`jlora.wrap`'s, for ``nnx.Linear`` modules (stacked ones too).
    ``alora_offsets``: for aLoRA adapters, as :func:`jlora.wrap`'s.

    Example:
        >>> def loss(trainable, frozen, ids):
        ...     logits = jlora.nnx_model(graphdef, jlora.combine(trainable, frozen), lora_dropout_key=key)(ids)
        ...     return xent(logits, ids)
    """
    pairs, treedef = keyed(lora_params)
    sites = {path: node for path, node in pairs if is_adapted(node)}
    require_adapter_ids(sites.values(), adapter_ids)
    leaves = [plain_module(leaf) if is_adapted(leaf) else leaf for _, leaf in pairs]
    for i, kernel in tied_head_columns(pairs).items():  # trainable tokens tied to a copied head
        leaves[i] = kernel
    plain = jax.tree_util.tree_unflatten(treedef, leaves)
    probe = nnx.merge(graphdef, plain)  # the model itself unless some kernels must be merged
    candidates = {path: side_for(_at(probe, path), node.spec) for path, node in sites.items()
                  if node.has_side_path and node.spec.layer_axis is None and not node.spec.merged_in_call}
    side = {path: fn for path, fn in candidates.items() if fn is not None}  # path -> its side path
    # model-zoo modules (MaxText's DenseGeneral) that their model splits and merges itself (its remat, its layer
    # loop) hold the adapter as nnx.Param attributes, as stacked layers do: a stand-in would not survive nnx.split
    own_state = {path for path in side if type(_at(probe, path)) not in _STACKED and _stacked_class(_at(probe, path))}
    side = {path: fn for path, fn in side.items() if path not in own_state}
    stacked = {path for path, node in sites.items() if _runs_stacked(node, _at(probe, path))} | own_state
    merged = [path for path, node in sites.items() if node.has_side_path and path not in side and path not in stacked]
    model = probe
    unplanned = sorted(sites[path].spec.peft_name for path in merged if not sites[path].spec.merged_in_call)
    if unplanned:
        warnings.warn(f"jlora.nnx_model: no unmerged side path for {unplanned} (module class without one, or "
                      "stacked layers whose adapters replace tensors); their kernels are merged inside the call",
                      stacklevel=2)
    if merged:
        model = nnx.merge(graphdef, set_paths(plain, {path: merged_module(sites[path]) for path in merged}))
    for index, path in enumerate(sorted(stacked, key=str), start=len(side)):
        module = _at(model, path)
        _make_stacked(module, side_for(module, sites[path].spec), sites[path], lora_dropout_key, index,
                      "/".join(map(str, path)), adapter_ids, fused, alora_offsets)
    for index, path in enumerate(sorted(side, key=str)):
        node: AdaptedModule = sites[path]
        parent = _at(model, path[:-1])
        drop = lora_dropout(lora_dropout_key, node.spec.dropout, index, "/".join(map(str, path)))
        caller = _SideCaller(_child(parent, path[-1]), side[path], side_entries(node), node.spec,
                             CallContext(drop, adapter_ids, alora_offsets), fused)
        _replace_child(parent, path[-1], caller)
    return model
