"""Multi-device tests in subprocesses, so that this process keeps its single device: the 2x4-mesh
suite (tests/sharded/multidevice.py, 8 host CPU devices; every test there must pass, none skipped)
and a two-process jax.distributed run (tests/sharded/multiprocess.py)."""
from __future__ import annotations

import ast
import importlib.util
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from adapter_files import write_adapter

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "tests" / "sharded" / "multidevice.py"
# 8 CPU devices; LLVM at -O0 halves the compile time of the test programs (the SPMD partitioning and
# hence the HLO the tests inspect are unaffected).
FLAGS = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
         "--xla_llvm_disable_expensive_passes=true")


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


def test_two_processes_each_load_only_their_shards(tmp_path):
    """jax.distributed on localhost: 2 processes x 4 CPU devices; see tests/sharded/multiprocess.py."""
    worker = ROOT / "tests" / "sharded" / "multiprocess.py"
    spec = importlib.util.spec_from_file_location("multiprocess_worker", worker)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = {"peft_type": "LORA", "r": module.R, "lora_alpha": 2 * module.R, "target_modules": ["q_proj", "o_proj"]}
    folder = write_adapter(tmp_path / "adapter", config, module.adapter_tensors())
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, str(worker), str(i), str(port), str(folder), str(tmp_path / "out")],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, (p, text) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0 and f"process {i}: OK" in text, text[-5000:]
