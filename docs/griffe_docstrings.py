"""A griffe extension for the API reference: jlora's docstrings are Google style with a few Sphinx habits.

- ``Example:`` (singular) becomes ``Examples:``, so its ``>>>`` lines render as Python code, not as Markdown text
  (where ``lp["model"]["layers"]`` would read as a broken reference link);
- ``:func:`x```, ``:class:`x```, ``:meth:`x``` and ``:mod:`x``` roles become plain code spans.

Loaded from mkdocs.yml (``extensions:`` of the python handler); it changes only what the docs site shows.
"""
from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj):`~?([^`]+)`")
_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class SphinxishDocstrings(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
            obj.docstring.value = _ROLE.sub(r"`\1`", text)
