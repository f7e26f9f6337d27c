"""jlora.load / LoraConfig.from_pretrained against a Hub: the real huggingface_hub client, a fake Hub server.

The server (fake_hub.py) runs in this process on 127.0.0.1; the client runs in a fresh interpreter
(hub_client.py) with HF_ENDPOINT / HF_HUB_OFFLINE / HF_HOME set, because huggingface_hub reads them once,
at import. All online calls run in one interpreter and all offline calls in another (start-up is the
slow part). No torch and no transformers here: this file also runs under huggingface_hub >= 1.0.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from adapter_files import PREFIX, adapter_bytes, llama_like_checkpoint, llama_lora_tensors
from fake_hub import FakeHub, Repo
from safetensors.numpy import load_file, save

import jlora

TESTS = Path(__file__).resolve().parent
ROOT = Path(jlora.__file__).resolve().parent.parent  # the jlora under test, first on the client's path
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
SEEDS = {"user/adapter": 1, "user/multi@main": 2, "user/multi@v2": 3, "user/multi@v2/sft": 4, "user/private": 5,
         "user/gated": 6, "user/flaky": 7, "user/trunc": 8, "user/renamed": 10}


def _adapter(seed: int, prefix: str = "") -> dict[str, bytes]:
    return {prefix + k: v for k, v in adapter_bytes(tensors=llama_lora_tensors(seed=seed)).items()}


def expected(seed: int) -> dict:
    """What hub_client reports for an adapter written with ``llama_lora_tensors(seed=seed)``."""
    tensors = llama_lora_tensors(seed=seed)
    names = sorted({k[len(PREFIX):].rsplit(".", 2)[0] for k in tensors})
    return {n: {f: float(np.sum(tensors[f"{PREFIX}{n}.{f}.weight"], dtype=np.float64)) for f in ("lora_A", "lora_B")}
            for n in names}


def assert_loaded(result: dict, seed: int) -> None:
    assert result["ok"], result
    got = {k: v for k, v in result.items() if k.startswith("model.")}
    want = expected(seed)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-6, abs=1e-6), name


def assert_source_error(result: dict, *phrases: str) -> None:
    assert not result["ok"], result
    assert result["source_error"], result  # a jlora.SourceError (an AdapterError), not the client's own error
    for phrase in phrases:
        assert phrase in result["message"], (phrase, result["message"])


@pytest.fixture(scope="module")
def hub():
    big = np.random.default_rng(0).standard_normal(4096).astype(np.float32).tobytes()
    repos = {
        "user/adapter": Repo({"main": {**_adapter(1), "model.safetensors": big, "README.md": b"# adapter\n",
                                       "pytorch_model.bin": big}}),
        "user/multi": Repo({"main": _adapter(2), "v2": {**_adapter(3), **_adapter(4, "sft/")}}),
        "user/private": Repo({"main": _adapter(5)}, token="hf_good"),
        "user/gated": Repo({"main": _adapter(6)}, token="hf_good", gated=True),
        "user/base-model": Repo({"main": {"config.json": b"{}", "model.safetensors": big}}),
        "user/flaky": Repo({"main": _adapter(7)}, fail_first=1),
        "user/trunc": Repo({"main": _adapter(8)}, truncate={"adapter_model.safetensors"}),
        "user/pickle-only": Repo({"main": {"adapter_config.json": _adapter(9)["adapter_config.json"],
                                           "adapter_model.bin": big}}),
        "user/renamed": Repo({"main": _adapter(10)}),
        "user/tiny-base": Repo({"main": {"config.json": b'{"model_type": "llama"}', "tokenizer.json": b"{}",
                                         "model.safetensors": save(llama_like_checkpoint(), {"format": "pt"}),
                                         "pytorch_model.bin": big, "consolidated.safetensors": big}}),
        "old/name": Repo({}, moved_to="user/renamed"),
    }
    server = FakeHub(repos).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf_home")


def run_client(hub: FakeHub, home: Path, calls: list[dict], offline: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "TRANSFORMERS_OFFLINE"}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_ETAG_TIMEOUT="10", HF_HUB_DOWNLOAD_TIMEOUT="10",
               JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS)]))
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    calls_file, results_file = home / f"calls-{offline}.json", home / f"results-{offline}.json"
    calls_file.write_text(json.dumps(calls))
    proc = subprocess.run([sys.executable, str(TESTS / "hub_client.py"), str(calls_file), str(results_file)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(results_file.read_text())


ONLINE = [
    {"id": "download", "fn": "load", "source": "user/adapter"},
    {"id": "config", "fn": "config", "source": "user/adapter"},
    {"id": "again", "fn": "load", "source": "user/adapter"},
    {"id": "main", "fn": "load", "source": "user/multi"},
    {"id": "revision+subfolder", "fn": "load", "source": "user/multi",
     "kwargs": {"revision": "v2", "subfolder": "sft"}},
    {"id": "commit", "fn": "load", "source": "user/multi", "kwargs": {"revision": "COMMIT:user/multi@v2"}},
    {"id": "private-no-token", "fn": "load", "source": "user/private"},
    {"id": "private-bad-token", "fn": "load", "source": "user/private", "kwargs": {"token": "hf_bad"}},
    {"id": "private-good-token", "fn": "load", "source": "user/private", "kwargs": {"token": "hf_good"}},
    {"id": "gated", "fn": "load", "source": "user/gated"},
    {"id": "missing-repo", "fn": "load", "source": "nobody/missing"},
    {"id": "missing-file", "fn": "config", "source": "user/base-model"},
    {"id": "missing-revision", "fn": "load", "source": "user/adapter", "kwargs": {"revision": "v9"}},
    {"id": "invalid-id", "fn": "load", "source": "not a repo!"},
    {"id": "escaping-subfolder", "fn": "load", "source": "user/multi", "kwargs": {"subfolder": "../other"}},
    {"id": "flaky", "fn": "load", "source": "user/flaky"},
    {"id": "truncated", "fn": "load", "source": "user/trunc", "kwargs": {"cache_dir": "CACHE:trunc"}},
    {"id": "heal", "fn": "heal", "source": "user/trunc"},
    {"id": "after-truncation", "fn": "load", "source": "user/trunc", "kwargs": {"cache_dir": "CACHE:trunc"}},
    {"id": "pickle-only", "fn": "load", "source": "user/pickle-only"},
    {"id": "renamed", "fn": "load", "source": "old/name"},
    {"id": "merge", "fn": "merge", "source": "user/tiny-base",
     "kwargs": {"adapter": "user/adapter", "out": "OUT:online"}},
]
OFFLINE = [
    {"id": "warm", "fn": "load", "source": "user/adapter"},
    {"id": "warm-config", "fn": "config", "source": "user/adapter"},
    {"id": "warm-revision+subfolder", "fn": "load", "source": "user/multi",
     "kwargs": {"revision": "v2", "subfolder": "sft"}},
    {"id": "cold", "fn": "load", "source": "user/adapter", "kwargs": {"cache_dir": "CACHE:cold"}},
    {"id": "cold-config", "fn": "config", "source": "user/adapter", "kwargs": {"cache_dir": "CACHE:cold"}},
    {"id": "merge", "fn": "merge", "source": "user/tiny-base",
     "kwargs": {"adapter": "user/adapter", "out": "OUT:offline"}},
]


def _resolve(calls: list[dict], hub: FakeHub, home: Path) -> list[dict]:
    """Fill in commit ids and per-scenario cache folders."""
    out = []
    for call in calls:
        kwargs = dict(call.get("kwargs", {}))
        for k, v in kwargs.items():
            if isinstance(v, str) and v.startswith("COMMIT:"):
                repo, branch = v[len("COMMIT:"):].split("@")
                kwargs[k] = hub.commit(repo, branch)
            elif isinstance(v, str) and v.startswith("CACHE:"):
                kwargs[k] = str(home / "caches" / v[len("CACHE:"):])
            elif isinstance(v, str) and v.startswith("OUT:"):
                kwargs[k] = str(home / "merged" / v[len("OUT:"):])
        out.append({**call, "kwargs": kwargs})
    return out


@pytest.fixture(scope="module")
def online(hub, home):
    return run_client(hub, home, _resolve(ONLINE, hub, home), offline=False)


@pytest.fixture(scope="module")
def offline(hub, home, online):  # runs after the online calls have filled the default cache
    before = len(hub.log)
    results = run_client(hub, home, _resolve(OFFLINE, hub, home), offline=True)
    return results, hub.log[before:]


# ---- online ---------------------------------------------------------------------------------------
def test_download_fetches_only_the_adapter_files_into_the_hf_cache(online, hub, home):
    assert_loaded(online["download"], SEEDS["user/adapter"])
    assert online["config"]["ok"] and online["config"]["r"] == 4
    assert_loaded(online["again"], SEEDS["user/adapter"])
    # each adapter file sent once; the base weights, pickle and README next to it never
    assert sorted(hub.downloaded("user/adapter")) == sorted(ADAPTER_FILES)
    snapshot = home / "hub" / "models--user--adapter" / "snapshots" / hub.commit("user/adapter")
    assert {p.name for p in snapshot.iterdir()} == ADAPTER_FILES
    assert (home / "hub" / "models--user--adapter" / "refs" / "main").read_text() == hub.commit("user/adapter")


def test_revision_subfolder_and_commit(online, hub):
    assert_loaded(online["main"], SEEDS["user/multi@main"])
    assert_loaded(online["revision+subfolder"], SEEDS["user/multi@v2/sft"])
    assert_loaded(online["commit"], SEEDS["user/multi@v2"])
    assert "sft/adapter_model.safetensors" in hub.downloaded("user/multi")


def test_private_repo_and_tokens(online, hub):
    assert_source_error(online["private-no-token"], "'user/private'", "not found", "hf auth login", "token=")
    assert_source_error(online["private-bad-token"], "'user/private'", "401", "token", "hf auth login")
    assert_loaded(online["private-good-token"], SEEDS["user/private"])


def test_gated_repo(online):
    assert_source_error(online["gated"], "'user/gated'", "gated", "accept its terms", "log in")


def test_missing_repo_file_and_revision(online):
    assert_source_error(online["missing-repo"], "'nobody/missing'", "not found", "check the id")
    assert_source_error(online["missing-file"], "adapter_config.json not found", "'user/base-model'",
                        "PEFT adapter repo")
    assert_source_error(online["missing-revision"], "revision 'v9' not found", "'user/adapter'")


def test_invalid_id_and_escaping_subfolder_never_reach_the_hub(online, hub):
    assert_source_error(online["invalid-id"], "'not a repo!'", "neither a local folder nor a valid Hub repo id")
    assert_source_error(online["escaping-subfolder"], "subfolder '../other'")
    assert not [r for r in hub.log if "other" in r.path or "not a repo" in r.path]


def test_server_error_then_success_is_retried(online, hub):
    assert_loaded(online["flaky"], SEEDS["user/flaky"])
    assert [r.status for r in hub.requests_for("user/flaky")][0] == 500


def test_truncated_body_is_an_error_then_a_retry_succeeds(online, hub, home):
    assert_source_error(online["truncated"], "adapter_model.safetensors", "'user/trunc'", "retry")
    assert_loaded(online["after-truncation"], SEEDS["user/trunc"])
    blobs = home / "caches" / "trunc" / "models--user--trunc" / "blobs"
    sizes = sorted(p.stat().st_size for p in blobs.iterdir() if not p.name.endswith(".incomplete"))
    assert sizes == sorted(len(v) for v in _adapter(8).values())  # no half file kept as a blob


def test_pickle_only_repo_is_refused_without_downloading_the_pickle(online, hub):
    result = online["pickle-only"]
    assert not result["ok"] and result["type"] == "CheckpointError", result
    assert "adapter_model.bin" in result["message"] and "allow_pickle=True" in result["message"]
    assert hub.downloaded("user/pickle-only") == ["adapter_config.json"]


def test_renamed_repo_follows_the_redirect(online, hub):
    assert_loaded(online["renamed"], SEEDS["user/renamed"])
    assert {r.status for r in hub.requests_for("old/name")} == {307}


# ---- offline ---------------------------------------------------------------------------------------
def test_offline_with_a_warm_cache_makes_no_request(offline):
    results, requests = offline
    assert_loaded(results["warm"], SEEDS["user/adapter"])
    assert results["warm-config"]["r"] == 4
    assert_loaded(results["warm-revision+subfolder"], SEEDS["user/multi@v2/sft"])
    assert requests == []


def test_offline_with_a_cold_cache_says_to_go_online(offline):
    results, requests = offline
    for key in ("cold", "cold-config"):
        assert_source_error(results[key], "adapter_config.json", "'user/adapter'", "HF_HUB_OFFLINE", "go online")
    assert requests == []


def assert_merged(out: Path) -> None:
    """W + 2 * B @ A (lora_alpha 8 / r 4) for every adapted module, every other tensor unchanged."""
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    got, base, lora = load_file(out / "model.safetensors"), llama_like_checkpoint(), llama_lora_tensors(seed=1)
    assert got.keys() == base.keys()
    for key, weight in base.items():
        name = PREFIX + key[: -len(".weight")]
        if f"{name}.lora_A.weight" in lora:
            weight = weight + 2.0 * lora[f"{name}.lora_B.weight"] @ lora[f"{name}.lora_A.weight"]
        np.testing.assert_allclose(got[key], weight, rtol=1e-6, atol=1e-6)


def test_merge_command_with_a_hub_base_and_adapter(online, offline, hub, home):
    assert online["merge"]["ok"], online["merge"]
    assert_merged(home / "merged" / "online")
    # the safetensors checkpoint and the non-weight files; never other weight formats or unused safetensors
    assert sorted(hub.downloaded("user/tiny-base")) == ["config.json", "model.safetensors", "tokenizer.json"]
    results, requests = offline
    assert results["merge"]["ok"], results["merge"]
    assert_merged(home / "merged" / "offline")
