"""Runs jlora's Hub calls in a fresh interpreter, so that HF_ENDPOINT / HF_HUB_OFFLINE (which
huggingface_hub reads once, at import) take effect. Used by test_hub.py; no torch, no transformers.

Usage: ``python hub_client.py CALLS.json RESULTS.json``; CALLS is a list of
``{"id": ..., "fn": "load" | "config" | "merge" | "inspect" | "heal", "source": ..., "kwargs": {...}}``; RESULTS maps
each id to ``{"ok": true, ...summary}`` or ``{"ok": false, "type": ..., "adapter_error": bool, "message": ...}``.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
import urllib.request

import numpy as np
from adapter_files import llama_like_params


def _summary(lora_params) -> dict:
    from jlora.tree import adapted_modules

    return {node.spec.peft_name: {"lora_A": float(np.sum(np.asarray(node["lora_A"], np.float64))),
                                  "lora_B": float(np.sum(np.asarray(node["lora_B"], np.float64)))}
            for _, node in adapted_modules(lora_params)}


def run(call: dict) -> dict:
    import huggingface_hub

    import jlora

    fn, kwargs = call["fn"], call.get("kwargs", {})
    try:
        if fn == "heal":
            urllib.request.urlopen(f"{os.environ['HF_ENDPOINT']}/_test/heal/{call['source']}").read()
            return {"ok": True}
        if fn == "load":
            out = _summary(jlora.load(llama_like_params(), call["source"], **kwargs))
        elif fn == "merge":  # the command line, as a user runs it
            from jlora.cli import main as cli

            code = cli(["merge", "--base", call["source"], "--adapter", kwargs["adapter"], "--out", kwargs["out"],
                        "--no-progress"])
            out = {"code": code}
            if code:
                return {"ok": False, "type": "exit status", "adapter_error": code == 2, "source_error": False,
                        "message": f"exit status {code}"}
        elif fn == "inspect":  # the command line, as a user runs it: what it prints on stderr is the message
            from jlora.cli import main as cli

            stderr = io.StringIO()
            with contextlib.redirect_stderr(stderr):
                code = cli(["inspect", call["source"]])
            if code:
                return {"ok": False, "type": "exit status", "code": code, "adapter_error": code == 2,
                        "source_error": False, "message": stderr.getvalue()}
            out = {"code": code}
        elif fn == "config":
            out = {"r": jlora.LoraConfig.from_pretrained(call["source"], **kwargs).r}
        else:
            raise SystemExit(f"unknown fn {fn!r}")
        return {"ok": True, "hub_version": huggingface_hub.__version__, **out}
    except Exception as err:  # the test decides whether this type was acceptable
        return {"ok": False, "type": type(err).__name__, "adapter_error": isinstance(err, jlora.AdapterError),
                "source_error": isinstance(err, jlora.SourceError), "message": str(err)}


def main() -> None:
    calls = json.loads(open(sys.argv[1]).read())
    results = {}
    for call in calls:
        start = time.perf_counter()
        results[call["id"]] = {**run(call), "seconds": round(time.perf_counter() - start, 3)}
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
