"""The GPU benchmark scripts run only when a GPU machine is lent, rarely: their --tiny mode runs the same code on
the CPU here, so they still work when one is (no timing is checked)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _run(args: list[str], tmp_path: Path) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(BENCH.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, *args], cwd=BENCH, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_bench_gpu_tiny_runs_every_section_but_load(tmp_path):
    out = _run(["bench_gpu.py", "--tiny", "--sections", "inference,mixed batch,PEFT", "--out", str(tmp_path)], tmp_path)
    text = (tmp_path / "gpu_results-tiny.md").read_text()
    assert "failed" not in text, text
    for heading in ("| T | base | wrap / base", "16 adapters mixed / base", "mixed, fused / base", "PEFT / torch base"):
        assert heading in text, heading
    assert "Kernels per call" in out


def test_diagnose_gpu_tiny_runs(tmp_path):
    out = _run(["diagnose/diagnose_gpu.py", "--tiny", "--tokens", "1", "--rounds", "1", "--profile"], tmp_path)
    assert "max |concat - inline|" in out and "profile T=1 concat bf16" in out and "failed" not in out, out
