"""The built-in ``"maxtext"`` layout: PEFT adapters of Hugging Face checkpoints on MaxText parameter trees.

MaxText's own converter (``maxtext.checkpoint_conversion.to_maxtext``, its ``utils/param_mapping.py``) turns a
Hugging Face checkpoint into a MaxText tree; this layout places the adapter's factors the way that converter places
each base weight, so that ``lora_B`` (output side) gets exactly the weight's permutation and scale:

- every kernel is the PyTorch weight transposed and its axes split (``reshape_kernel``): ``query`` / ``key`` /
  ``value`` ``(D, N|K, H)``, ``out`` ``(N, H, D)``, ``mlp/wi_0``, ``wi_1`` ``(D, F)``, ``wo`` ``(F, D)``,
  ``decoder/logits_dense`` ``(D, V)``, ``token_embedder/embedding`` ``(V, D)`` as is;
- scanned trees (``scan_layers=True``) stack the layers at axis 1 (``param_scan_axis``) under ``decoder/layers``;
  unscanned ones have ``decoder/layers_{i}``;
- Llama 3.1 (``LLAMA31_MAXTEXT_TO_HF_PARAM_HOOK_FN``): ``q_proj`` and ``k_proj`` rows are reordered within each
  head from Hugging Face's rotate-half RoPE order to MaxText's interleaved pairs (``adjust_rope``: row ``t * H/2 +
  j`` goes to ``2 j + t``), and ``q_proj`` is scaled by ``float32(1 / sqrt(head_dim))`` in float32
  (``scale_query_layer``; MaxText then does not scale the attention logits);
- Qwen3 / Qwen2.5 (``QWEN_MAXTEXT_TO_HF_PARAM_HOOK_FN``): the transpose only.

The family is found from the tree (a ``query_norm`` or a ``query/bias``: Qwen; otherwise Llama 3.1), or named:
``"maxtext:llama3.1"``, ``"maxtext:qwen3"``.

Unmerged, the adapter runs on MaxText's NNX ``Transformer`` (not its linen shell ``transformer_as_linen``, whose
NNX modules ``jlora.wrap`` cannot intercept: it would merge the kernels inside the call) through
:func:`jlora.nnx_model`; the NNX state's parameter paths are the linen tree's.

Example:
    >>> lora_params = jlora.load(mt_params, "adapter", layout="maxtext")     # mt_params: to_maxtext's tree
    >>> graphdef, state = nnx.split(transformer)    # maxtext.models.models.Transformer, holding the converted tree
    >>> lp = jlora.load(state, "adapter")           # (layout "auto" finds "maxtext")
    >>> logits = jax.jit(lambda lp: jlora.nnx_model(graphdef, lp)(ids, positions, enable_dropout=False))(lp)
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .errors import AdapterError
from .layout import Layout, Rule, _check_tree
from .tree import iter_modules

FAMILIES = ("llama3.1", "qwen3")
_LAYER = r"model\.layers\.(?P<layer>\d+)"


class UnknownMaxTextFamily(AdapterError):
    """A ``"maxtext:<family>"`` layout names a model family this layout does not know."""


def query_scale(sizes: Mapping[str, int]) -> float:
    """MaxText's ``scale_query_layer`` factor for a query kernel whose head holds ``2 * sizes["j"]`` rows.

    Args:
        sizes: the rule's axis sizes (``j`` is half the head dimension).

    Returns:
        ``float32(1 / sqrt(head_dim))`` as a Python float.

    Example:
        >>> query_scale({"j": 8})
        0.25
    """
    return float(np.float32(1 / np.sqrt(2 * sizes["j"])))


def _attention_rules(family: str, prefix: str, stack: str) -> list[Rule]:
    """The rules of one attention block: ``prefix`` the kernel's module path, ``stack`` ``" layer"`` (scanned) or
    ``""``; ``{i}`` / ``(?P<layer>)`` picks the layer."""
    if family == "llama3.1":  # adjust_rope on q and k, scale_query_layer on q
        q = Rule(_LAYER + r"\.self_attn\.q_proj", f"{prefix}/self_attention/query/kernel",
                 f"(n t j) i -> i{stack} n (j t)", t=2, out_scale=query_scale)
        k = Rule(_LAYER + r"\.self_attn\.k_proj", f"{prefix}/self_attention/key/kernel",
                 f"(k t j) i -> i{stack} k (j t)", t=2)
    else:
        q = Rule(_LAYER + r"\.self_attn\.q_proj", f"{prefix}/self_attention/query/kernel", f"(n h) i -> i{stack} n h")
        k = Rule(_LAYER + r"\.self_attn\.k_proj", f"{prefix}/self_attention/key/kernel", f"(k h) i -> i{stack} k h")
    return [q, k,
            Rule(_LAYER + r"\.self_attn\.v_proj", f"{prefix}/self_attention/value/kernel", f"(k h) i -> i{stack} k h"),
            Rule(_LAYER + r"\.self_attn\.o_proj", f"{prefix}/self_attention/out/kernel", f"o (n h) -> n{stack} h o")]


def _mlp_rules(prefix: str, stack: str) -> list[Rule]:
    return [Rule(_LAYER + r"\.mlp\.gate_proj", f"{prefix}/mlp/wi_0/kernel", f"f i -> i{stack} f"),
            Rule(_LAYER + r"\.mlp\.up_proj", f"{prefix}/mlp/wi_1/kernel", f"f i -> i{stack} f"),
            Rule(_LAYER + r"\.mlp\.down_proj", f"{prefix}/mlp/wo/kernel", f"o f -> f{stack} o")]


def maxtext_rules(family: str, root: str = "") -> list[Rule]:
    """The rules of the ``"maxtext"`` layout for one model family.

    Args:
        family: one of :data:`FAMILIES`.
        root: a path prefix for trees that keep MaxText's ``params`` collection level (``"params/"``).

    Returns:
        The rules: scanned (``decoder/layers``, layer axis 1) then unscanned (``decoder/layers_{i}``) per module,
        the embedding and the output head.

    Raises:
        UnknownMaxTextFamily: for a family not in :data:`FAMILIES`.

    Example:
        >>> jlora.Layout(maxtext_rules("qwen3"), name="maxtext")
    """
    if family not in FAMILIES:
        raise UnknownMaxTextFamily(f"unknown MaxText model family {family!r}; known: {list(FAMILIES)}")
    rules = []
    for prefix, stack in ((f"{root}decoder/layers", " layer"), (f"{root}decoder/layers_{{layer}}", "")):
        rules += _attention_rules(family, prefix, stack) + _mlp_rules(prefix, stack)
    return rules + [Rule(r"model\.embed_tokens", f"{root}token_embedder/embedding", "v d -> v d"),
                    Rule(r"lm_head", f"{root}decoder/logits_dense/kernel", "o i -> i o")]


def detect_family(params: Mapping) -> str:
    """The model family of a MaxText tree, from the modules it has.

    Args:
        params: the MaxText parameter tree (with or without the ``params`` level).

    Returns:
        ``"qwen3"`` when the attention has a ``query_norm`` or a ``query`` bias (Qwen3, Qwen2.5: no reordering,
        no scale), else ``"llama3.1"``.

    Example:
        >>> detect_family(mt_params)
        'llama3.1'
    """
    for path, module in iter_modules(params):
        names = [str(k) for k in path]
        if "self_attention" in names and (names[-1] == "query_norm" or (names[-1] == "query" and "bias" in module)):
            return "qwen3"
    return "llama3.1"


class MaxTextLayout(Layout):
    """The ``"maxtext"`` layout (see the module docstring); ``family`` ``"auto"`` finds it from the tree.

    Example:
        >>> bound = MaxTextLayout(family="qwen3").bind(mt_params)
    """

    tree_name = "MaxText"

    def __init__(self, rules: Sequence[Rule] = (), *, name: str | None = "maxtext", params: Mapping | None = None,
                 family: str = "auto"):
        if family != "auto" and family not in FAMILIES:
            raise UnknownMaxTextFamily(f"unknown MaxText model family {family!r}; known: {list(FAMILIES)}")
        super().__init__(rules, name=name or "maxtext", params=params)
        self.family = family

    def bind(self, params: Mapping, names: Sequence[str] = ()) -> "MaxTextLayout":
        """This layout for ``params`` (a MaxText tree, with or without its ``params`` level).

        Args:
            params: the tree.
            names: PEFT module names (unused: MaxText's naming has one form).

        Returns:
            The bound layout, its rules those of the tree's family.

        Raises:
            AdapterError: when ``params`` is not a nested dict.

        Example:
            >>> MaxTextLayout().bind(mt_params).family
            'llama3.1'
        """
        _check_tree(params)
        root = "params/" if "params" in params and "decoder" not in params else ""
        family = detect_family(params) if self.family == "auto" else self.family
        return type(self)(maxtext_rules(family, root), name=self.name, params=params, family=family)


def maxtext_layout(spec: str) -> MaxTextLayout:
    """The layout for ``"maxtext"`` or ``"maxtext:<family>"`` (as ``jlora.load(..., layout=...)`` takes it).

    Args:
        spec: ``"maxtext"`` (family found from the tree) or ``"maxtext:llama3.1"`` / ``"maxtext:qwen3"``.

    Returns:
        An unbound :class:`MaxTextLayout`.

    Raises:
        UnknownMaxTextFamily: for an unknown family.

    Example:
        >>> maxtext_layout("maxtext:qwen3").family
        'qwen3'
    """
    _, _, family = spec.partition(":")
    return MaxTextLayout(family=family or "auto")

