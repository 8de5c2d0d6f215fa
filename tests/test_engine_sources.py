"""The engines' own loaders run on moetuner's exports (CPU, no GPU dependencies).

``python .ci/fetch_engines.py`` puts the loader files of SGLang 0.5.23, vLLM 0.33.0 and
vLLM-Ascend 0.23.0.post1 in ``.engines/src`` (``.ci/run`` does); each check imports the
engine's file itself, with small stand-ins for the heavy modules it imports (runtime
context, logger), and skips with the reason when that engine's files are missing.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from moetuner.export import LayerAxis, write_engine_files
from moetuner.integrations.vllm import MoetunerEplbPolicy
from moetuner.placement import Placement

torch = pytest.importorskip("torch", reason="the engines' loaders need torch")
SOURCES = Path(__file__).resolve().parents[1] / ".engines" / "src"
FETCH = "run `python .ci/fetch_engines.py` to fetch the engines' loader sources"

# MoE layers 0 and 1 of a 3-layer model (layer 0 dense), E = 8, G = 4, R = 4: 3 slots a GPU.
GOOD = Placement(phy2log=np.array([[0, 1, 2, 3, 4, 0, 5, 6, 1, 7, 0, 2],
                                   [7, 6, 0, 5, 4, 3, 2, 1, 7, 0, 1, 6]]),
                 num_gpus=4, num_experts=8)
# What published EPLB can produce: expert 0 twice on GPU 0 in MoE layer 0.
SHARED = Placement(phy2log=np.array([[0, 0, 2, 3, 4, 1, 5, 6, 1, 7, 0, 2],
                                     [7, 6, 0, 5, 4, 3, 2, 1, 7, 0, 1, 6]]),
                   num_gpus=4, num_experts=8, allow_shared_gpu=True)
AXIS = LayerAxis.resolve(2, num_hidden_layers=3, dense_layers=(0,))


def load_engine_module(name: str, stubs: dict[str, dict]):
    """Import ``name`` from ``.engines/src`` with its packages as bare namespaces (their
    ``__init__`` is not run) and ``stubs`` (module -> attributes) for what it imports."""
    path = SOURCES / (name.replace(".", "/") + ".py")
    if not path.exists():
        pytest.skip(f"{path.relative_to(SOURCES.parents[1])} missing: {FETCH}")
    parts = name.split(".")
    for depth in range(1, len(parts)):
        package = types.ModuleType(".".join(parts[:depth]))
        package.__path__ = [str(SOURCES.joinpath(*parts[:depth]))]
        sys.modules[package.__name__] = package
    for module, attributes in stubs.items():
        stub = types.ModuleType(module)
        stub.__dict__.update(attributes)
        sys.modules[module] = stub
    sys.modules.pop(name, None)              # import afresh: it binds the stand-ins above
    return importlib.import_module(name)


@pytest.fixture
def engine_modules():
    """Remove the engine modules and stand-ins from ``sys.modules`` after each test."""
    before = set(sys.modules)
    yield load_engine_module
    for name in set(sys.modules) - before:
        if name.split(".")[0] in ("sglang", "vllm", "vllm_ascend"):
            del sys.modules[name]


def bag(**fields) -> types.SimpleNamespace:
    return types.SimpleNamespace(**fields)


# ---------------------------------------------------------------- SGLang


def sglang_load(engine_modules, path: Path, backend: str, ranks: int, redundant: int):
    """SGLang's ``compute_initial_expert_location_metadata`` on ``path`` for every EP rank."""
    moe = bag(init_expert_location=str(path), ep_num_redundant_experts=redundant,
              moe_a2a_backend=backend, ep_dispatch_algorithm="static", ep_join_mode="none")
    context = {"get_exec": lambda: bag(moe=moe),
               "get_parallel": lambda: bag(ep_size=ranks, nnodes=1, tp_size=ranks,
                                           elastic_ep_initial_size=None),
               "get_device": lambda: bag(device="cpu"), "get_resources": lambda: bag()}
    module = engine_modules("sglang.srt.eplb.expert_location", {
        "sglang.srt.runtime_context": context,
        "sglang.srt.elastic_ep.elastic_ep": {"elastic_expanded_world_enabled": lambda: False},
    })
    # The model's shape, as SGLang reads it from the model class (3 hidden layers, E = 8).
    module.ModelConfigForExpertLocation.from_model_config = staticmethod(
        lambda _: module.ModelConfigForExpertLocation(num_layers=3, num_logical_experts=8))
    return [module.compute_initial_expert_location_metadata(None, rank)
            for rank in range(ranks)]


def unloaded_slots(metadata) -> list[tuple[int, int]]:
    """(hidden layer, slot) pairs that the slot's own rank never names in its map (so it
    never loads their weights) while another rank's map offers them as a target."""
    missing = []
    for rank, meta in enumerate(metadata):
        per_rank = meta.num_local_physical_experts
        for layer in range(meta.num_layers):
            own = set(meta.logical_to_all_physical_map_cpu[layer].flatten().tolist())
            others = {slot for other in metadata if other is not meta
                      for slot in other.logical_to_all_physical_map_cpu[layer].flatten().tolist()}
            missing += [(layer, slot) for slot in range(rank * per_rank, (rank + 1) * per_rank)
                        if slot not in own and slot in others]
    return missing


def test_sglang_loads_the_export_with_deepep(engine_modules, tmp_path):
    out = tmp_path / "p.json"
    write_engine_files(GOOD, "sglang", out, AXIS)
    metadata = sglang_load(engine_modules, out, "deepep", 4, GOOD.num_redundant)
    rows = metadata[0].physical_to_logical_map_cpu
    assert rows[1:].tolist() == GOOD.phy2log.tolist()
    assert rows[0].tolist() == (np.arange(12) % 8).tolist()          # the dense layer
    assert unloaded_slots(metadata) == []


def test_sglang_a2a_leaves_a_shared_replica_unloaded(engine_modules, tmp_path):
    # The "Why" of the export check: SGLang with DeepEP keeps one replica of expert 0 on
    # GPU 0, yet other ranks dispatch tokens to the other slot. Without a2a it is loaded.
    out = tmp_path / "p.json"
    write_engine_files(SHARED, "sglang", out, AXIS, backend="none")
    assert unloaded_slots(sglang_load(engine_modules, out, "none", 4, 4)) == []
    assert unloaded_slots(sglang_load(engine_modules, out, "deepep", 4, 4)) == [(1, 1)]
    with pytest.raises(ValueError, match="GPU 0 holds 2 replicas of expert 0"):
        write_engine_files(SHARED, "sglang", tmp_path / "q.json", AXIS)


def test_sglang_does_not_check_the_redundant_count(engine_modules, tmp_path):
    # Told 4 more redundant experts than the file has, SGLang 0.5.23 loads the 12-slot map
    # for 16 physical experts without a word: the printed --ep-num-redundant-experts must
    # be used as it is (moetuner's own reader checks it against the sidecar).
    out = tmp_path / "p.json"
    write_engine_files(GOOD, "sglang", out, AXIS)
    metadata = sglang_load(engine_modules, out, "deepep", 4, GOOD.num_redundant + 4)
    assert metadata[0].num_physical_experts == 12


# ---------------------------------------------------------------- vLLM-Ascend


def ascend_modules(engine_modules):
    logger = {"logger": logging.getLogger("vllm_ascend")}
    stubs = {"vllm.logger": logger, "vllm.utils.math_utils": {"cdiv": lambda a, b: -(-a // b)},
             "vllm.model_executor.layers.fused_moe.expert_map_manager":
                 {"determine_expert_map": None}}
    config = engine_modules("vllm_ascend.ascend_config", stubs)
    return config, engine_modules("vllm_ascend.eplb.core.eplb_utils", stubs)


def ascend_load(engine_modules, monkeypatch, flags: str, placement: Placement):
    """vLLM-Ascend's ``EplbConfig`` on the printed ``--additional-config`` and its
    ``init_eplb_config`` for every MoE layer and rank: the slot each rank routes each
    expert to, ``[L, G, E]``, and the redundant count it derives."""
    config_module, utils = ascend_modules(engine_modules)
    monkeypatch.setattr(torch.Tensor, "npu", lambda self: self, raising=False)
    additional = json.loads(flags.split("--additional-config '", 1)[1].split("'", 1)[0])
    eplb_config = config_module.EplbConfig(additional["eplb_config"])
    G, E = placement.num_gpus, placement.num_experts
    routed = np.empty((placement.num_layers, G, E), dtype=np.int64)
    for layer in range(placement.num_layers):
        for rank in range(G):
            moe = bag(num_experts=E, ep_size=G, ep_rank=rank)
            _, _, log2phy, redundant = utils.init_eplb_config(eplb_config, layer, moe)
            routed[layer, rank] = log2phy.numpy()
    return routed, redundant, eplb_config


def test_vllm_ascend_loads_the_export(engine_modules, monkeypatch, tmp_path):
    out = tmp_path / "a.json"
    _, flags = write_engine_files(GOOD, "vllm-ascend", out)
    routed, redundant, config = ascend_load(engine_modules, monkeypatch, flags, GOOD)
    assert config.expert_map_path == str(out) and redundant == GOOD.num_redundant
    # Every rank routes every expert to a slot that holds it.
    layers = np.arange(GOOD.num_layers)[:, None, None]
    assert (GOOD.phy2log[layers, routed] == np.arange(8)).all()


def test_vllm_ascend_misroutes_a_shared_replica(engine_modules, monkeypatch, tmp_path):
    # The "Why": one slot per expert per device shifts the layer's routing table.
    from moetuner.export import engine_flags, to_vllm_ascend

    out = tmp_path / "a.json"
    out.write_text(json.dumps(to_vllm_ascend(SHARED)))
    routed, _, _ = ascend_load(engine_modules, monkeypatch,
                               engine_flags(SHARED, "vllm-ascend", out), SHARED)
    layers = np.arange(SHARED.num_layers)[:, None, None]
    wrong = SHARED.phy2log[layers, routed] != np.arange(8)
    assert wrong[0].any() and not wrong[1].any()
    with pytest.raises(ValueError, match="GPU 0 holds 2 replicas of expert 0"):
        write_engine_files(SHARED, "vllm-ascend", tmp_path / "b.json")


def test_vllm_ascend_rejects_the_old_top_level_key(engine_modules):
    config_module, _ = ascend_modules(engine_modules)
    with pytest.raises(ValueError, match="no attribute"):
        config_module.EplbConfig({"expert_map": "x.json"})


# ---------------------------------------------------------------- vLLM


def test_vllm_default_policy_equals_moetuner_eplb(engine_modules):
    default = engine_modules("vllm.distributed.eplb.policy.default", {}).DefaultEplbPolicy
    rng = np.random.default_rng(0)
    # vLLM's port sums pack loads in float64 where DeepSeek uses float32, so on large
    # shapes near-equal sums can order differently; these shapes have none.
    shapes = [(12, 16, 4, 2, 8), (16, 24, 8, 4, 8), (8, 12, 3, 2, 4), (64, 80, 8, 2, 16)]
    for E, P, groups, nodes, ranks in shapes:
        for _ in range(8):
            weight = torch.from_numpy(rng.pareto(1.5, (4, E)) * 100 + 1)   # tie-free
            theirs = default.rebalance_experts(weight, P, groups, nodes, ranks)
            ours = MoetunerEplbPolicy.rebalance_experts(weight, P, groups, nodes, ranks)
            assert torch.equal(theirs, ours)
            old = theirs.flip(1)
            assert torch.equal(default.rebalance_experts(weight, P, groups, nodes, ranks, old),
                               MoetunerEplbPolicy.rebalance_experts(weight, P, groups, nodes,
                                                                    ranks, old))


def test_vllm_policy_interface_matches(engine_modules):
    import inspect

    abstract = engine_modules("vllm.distributed.eplb.policy.abstract", {}).AbstractEplbPolicy
    theirs = inspect.signature(abstract.rebalance_experts).parameters
    ours = inspect.signature(MoetunerEplbPolicy.rebalance_experts).parameters
    assert [(p.name, p.default) for p in theirs.values()] == \
        [(p.name, p.default) for p in ours.values()]


def test_vllm_own_eplb_tests_pass_on_the_moetuner_policy(engine_modules):
    """vLLM 0.33's ``tests/distributed/test_eplb_algo.py``, unchanged, with its
    ``DefaultEplbPolicy`` replaced by ``MoetunerEplbPolicy`` and its two helpers taken from
    vLLM's ``eplb_state.py`` (the rest of that module needs a GPU runtime)."""
    import ast

    tests = SOURCES / "tests/distributed/test_eplb_algo.py"
    state = SOURCES / "vllm/distributed/eplb/eplb_state.py"
    if not tests.exists() or not state.exists():
        pytest.skip(f"vLLM's EPLB tests missing: {FETCH}")
    source = state.read_text()
    helpers = {"torch": torch}
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name in ("compute_logical_maps",
                                                               "_compute_eplb_load_stats"):
            exec(compile(ast.Module([node], []), str(state), "exec"), helpers)   # noqa: S102
    engine_modules("vllm.distributed.eplb.policy.abstract", {
        "vllm.distributed.eplb.eplb_state": helpers,
        "vllm.distributed.eplb.policy.default": {"DefaultEplbPolicy": MoetunerEplbPolicy},
        "vllm.platforms": {"current_platform": bag(is_xpu=lambda: False,
                                                   is_cuda=lambda: False)}})
    spec = importlib.util.spec_from_file_location("vllm_test_eplb_algo", tests)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.DefaultEplbPolicy is MoetunerEplbPolicy
    ran, skipped = [], []
    names = [name for name, test in vars(module).items()
             if name.startswith("test_") and callable(test)]
    for name in names:
        test = getattr(module, name)
        marks = [m for m in getattr(test, "pytestmark", []) if m.name == "parametrize"]
        cases = [{}]
        if marks:
            argnames, values = marks[0].args[:2]
            if isinstance(argnames, str):
                argnames = [n.strip() for n in argnames.split(",")]
            cases = [dict(zip(argnames, getattr(v, "values", (v,) if len(argnames) == 1 else v),
                              strict=True)) for v in values]
        for case in cases:
            try:
                test(**case)
                ran.append(name)
            except pytest.skip.Exception:
                skipped.append(name)                   # the GPU device cases
    # Every test ran (the device test on CPU); only its GPU device cases skip here.
    assert len(names) >= 13 and set(ran) == set(names)
    assert set(skipped) == {"test_device_compatibility"}
