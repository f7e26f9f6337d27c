"""Adapters on a 2x4 (data x model) mesh of CPU devices, base params of a tiny FlaxLlama sharded FSDP x TP.

Needs 8 devices: ``tests/test_sharding.py`` runs this file in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the name keeps it out of the default
collection, where the process has one device). The reference for every number is the same
adapter on one device.
"""
from __future__ import annotations

import collections
import itertools
import re
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
import transformers as tf
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (adapter_files)
from adapter_files import PREFIX, write_adapter  # noqa: E402

import jlora  # noqa: E402
from jlora.placement import to_device  # noqa: E402
from jlora.tree import adapted_modules, get_path  # noqa: E402

if jax.device_count() != 8:
    raise RuntimeError(f"needs 8 devices, found {jax.device_count()}: run with "
                       "XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/test_sharding.py does)")

R = 6  # a rank no model dimension shares, so LoRA-sized values are recognisable in the HLO
BATCH, SEQ = 2, 5
COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # kernels (in, out): P(data, model)
ROW = ("o_proj", "down_proj")  # P(model, data)
TARGETS = list(COLUMN + ROW) + ["embed_tokens"]


def fsdp_tp(path, leaf) -> P:
    """FSDP over "data" x tensor parallel over "model" for the Llama tree; vectors replicated."""
    keys = [getattr(k, "key", str(k)) for k in path]
    if keys[-1] == "kernel":
        return P("model", "data") if keys[-2] in ROW else P("data", "model")
    if keys[-1] == "embedding":
        return P("model", "data")
    return P()


def expected_specs(name: str) -> dict[str, P]:
    """The derived shardings, written out by hand (kernel (in, out); embedding (V, D))."""
    module = name.rsplit(".", 1)[-1]
    if module == "lm_head":
        return {"kernel": P("data", "model")}
    ins, outs = ("model", "data") if module in ROW + ("embed_tokens",) else ("data", "model")
    base = "embedding" if module == "embed_tokens" else "kernel"
    return {base: P(ins, outs), "lora_A": P(ins, None), "lora_B": P(None, outs), "lora_magnitude": P(outs),
            "lora_scale": P()}


def tiny_llama_and_params(seed: int = 0):
    """A 1-layer FlaxLlama and random params made with numpy (no init compile)."""
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = tf.FlaxLlamaForCausalLM(cfg, _do_init=False)
    shapes = jax.eval_shape(lambda key: model.init_weights(key, (1, 1)), jax.random.key(0))
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map(
        lambda s: (1.0 + 0.1 * rng.standard_normal(s.shape) if len(s.shape) == 1 else
                   0.1 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
    return model, params


def adapter_tensors(params, seed: int = 1) -> dict[str, np.ndarray]:
    """A PEFT DoRA adapter (PyTorch layouts) on every linear layer and the embedding, lm_head saved."""
    rng = np.random.default_rng(seed)
    rand = lambda *shape: (0.2 * rng.standard_normal(shape)).astype(np.float32)  # noqa: E731
    layer = params["model"]["layers"]["0"]
    out = {}
    for group in ("self_attn", "mlp"):
        for name, module in layer[group].items():
            d_in, d_out = module["kernel"].shape
            key = f"{PREFIX}model.layers.0.{group}.{name}"
            out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = rand(R, d_in), rand(d_out, R)
            out[f"{key}.lora_magnitude_vector"] = 1.0 + np.abs(rand(d_out))
    vocab, dim = params["model"]["embed_tokens"]["embedding"].shape
    key = f"{PREFIX}model.embed_tokens"
    out[f"{key}.lora_embedding_A"], out[f"{key}.lora_embedding_B"] = rand(R, vocab), rand(dim, R)
    out[f"{key}.lora_magnitude_vector"] = 1.0 + np.abs(rand(dim))
    out[f"{PREFIX}lm_head.weight"] = rand(vocab, dim)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model, single = tiny_llama_and_params()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    shardings = jax.tree_util.tree_map_with_path(lambda p, x: NamedSharding(mesh, fsdp_tp(p, x)), single)
    sharded = jax.device_put(single, shardings)
    config = {"peft_type": "LORA", "r": R, "lora_alpha": 2 * R, "target_modules": TARGETS, "use_dora": True,
              "modules_to_save": ["lm_head"]}
    folder = write_adapter(tmp_path_factory.mktemp("adapter"), config, adapter_tensors(single))
    ids = np.random.default_rng(0).integers(0, 128, (BATCH, SEQ)).astype(np.int32)
    ids_sharded = jax.device_put(ids, NamedSharding(mesh, P("data", None)))
    lp_single, lp_sharded = jlora.load(single, folder), jlora.load(sharded, folder)
    forward = jax.jit(jlora.wrap(lambda ids, params: model(ids, params=params).logits))
    base_forward = jax.jit(lambda ids, params: model(ids, params=params).logits)
    return dict(model=model, mesh=mesh, single=single, sharded=sharded, folder=folder, ids=ids,
                ids_sharded=ids_sharded, lp_single=lp_single, lp_sharded=lp_sharded,
                # each compiled once: the HLO checks and the numbers use the same executables
                forward_single=forward.lower(ids, lp_single).compile(),
                forward_sharded=forward.lower(ids_sharded, lp_sharded).compile(),
                base_single=base_forward.lower(ids, single).compile(),
                base_sharded=base_forward.lower(ids_sharded, sharded).compile())


def test_lora_leaves_have_the_derived_shardings(setup):
    nodes = adapted_modules(setup["lp_sharded"])
    assert sorted(n.spec.peft_name.rsplit(".", 1)[-1] for _, n in nodes) == sorted(TARGETS + ["lm_head"])
    for _, node in nodes:
        want = expected_specs(node.spec.peft_name)
        assert set(want) == set(node), node.spec.peft_name
        for key, leaf in node.items():
            expected = NamedSharding(setup["mesh"], want[key])
            assert leaf.sharding.is_equivalent_to(expected, leaf.ndim), (node.spec.peft_name, key, leaf.sharding)
            shard_shape = expected.shard_shape(leaf.shape)  # no device holds more than its share
            assert all(s.data.shape == shard_shape for s in leaf.addressable_shards), (node.spec.peft_name, key)
    path = nodes[-1][0]  # base arrays are shared, not copied or moved
    assert get_path(setup["lp_sharded"], path)["kernel"] is get_path(setup["sharded"], path)["kernel"]


def test_values_equal_single_device(setup):
    single = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(setup["lp_single"])}
    for path, leaf in jax.tree_util.tree_leaves_with_path(setup["lp_sharded"]):
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(single[jax.tree_util.keystr(path)]))


def test_load_reads_only_each_devices_slices(setup):
    reads = []

    class Recording(np.ndarray):
        def __getitem__(self, index):
            reads.append(index)
            return np.asarray(self)[index]

    host = np.arange(64 * 32, dtype=np.float32).reshape(32, 64).view(Recording).T  # a transposed file tensor
    out = to_device(host, NamedSharding(setup["mesh"], P("data", "model")), np.float32)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(host))
    sizes = sorted(np.asarray(host)[index].size for index in reads)
    assert len(reads) == 8 and sizes == [host.size // 8] * 8


def test_wrapped_and_merged_outputs_equal_single_device(setup):
    want = np.asarray(setup["forward_single"](setup["ids"], setup["lp_single"]))
    got = setup["forward_sharded"](setup["ids_sharded"], setup["lp_sharded"])
    assert len(got.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    base = np.asarray(setup["base_single"](setup["ids"], setup["single"]))
    assert np.abs(base - want).max() > 1e-2  # the adapter matters

    merged = jlora.merge(setup["lp_sharded"])
    for (path, leaf), (_, base_leaf) in zip(jax.tree_util.tree_leaves_with_path(merged),
                                            jax.tree_util.tree_leaves_with_path(setup["sharded"])):
        assert leaf.sharding.is_equivalent_to(base_leaf.sharding, leaf.ndim), jax.tree_util.keystr(path)
    want_merged = np.asarray(setup["base_single"](setup["ids"], jlora.merge(setup["lp_single"])))
    got_merged = setup["base_sharded"](setup["ids_sharded"], merged)  # the base executable: same shardings
    np.testing.assert_allclose(np.asarray(got_merged), want_merged, rtol=1e-5, atol=1e-5)


def loss_fn(model):
    forward = jlora.wrap(lambda ids, params: model(ids, params=params).logits)

    def loss(trainable, frozen, ids):
        logits = forward(ids, jlora.combine(trainable, frozen))[:, :-1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    return loss


@pytest.fixture(scope="module")
def training(setup):
    """A jitted SGD-with-momentum step on the trainable leaves (gradients for those only), compiled once
    per placement. (Adam would turn float noise in near-zero gradients into +-lr updates.)"""
    loss, tx = loss_fn(setup["model"]), optax.sgd(0.1, momentum=0.9)

    @jax.jit
    def step(trainable, frozen, opt_state, ids):
        updates, opt_state = tx.update(jax.grad(loss)(trainable, frozen, ids), opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    out = {}
    for kind in ("single", "sharded"):
        trainable, frozen = jlora.split(setup[f"lp_{kind}"])
        state = tx.init(trainable)
        ids = setup["ids" if kind == "single" else "ids_sharded"]
        out[kind] = step.lower(trainable, frozen, state, ids).compile(), state
    return out


def test_train_step_gives_the_single_device_update(setup, training):
    results = {}
    for kind in ("single", "sharded"):
        compiled, state = training[kind]
        trainable, frozen = jlora.split(setup[f"lp_{kind}"])
        for _ in range(2):
            trainable, state = compiled(trainable, frozen, state, setup["ids" if kind == "single" else "ids_sharded"])
        results[kind] = jlora.combine(trainable, frozen)
    mask = jax.tree_util.tree_leaves(jlora.trainable_mask(setup["lp_sharded"]))
    leaves = zip(jax.tree_util.tree_leaves_with_path(results["sharded"]), jax.tree_util.tree_leaves(results["single"]),
                 jax.tree_util.tree_leaves(setup["lp_sharded"]), mask)
    moved = 0
    for (path, got), want, start, trainable in leaves:
        name = jax.tree_util.keystr(path)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6, err_msg=name)
        assert got.sharding.is_equivalent_to(start.sharding, got.ndim), (name, got.sharding, start.sharding)
        changed = not np.array_equal(np.asarray(got), np.asarray(start))
        assert changed == trainable, name  # trainable leaves move, frozen base leaves stay put
        moved += changed
    assert moved == sum(mask) == 8 * 3 + 1  # (A, B, magnitude) x 8 modules + lm_head
    # jlora.optimizer on the whole sharded tree: state only for trainable leaves, sharded like them
    state = jlora.optimizer(optax.adam(1e-3), setup["lp_sharded"]).init(setup["lp_sharded"])
    arrays = [x for x in jax.tree_util.tree_leaves(state) if getattr(x, "ndim", 0) > 0]
    assert len(arrays) == 2 * sum(mask) and all(len(x.sharding.device_set) == 8 for x in arrays)


def _all_gathers(hlo: str) -> collections.Counter:
    """Result shapes (dims) of every all-gather in compiled HLO text (combined ones counted per operand)."""
    out = collections.Counter()
    for m in re.finditer(r"= (.*?) all-gather(?:-start)?\(", hlo):
        for dims in re.findall(r"\w+\[([\d,]*)\]", m.group(1)):
            out[tuple(int(d) for d in dims.split(",") if d)] += 1
    return out


def _kernel_shapes(params) -> set[tuple[int, ...]]:
    """Every shape a base matrix can have while (partially) gathered: each axis divided by any
    divisor of its number of shards."""
    shapes = set()
    for leaf in jax.tree_util.tree_leaves(params):
        if leaf.ndim < 2:
            continue
        shard = leaf.sharding.shard_shape(leaf.shape)
        options = [[d // k for k in range(1, d // s + 1) if (d // s) % k == 0] for d, s in zip(leaf.shape, shard)]
        shapes |= set(itertools.product(*options))
    return shapes


def _check_gathers(base_hlo: str, lora_hlo: str, kernels: set) -> None:
    base, lora = _all_gathers(base_hlo), _all_gathers(lora_hlo)
    for shape, count in lora.items():
        if shape in kernels:
            assert count <= base[shape], f"extra all-gather of a base matrix {shape}: {count} vs {base[shape]}"
    extra = lora - base
    assert all(R in shape for shape in extra), f"all-gathers added beyond LoRA-sized values: {dict(extra)}"


def test_no_added_all_gather_of_base_kernels(setup, training):
    kernels = _kernel_shapes(setup["sharded"])
    assert (64, 64) in kernels and (32, 64) in kernels and (64, 128) in kernels
    base_hlo, lora_hlo = setup["base_sharded"].as_text(), setup["forward_sharded"].as_text()
    assert _all_gathers(base_hlo), "the base forward should gather something on this mesh (activations)"
    _check_gathers(base_hlo, lora_hlo, kernels)

    model = setup["model"]

    @jax.jit
    def base_step(params, ids):  # full fine-tuning: gradients for every base matrix
        def loss(p):
            logits = model(ids, params=p).logits[:, :-1]
            return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()
        return jax.tree_util.tree_map(lambda p, g: p - 1e-2 * g, params, jax.grad(loss)(params))

    base_hlo = base_step.lower(setup["sharded"], setup["ids_sharded"]).compile().as_text()
    _check_gathers(base_hlo, training["sharded"][0].as_text(), kernels)


def test_placement_overrides(setup):
    mesh, sharded, folder = setup["mesh"], setup["sharded"], setup["folder"]
    lp = jlora.load(sharded, folder, sharding="replicated")
    for _, node in adapted_modules(lp):
        for key in ("lora_A", "lora_B", "lora_magnitude"):
            if key in node:
                assert node[key].sharding.is_fully_replicated and len(node[key].sharding.device_set) == 8

    seen = {}

    def only_b_replicated(path, leaf):
        seen[path] = leaf
        return NamedSharding(mesh, P()) if path.endswith("lora_B") else None

    lp = jlora.load(sharded, folder, sharding=only_b_replicated)
    q = lp["model"]["layers"]["0"]["self_attn"]["q_proj"]
    assert q["lora_B"].sharding.is_fully_replicated
    assert q["lora_A"].sharding.is_equivalent_to(NamedSharding(mesh, P("data", None)), 2)
    leaf = seen["model/layers/0/self_attn/q_proj/lora_A"]
    assert leaf.shape == (64, R) and leaf.sharding.spec == P("data", None)

    with pytest.raises(jlora.AdapterError) as err:  # rank 6 is not divisible by 4 devices; 1-D leaves too short
        jlora.load(sharded, folder, sharding=NamedSharding(mesh, P(None, "model")))
    text = str(err.value)
    assert "model/layers/0/self_attn/q_proj/lora_A" in text and "lora_magnitude" in text
    with pytest.raises(jlora.AdapterError, match="other devices"):
        jlora.load(sharded, folder, device=jax.devices()[3])


def test_save_from_a_sharded_tree(setup, tmp_path):
    one = jlora.save(setup["lp_single"], tmp_path / "single") / "adapter_model.safetensors"
    eight = jlora.save(setup["lp_sharded"], tmp_path / "sharded") / "adapter_model.safetensors"
    assert one.read_bytes() == eight.read_bytes()
    assert one.read_bytes() == (setup["folder"] / "adapter_model.safetensors").read_bytes()


def test_stacked_layers_keep_the_layer_axis_sharding(tmp_path):
    """A scanned (MaxText-style) kernel (D, L, N, H) sharded over layers and heads: the stacked LoRA
    leaves shard their layer axis like the kernel, and the wrapped scan gives the single-device output."""
    from llama_variants import ScannedLlama

    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, head_dim=8, max_position_embeddings=64)
    model = ScannedLlama(cfg)
    ids = np.random.default_rng(0).integers(0, 64, (BATCH, SEQ)).astype(np.int32)
    single = jax.tree_util.tree_map(np.asarray, model.init(jax.random.key(0), ids)["params"])
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    query = NamedSharding(mesh, P(None, "data", "model", None))  # (D, L, N, H): layers x heads
    sharded = jax.tree_util.tree_map(lambda x: jax.device_put(x, NamedSharding(mesh, P())), single)
    sharded["decoder"]["layers"]["attn"]["query"]["kernel"] = jax.device_put(
        single["decoder"]["layers"]["attn"]["query"]["kernel"], query)
    rng = np.random.default_rng(3)
    tensors = {}
    for layer in range(2):
        key = f"{PREFIX}model.layers.{layer}.self_attn.q_proj"
        tensors[f"{key}.lora_A.weight"] = (0.2 * rng.standard_normal((R, 32))).astype(np.float32)
        tensors[f"{key}.lora_B.weight"] = (0.2 * rng.standard_normal((32, R))).astype(np.float32)
    folder = write_adapter(tmp_path / "a", {"peft_type": "LORA", "r": R, "lora_alpha": R,
                                            "target_modules": ["q_proj"]}, tensors)
    layout = jlora.Layout([jlora.Rule(r"model\.layers\.(?P<layer>\d+)\.self_attn\.q_proj",
                                      "decoder/layers/attn/query/kernel", "(n h) i -> i layer n h")])
    lp = jlora.load(sharded, folder, layout=layout)
    node = lp["decoder"]["layers"]["attn"]["query"]
    assert node["lora_A"].sharding.spec == P(None, "data", None)  # (D, L, R)
    assert node["lora_B"].sharding.spec == P(None, "data", "model", None)  # (R, L, N, H)
    assert node["lora_scale"].sharding.spec == P(None, "data", None)
    forward = jax.jit(jlora.wrap(model.apply))
    want = forward({"params": jlora.load(single, folder, layout=layout)}, ids)
    np.testing.assert_allclose(forward({"params": lp}, ids), want, rtol=1e-5, atol=1e-5)

    # several adapters: the stacked leaves keep the same shardings, the adapter axis replicated
    sources = {"a": folder, "b": write_adapter(tmp_path / "b", {"peft_type": "LORA", "r": R, "lora_alpha": 3 * R,
                                                                "target_modules": ["q_proj"]}, tensors)}
    mixed = jlora.load(sharded, sources, layout=layout)
    node = mixed["decoder"]["layers"]["attn"]["query"]
    assert node["lora_A"].sharding.spec == P(None, "data", None, None)  # (adapters, L, D, R): layers at axis 1
    assert node["lora_B"].sharding.spec == P(None, "data", None, "model", None)  # (adapters, L, R, N, H)
    adapter_ids = np.array([1, -1], np.int32)
    want = forward({"params": jlora.load(single, sources, layout=layout)}, ids, adapter_ids=adapter_ids)
    np.testing.assert_allclose(forward({"params": mixed}, ids, adapter_ids=adapter_ids), want, rtol=1e-5, atol=1e-5)


def test_mixed_adapters_keep_the_derived_shardings(setup, tmp_path):
    """Several adapters on a sharded tree: the stacked factors keep each single adapter's sharding with the adapter
    axis replicated, per-adapter lm_head copies the kernel's, and the mixed batch gives the single-device output."""
    single, sharded, mesh = setup["single"], setup["sharded"], setup["mesh"]
    no_dora = {k: v for k, v in adapter_tensors(single).items() if "magnitude" not in k}
    other = {k: v for k, v in adapter_tensors(single, seed=5).items() if "magnitude" not in k and "lm_head" not in k}
    sources = {"a": write_adapter(tmp_path / "a", {"peft_type": "LORA", "r": R, "lora_alpha": 2 * R,
                                                   "target_modules": TARGETS, "modules_to_save": ["lm_head"]}, no_dora),
               "b": write_adapter(tmp_path / "b", {"peft_type": "LORA", "r": R, "lora_alpha": R,
                                                   "target_modules": TARGETS}, other)}
    mixed = jlora.load(sharded, sources)
    for _, node in adapted_modules(mixed):
        single_specs = expected_specs(node.spec.peft_name)
        for key, leaf in node.items():
            if key in ("lora_A", "lora_B"):
                want = P(None, *single_specs[key])
            elif key == "lora_scale":
                want = P()
            elif key.startswith("by_adapter_"):
                want = P(None, *single_specs[key[len("by_adapter_"):]])
            else:
                want = single_specs[key]
            assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, want), leaf.ndim), (node.spec.peft_name, key)
    adapter_ids = np.array([1, -1], np.int32)
    forward = jax.jit(jlora.wrap(lambda ids, params: setup["model"](ids, params=params).logits))
    want = forward(setup["ids"], jlora.load(single, sources), adapter_ids=adapter_ids)
    got = forward(setup["ids_sharded"], mixed, adapter_ids=adapter_ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_expert_parallel_lora_on_parameters(tmp_path):
    """LoRA on a mixture of experts' stacked weights (target_parameters), experts sharded over "model" and a weight
    axis over "data": the factors take the expert axis' and the kernel's sharding, the wrapped forward equals the
    single-device one, and the merged parameter keeps the kernel's sharding."""
    import jax.numpy as jnp
    from test_param_targets import _flax_params, _gpt_oss, _model, _peft, _routing

    base = _gpt_oss()
    _peft(base, tmp_path / "a")
    single = _flax_params(base)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    spec = lambda leaf: P("model", "data", None) if leaf.ndim == 3 else P()  # noqa: E731  ((E, d1, d2))
    sharded = jax.tree_util.tree_map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))), single)
    lp = jlora.load(sharded, tmp_path / "a")
    node = lp["model"]["layers"]["0"]["mlp"]["experts"]["gate_up_proj"]  # (E, out 32, in 48), PEFT's reading
    assert {k: node[k].sharding.spec for k in node} == {
        "gate_up_proj": P("model", "data", None), "lora_A": P("model", None, None),
        "lora_B": P("model", None, "data"), "lora_scale": P("model", None, None)}
    x, scores, _ = _routing()
    routing = jnp.asarray(scores.numpy())
    got = np.asarray(jax.jit(jlora.wrap(_model))(lp, x, routing))
    want = np.asarray(jax.jit(jlora.wrap(_model))(jlora.load(single, tmp_path / "a"), x, routing))
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    merged = jlora.merge(lp)["model"]["layers"]["0"]["mlp"]["experts"]["gate_up_proj"]
    assert merged.sharding.spec == P("model", "data", None)
