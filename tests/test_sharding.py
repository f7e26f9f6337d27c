"""The multi-device tests (tests/sharded/multidevice.py) in a subprocess with 8 host CPU devices, so
that this process keeps its single device. Every test there must pass: none skipped."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "tests" / "sharded" / "multidevice.py"
# 8 CPU devices; LLVM at -O0 halves the compile time of the test programs (the SPMD partitioning and
# hence the HLO the tests inspect are unaffected).
FLAGS = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def test_sharded_suite_on_eight_host_devices():
    tests = [n.name for n in ast.parse(SUITE.read_text()).body
             if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
    env = {**os.environ, "XLA_FLAGS": f"{FLAGS} {os.environ.get('XLA_FLAGS', '')}".strip(), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", str(SUITE)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    report = f"{proc.stdout[-8000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, report
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.search(rf"\b{len(tests)} passed\b", summary), report
    assert not re.search(r"skipped|xfail|xpass|error|failed|deselected", summary), report
    passed = set(re.findall(r"^PASSED \S+::(\w+)", proc.stdout, flags=re.M))
    assert passed == set(tests), report
