"""save() is atomic: a failure while writing (fault injected mid-write) leaves the previous adapter
intact and no temporary files behind. No torch, no transformers."""
from __future__ import annotations

import importlib
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from adapter_files import llama_like_params, llama_lora_tensors, write_adapter

import jlora


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def saved(tmp_path):
    """An adapter saved to tmp_path/out, and a different one (new values) to save over it."""
    params = llama_like_params()
    old = jlora.load(params, write_adapter(tmp_path / "a", tensors=llama_lora_tensors(seed=1)))
    new = jlora.load(params, write_adapter(tmp_path / "b", tensors=llama_lora_tensors(seed=2)))
    out = jlora.save(old, tmp_path / "out")
    return out, _files(out), new


def test_save_writes_both_files_with_umask_permissions(saved):
    out, files, _ = saved
    assert sorted(files) == ["adapter_config.json", "adapter_model.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    for name in files:
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~umask


def test_weights_write_failing_midway_keeps_the_old_adapter(saved, monkeypatch):
    out, before, new = saved

    def half_then_fail(path, entries, produce, metadata=None):
        Path(path).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":")  # a partial file...
        raise OSError(28, "No space left on device")  # ...then the disk fills up

    monkeypatch.setattr(importlib.import_module("jlora.save"), "write_safetensors", half_then_fail)  # the module
    with pytest.raises(OSError, match="No space left"):
        jlora.save(new, out)
    assert _files(out) == before  # old files intact, no temporary files left behind


def test_config_write_failing_keeps_the_old_weights_too(saved, monkeypatch):
    out, before, new = saved
    real_write_text = Path.write_text

    def fail_on_config(self, *args, **kwargs):
        if ".adapter_config.json." in self.name:
            real_write_text(self, '{"r": ', encoding="utf-8")
            raise KeyboardInterrupt  # even an interrupt leaves nothing half-replaced
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", fail_on_config)
    with pytest.raises(KeyboardInterrupt):
        jlora.save(new, out)
    assert _files(out) == before


def test_a_successful_save_replaces_both_files(saved):
    out, before, new = saved
    jlora.save(new, out)
    after = _files(out)
    assert sorted(after) == sorted(before) and after["adapter_model.safetensors"] != before["adapter_model.safetensors"]
    reloaded = jlora.to_peft_tensors(jlora.load(llama_like_params(), out))
    for key, value in jlora.to_peft_tensors(new).items():
        np.testing.assert_array_equal(np.asarray(reloaded[key]), np.asarray(value))
