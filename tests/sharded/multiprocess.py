"""One process of a two-process run (4 host CPU devices each; a 2x4 data x model mesh spans both).

    python tests/sharded/multiprocess.py PROCESS_ID PORT ADAPTER_DIR OUT_DIR

Checks that ``jlora.load`` places only this process's shards and reads only their slices of the
file, that they hold the file's values, and that ``jlora.save`` gathers across processes (process 0
writes a file equal to the input). Exits 0 and prints OK on success. Run by tests/test_sharding.py,
which writes the adapter (tensors from :func:`adapter_tensors`).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

R = 4
IN, OUT = 64, 32  # q_proj kernel (in, out) P("data", "model"); o_proj kernel (OUT, IN) P("model", "data")
PREFIX = "base_model.model.layers.0."


def base_kernels() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"q_proj": rng.standard_normal((IN, OUT)).astype(np.float32),
            "o_proj": rng.standard_normal((OUT, IN)).astype(np.float32)}


def adapter_tensors() -> dict[str, np.ndarray]:
    """PEFT tensors (PyTorch layouts) for q_proj and o_proj."""
    rng = np.random.default_rng(1)
    out = {}
    for name, kernel in base_kernels().items():
        d_in, d_out = kernel.shape
        out[f"{PREFIX}{name}.lora_A.weight"] = rng.standard_normal((R, d_in)).astype(np.float32)
        out[f"{PREFIX}{name}.lora_B.weight"] = rng.standard_normal((d_out, R)).astype(np.float32)
    return out


def _span(index, shape) -> tuple:
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def main(process_id: int, port: int, folder: Path, out: Path) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id)
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import jlora
    import jlora.placement
    from jlora.checkpoint import read_safetensors

    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    reads: dict[tuple, set] = {}
    host_shard = jlora.placement.host_shard

    def recording(host, index, dtype):  # every slice of the file that this process reads
        reads.setdefault(host.shape, set()).add(_span(index, host.shape))
        return host_shard(host, index, dtype)

    jlora.placement.host_shard = recording
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    specs = {"q_proj": P("data", "model"), "o_proj": P("model", "data")}
    params = {"layers": {"0": {}}}
    for name, kernel in base_kernels().items():
        sharding = NamedSharding(mesh, specs[name])
        params["layers"]["0"][name] = {"kernel": jax.make_array_from_callback(kernel.shape, sharding,
                                                                              lambda i, k=kernel: k[i])}
    lp = jlora.load(params, folder)

    tensors = adapter_tensors()
    want_specs = {"q_proj": {"lora_A": P("data", None), "lora_B": P(None, "model")},
                  "o_proj": {"lora_A": P("model", None), "lora_B": P(None, "data")}}
    for name in ("q_proj", "o_proj"):
        node = lp["layers"]["0"][name]
        for key in ("lora_A", "lora_B"):
            leaf = node[key]
            expected = tensors[f"{PREFIX}{name}.{key}.weight"].T  # jlora's layouts: A (in, r), B (r, out)
            assert not leaf.is_fully_addressable and leaf.shape == expected.shape
            assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, want_specs[name][key]), 2), (name, key)
            mine = {_span(s.index, leaf.shape) for s in leaf.addressable_shards}
            for shard in leaf.addressable_shards:
                np.testing.assert_array_equal(np.asarray(shard.data), expected[shard.index])
            assert reads[leaf.shape] == mine, (name, key, reads[leaf.shape], mine)  # this process's slices only
    # q_proj's lora_A rows are split over "data" = over the two processes: each read only half of them
    assert {span[0] for span in reads[(IN, R)]} == {(32 * process_id, 32 * process_id + 32)}

    jlora.save(lp, out)  # collective: every process gathers, process 0 writes
    multihost_utils.sync_global_devices("saved")
    if process_id == 0:
        saved = read_safetensors(out / "adapter_model.safetensors")
        assert set(saved) == set(tensors)
        for key, value in tensors.items():
            np.testing.assert_array_equal(saved[key], value)
    multihost_utils.sync_global_devices("checked")
    print(f"process {process_id}: OK", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
