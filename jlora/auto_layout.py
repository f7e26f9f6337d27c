"""``layout="auto"``: the built-in layout that places an adapter on the tree it is given.

The candidates are tried in order (transformers' Flax naming, tunix, MaxText); the first that places every
PEFT module of the adapter wins. When none places them all, the one that places most is used, so that the
error lists every module it could not place, and names each layout tried with how far it got.

Example:
    >>> bound = AutoLayout([HfLayout(), TunixLayout()]).bind(state, ["model.layers.0.self_attn.q_proj"])
    >>> bound.name
    'tunix'
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from .errors import AdapterError
from .layout import Layout


def _placed(layout: Layout, names: Sequence[str]) -> int:
    """How many of the PEFT modules ``names`` the bound ``layout`` finds a place for."""
    return sum(layout.place(n, "linear") is not None or layout.place(n, None) is not None for n in names)


class AutoLayout(Layout):
    """The first of ``candidates`` (unbound layouts, tried in order) that fits the tree: see the module docstring.

    Example:
        >>> lora_params = jlora.load(tunix_state, "adapter_dir")   # layout="auto" is the default
    """

    def __init__(self, candidates: Sequence[Layout]):
        super().__init__((), name="auto")
        self.candidates = tuple(candidates)

    def bind(self, params: Mapping, names: Sequence[str] = ()) -> Layout:
        """The first candidate layout, bound to ``params``, that places every module of ``names``.

        Args:
            params: the parameter tree.
            names: the adapter's PEFT module names (without ``base_model.model.``).

        Returns:
            The chosen layout, bound. With no names, the first candidate. When none places every module, the
            one that places most, its name saying how far each candidate got (error messages quote it).
        """
        tried = []
        for candidate in self.candidates:
            try:
                bound = candidate.bind(params, names)
            except AdapterError:  # a tree this layout cannot read at all
                continue
            placed = _placed(bound, names)
            if placed == len(names):
                return bound
            tried.append((placed, -len(tried), bound))
        if not tried:
            return self.candidates[0].bind(params, names)  # raises its own error
        best = max(tried, key=lambda t: t[:2])[2]
        summary = ", ".join(f"{b.name} placed {p} of {len(names)}" for p, _, b in tried)
        best.name = f"{best.name}, chosen by layout='auto' ({summary}; pass layout= to choose)"
        return best
