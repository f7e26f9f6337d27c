"""Test tiers. ``python -m pytest -m "not slow"`` runs the fast tier, a quick answer while editing (config,
targeting, placement, side paths, saving, errors, the Hub client: no PEFT or torch model per test);
``python -m pytest`` (and ``.ci/run``) runs everything, including the PEFT parity modules marked slow here."""
from __future__ import annotations

import importlib.util

import pytest

# The library stages run in venvs of their own (.ci/run); elsewhere their folders are not collected at all.
collect_ignore = [folder for folder, package in (("maxtext_stage", "maxtext"), ("easydel_stage", "easydel"))
                  if importlib.util.find_spec(package) is None]

# The modules of the fast tier; every other test module is marked slow.
FAST_MODULES = frozenset({
    "test_auto_layout.py", "test_errors.py", "test_fuzz.py", "test_hot_swap.py", "test_load_api.py",
    "test_placement.py", "test_save.py", "test_side_paths.py",
})


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: builds PyTorch/PEFT twins or whole models; left out by -m 'not slow'")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name not in FAST_MODULES:
            item.add_marker(pytest.mark.slow)
