"""The examples run and check themselves (each exits non-zero when its own check fails)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script,args", [
    ("quickstart.py", []),
    ("quickstart_flax_transformers.py", []),
    ("multi_adapter.py", []),
    ("hot_swap.py", []),
    ("nnx_training.py", []),
    ("fused_kernel.py", []),
    ("moe_experts.py", []),
    ("activated_lora.py", []),
    ("block_diagonal.py", []),
    ("arrow_routing.py", []),
    ("layer_replication.py", []),
    ("kasa.py", []),
    ("tunix_llama.py", []),
    ("nnx_module.py", []),
    ("continue_training.py", ["--steps", "40"]),
])
def test_example_runs(script, args, tmp_path):
    extra = ["--out", str(tmp_path / "out")] if script == "continue_training.py" else []
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args, *extra],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "OK" in done.stdout
