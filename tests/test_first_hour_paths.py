"""A new user's first hour (items 6 and 7): a wrong path says what is not on disk (and what is close) and
fails fast when the Hub cannot be reached; a transformers model object and a truncated file get a one-line
answer; the CLI prints warnings and errors as ``jlora COMMAND: level: ...`` lines.

The tests named ``test_hub_*`` run the real huggingface_hub client in a fresh interpreter (hub_client.py)
against a fake Hub server or a closed port, with neither torch nor transformers: .ci/run runs them again
under huggingface_hub >= 1.0 (``-k hub``).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from adapter_files import adapter_bytes, llama_like_params, llama_lora_tensors, write_adapter
from fake_hub import FakeHub, Repo

import jlora
from jlora import cli
from jlora.load import read_adapter

TESTS = Path(__file__).resolve().parent
ROOT = Path(jlora.__file__).resolve().parent.parent
RETRY_SLEEP_S = 1 + 2 + 4 + 8 + 8  # huggingface_hub's backoff before it gives up on an unreachable Hub
FAST_S = 8.0  # well under RETRY_SLEEP_S, with room for a loaded machine


def closed_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def run_client(endpoint: str, home: Path, cwd: Path, calls: list[dict]) -> dict:
    """hub_client.py's results for ``calls``, run in ``cwd`` against ``endpoint`` with HF_HOME ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "TRANSFORMERS_OFFLINE"}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS)]))
    calls_file, results_file = home / "calls.json", home / "results.json"
    warm_up = {"id": "warm-up", "fn": "config", "source": str(cwd / "llama" / "adapter")}  # imports jlora
    calls_file.write_text(json.dumps([warm_up, *calls]))
    proc = subprocess.run([sys.executable, str(TESTS / "hub_client.py"), str(calls_file), str(results_file)],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(results_file.read_text())
    assert results["warm-up"]["ok"], results["warm-up"]
    return results


def assert_message(result: dict, *phrases: str, absent: tuple[str, ...] = ("repo_type",)) -> str:
    """A failed call whose one-line message has every phrase and none of ``absent``."""
    assert not result["ok"] and result["adapter_error"], result
    message = result["message"].strip()
    assert "\n" not in message, message
    for phrase in phrases:
        assert phrase in message, (phrase, message)
    for phrase in absent:
        assert phrase not in message, (phrase, message)
    return message


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A working directory holding the adapter folder ``llama/adapter`` (the one the typos miss)."""
    root = tmp_path_factory.mktemp("cwd")
    write_adapter(root / "llama" / "adapter")
    return root


@pytest.fixture(scope="module")
def hub():
    server = FakeHub({"user/adapter": Repo({"main": adapter_bytes(tensors=llama_lora_tensors(seed=1))})}).start()
    yield server
    server.stop()


# ---- item 6: wrong paths ---------------------------------------------------------------------------------
def test_hub_typo_with_the_hub_up_names_the_missing_folder_and_the_close_one(hub, workdir, tmp_path):
    results = run_client(hub.url, tmp_path, workdir, [
        {"id": "typo", "fn": "inspect", "source": "llama/adaptr"},
        {"id": "typo-load", "fn": "load", "source": "llama/adaptr"},
        {"id": "dot-slash", "fn": "load", "source": "./llama/adaptr"},
        {"id": "three-parts", "fn": "load", "source": "models/llama/adaptr"},
        {"id": "a-file", "fn": "load", "source": "llama/adapter/adapter_model.safetensors"},
        {"id": "hub", "fn": "load", "source": "user/adapter"},
    ])
    close = "did you mean 'llama/adapter'?"
    assert_message(results["typo"], f"jlora inspect: error: no local folder 'llama/adaptr' (cwd {workdir}; {close})",
                   "Hub repo 'llama/adaptr' was not found")
    assert results["typo"]["code"] == 2
    assert_message(results["typo-load"], "no local folder 'llama/adaptr'", close, "was not found")
    assert_message(results["dot-slash"], "'./llama/adaptr' is neither a local folder nor a valid Hub repo id", close)
    assert_message(results["three-parts"], "no local folder 'models/llama/adaptr'", f"cwd {workdir}",
                   "'owner/name'")  # huggingface_hub's own text advises repo_type=, which jlora has no use for
    assert_message(results["a-file"], "is a file, not a folder")
    assert results["hub"]["ok"], results["hub"]
    asked = {r.path.split("/resolve/")[0] for r in hub.log if "/resolve/" in r.path}
    assert asked == {"/llama/adaptr", "/user/adapter"}  # what cannot be a Hub id is never asked about


def test_hub_typo_with_the_hub_unreachable_says_both_at_once(workdir, tmp_path):
    """Nothing listens at HF_ENDPOINT: no ~25 s of huggingface_hub retries, and the message names the missing
    folder, the close one, and why the Hub could not be reached."""
    endpoint = closed_port_url()
    results = run_client(endpoint, tmp_path, workdir, [
        {"id": "typo", "fn": "inspect", "source": "llama/adaptr"},
        {"id": "typo-load", "fn": "load", "source": "llama/adaptr"},
        {"id": "hub-id", "fn": "load", "source": "user/adapter"},
    ])
    message = assert_message(results["typo"], "jlora inspect: error: no local folder 'llama/adaptr' "
                             f"(cwd {workdir}; did you mean 'llama/adapter'?), and the Hub ({endpoint}) could not "
                             "be reached (connection to 127.0.0.1 refused)", "not in the local cache")
    assert "Retrying" not in message
    for key in ("typo", "typo-load", "hub-id"):
        assert results[key]["seconds"] < FAST_S, (key, results[key])
    assert_message(results["hub-id"], "could not be reached", "'user/adapter'", "network connection")


def test_hub_unreachable_with_a_warm_cache_loads_at_once(hub, workdir, tmp_path):
    """The adapter was downloaded once; the Hub then goes away (HF_HUB_OFFLINE not set): the cache is read
    straight away instead of after huggingface_hub's retry loop."""
    online = run_client(hub.url, tmp_path, workdir, [{"id": "download", "fn": "load", "source": "user/adapter"}])
    assert online["download"]["ok"], online["download"]
    results = run_client(closed_port_url(), tmp_path, workdir, [
        {"id": "cached", "fn": "load", "source": "user/adapter"},
        {"id": "cached-inspect", "fn": "inspect", "source": "user/adapter"},
    ])
    assert results["cached"]["ok"] and results["cached-inspect"]["ok"], results
    assert {k: v for k, v in results["cached"].items() if k.startswith("model.")} == \
        {k: v for k, v in online["download"].items() if k.startswith("model.")}
    assert results["cached"]["seconds"] < FAST_S and results["cached-inspect"]["seconds"] < FAST_S, results


def test_a_path_object_that_does_not_exist_is_never_a_hub_id(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    with pytest.raises(jlora.SourceError) as err:
        jlora.load(llama_like_params(), Path("llama") / "adaptr")
    assert str(err.value) == f"no local folder 'llama/adaptr' (cwd {workdir}; did you mean 'llama/adapter'?)"
    with pytest.raises(jlora.SourceError, match=r"^no local folder '/nowhere/adapter'$"):
        jlora.LoraConfig.from_pretrained(Path("/nowhere/adapter"))


def test_load_with_a_transformers_flax_model_says_to_pass_its_params(tmp_path):
    from adapter_files import tiny_llama

    model, folder = tiny_llama(), write_adapter(tmp_path / "a")
    with pytest.raises(jlora.AdapterError, match=r"load: params is a FlaxLlamaForCausalLM model object.*"
                                                 r"jlora\.load\(model\.params, \.\.\.\)"):
        jlora.load(model, folder)
    config, tensors, _ = read_adapter(folder)
    with pytest.raises(jlora.AdapterError, match=r"jlora\.place\(model\.params"):
        jlora.place(model, config, tensors)
    assert jlora.load(model.params, folder) is not None

    from flax import nnx

    from jlora.load import _refuse_model_object

    class Module(nnx.Module):  # an NNX module with the same attribute names is not taken for one
        def __init__(self):
            self.config, self.params = {"r": 4}, nnx.Param(np.zeros((2, 2), np.float32))

    assert _refuse_model_object(Module(), "load") is None


def test_half_truncated_safetensors_is_one_line_that_says_truncated(tmp_path):
    folder = write_adapter(tmp_path / "a")
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(jlora.CheckpointError) as err:
        jlora.load(llama_like_params(), folder)
    message = str(err.value)
    assert "\n" not in message and err.value.problems == []
    assert message.startswith(f"{path}: truncated: the header's tensors need ")
    assert "download or copy it again" in message


# ---- item 7: the CLI's messages ------------------------------------------------------------------------
def test_cli_prints_warnings_as_terminal_lines_and_puts_everything_back(tmp_path, capsys):
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
              "future_field": 1}
    folder = write_adapter(tmp_path / "a", config=config)
    showwarning, jlora_logger = warnings.showwarning, logging.getLogger("jlora")
    handlers, propagate = list(jlora_logger.handlers), jlora_logger.propagate

    assert cli.main(["inspect", str(folder)]) == 0
    err = capsys.readouterr().err
    assert err.splitlines() == [f"jlora inspect: warning: {folder / 'adapter_config.json'}: unknown field "
                                "'future_field' (ignored: PEFT does not know it either, or it comes from a newer "
                                "PEFT than jlora knows)"]

    # only for the run: library users keep Python's warnings and their own logging
    assert warnings.showwarning is showwarning
    assert jlora_logger.handlers == handlers and jlora_logger.propagate == propagate
    with pytest.warns(UserWarning, match="future_field"):
        jlora.LoraConfig.from_pretrained(folder)


def test_cli_lines_for_other_warnings_errors_and_own_prefixes(capsys):
    with cli._terminal_messages("jlora merge"):
        warnings.warn("jlora merge: the adapter replaces model.embed_tokens.weight", stacklevel=1)  # own prefix
        warnings.warn("something else", FutureWarning, stacklevel=1)
        cli.LOGGER.error("bad input")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "jlora merge: warning: the adapter replaces model.embed_tokens.weight"
    assert lines[1].startswith("jlora merge: warning: something else [FutureWarning, test_first_hour_paths.py:")
    assert lines[2] == "jlora merge: error: bad input"
    assert len(lines) == 3  # no source lines
