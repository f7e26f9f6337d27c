"""The built-in layouts by name, and ``"auto"`` over them: what ``layout=`` accepts.

Example:
    >>> get_layout("tunix").name
    'tunix'
"""
from __future__ import annotations

from .auto_layout import AutoLayout
from .errors import AdapterError
from .layout import HfLayout, Layout
from .maxtext_layout import maxtext_layout
from .torch_layout import TorchLayout
from .tunix_layout import TunixLayout

AUTO_ORDER = ("hf", "tunix", "maxtext")  # what layout="auto" tries, in this order


def get_layout(layout: str | Layout) -> Layout:
    """The layout object for ``layout``.

    Args:
        layout: ``"auto"`` (the first of ``AUTO_ORDER`` that places every module), ``"hf"`` (transformers' Flax
            naming), ``"tunix"``, ``"maxtext"`` (or ``"maxtext:llama3.1"``, ``"maxtext:qwen3"``), ``"torch"``
            (PyTorch state dicts), or a :class:`jlora.Layout`, returned as it is.

    Returns:
        The (unbound) layout.

    Raises:
        AdapterError: an unknown name.

    Example:
        >>> get_layout("auto").bind(params, ["model.layers.0.self_attn.q_proj"]).name
        'hf'
    """
    if isinstance(layout, Layout):
        return layout
    if layout == "auto":
        return AutoLayout([get_layout(name) for name in AUTO_ORDER])
    if layout == "hf":
        return HfLayout()
    if layout == "torch":
        return TorchLayout()
    if layout == "tunix":
        return TunixLayout()
    if isinstance(layout, str) and (layout == "maxtext" or layout.startswith("maxtext:")):
        return maxtext_layout(layout)
    raise AdapterError(f"unknown layout {layout!r}; use 'auto', 'hf', 'tunix', 'maxtext', 'torch' or a jlora.Layout")
