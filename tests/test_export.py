import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moetuner.cli import run
from moetuner.errors import InputError
from moetuner.export import (
    LayerAxis,
    check_sglang,
    check_vllm_ascend,
    placement_from_expert_gpu,
    read_megatron,
    read_sglang,
    read_sglang_count,
    read_vllm,
    read_vllm_ascend,
    sidecar_path,
    write_engine_files,
)
from moetuner.models import get_model
from moetuner.placement import Placement
from moetuner.profile import Profile

# 2 MoE layers, E = 4, G = 2, P = 6: expert 1 and 2 replicated in layer 0, 0 and 3 in layer 1.
PHY2LOG = np.array([[0, 1, 2, 3, 1, 2],
                    [3, 0, 1, 2, 0, 3]])


def example(**kwargs) -> Placement:
    return Placement(phy2log=PHY2LOG, num_gpus=2, num_experts=4,
                     metadata={"method": "hand"}, **kwargs)


def test_sglang_round_trip_with_dense_layers(tmp_path):
    out = tmp_path / "p.json"
    axis = LayerAxis.resolve(2, num_hidden_layers=4, dense_layers=(0, 2))
    written, flags = write_engine_files(example(), "sglang", out, axis)
    assert written == [out, tmp_path / "p.meta.json"]
    data = json.loads(out.read_text())
    assert list(data) == ["physical_to_logical_map"]
    rows = np.array(data["physical_to_logical_map"])
    # Dense layers get SGLang's trivial row p % E; MoE layers 1 and 3 hold the placement.
    assert rows.tolist() == [[0, 1, 2, 3, 0, 1], PHY2LOG[0].tolist(),
                             [0, 1, 2, 3, 0, 1], PHY2LOG[1].tolist()]
    check_sglang(data, num_hidden_layers=4, num_experts=4, num_gpus=2)
    assert "--init-expert-location" in flags and "--ep-num-redundant-experts 2" in flags
    back = read_sglang(out)
    assert np.array_equal(back.phy2log, PHY2LOG)
    assert (back.num_gpus, back.num_experts, back.metadata) == (2, 4, {"method": "hand"})


def test_sglang_layer_axis_from_model_preset(tmp_path):
    spec = get_model("deepseek-v3")
    phy2log = np.tile(np.arange(256), (spec.num_moe_layers, 1))
    placement = Placement(phy2log=phy2log, num_gpus=8, num_experts=256)
    out = tmp_path / "v3.json"
    write_engine_files(placement, "sglang", out, LayerAxis.resolve(placement.num_layers, spec))
    rows = check_sglang(json.loads(out.read_text()), 61, 256, 8)
    assert rows.shape == (61, 256)
    assert np.array_equal(read_sglang(out).phy2log, phy2log)


MAP = "physical_to_logical_map"


@pytest.mark.parametrize("data, redundant, field", [
    ({MAP: [[0, 1, 2, 3]] * 2, "note": 1}, None, "keys"),           # extra key
    ({MAP: [[0, 1, 2, 3]] * 3}, None, MAP),                          # 3 rows for 2 layers
    ({MAP: [[0, 1, 2]] * 2}, None, MAP),                             # fewer slots than E
    ({MAP: [[0, 1, 2, 4]] * 2}, None, MAP),                          # id out of range
    ({MAP: [[0, 1, 2, 3], [0, 1]]}, None, MAP),                      # ragged rows
    ({MAP: [[0, 1, 2, 2]] * 2}, None, MAP),                          # expert 3 missing
    ({MAP: [[0, 1, 2, 3, 0, 1, 2, 3]] * 2}, 2, MAP),                 # 8 slots, not E + R = 6
    ({"logical_count": [[1, 2, 3]] * 2}, None, "logical_count"),     # 3 experts, not 4
    ({"logical_count": [[1, 2, 3, -4]] * 2}, None, "logical_count"),
    ([[0, 1, 2, 3]], None, "keys"),
])
def test_sglang_loader_mirror_rejects(data, redundant, field):
    with pytest.raises(InputError) as err:
        check_sglang(data, num_hidden_layers=2, num_experts=4, num_gpus=2,
                     num_redundant=redundant)
    assert err.value.field == field


def test_sglang_loader_mirror_accepts():
    rows = check_sglang({MAP: [[0, 1, 2, 3, 0, 1, 2, 3]] * 2}, 2, 4, 2, num_redundant=4)
    assert rows.shape == (2, 8)


def test_sglang_loader_mirror_accepts_steps_of_counts():
    counts = check_sglang({"logical_count": [[[1, 2], [0, 1]], [[1, 0], [2, 2]]]}, 2, 2, 1)
    assert counts.tolist() == [[2, 2], [2, 3]]


def test_sglang_output_must_end_in_json(tmp_path):
    with pytest.raises(InputError, match="inline JSON"):
        write_engine_files(example(), "sglang", tmp_path / "p.txt")
    assert not list(tmp_path.iterdir())


def test_sglang_count_round_trip(tmp_path):
    profile = Profile.from_load(np.array([[5, 1, 0, 2], [3, 3, 1, 1]]), top_k=1)
    axis = LayerAxis.resolve(2, num_hidden_layers=3, dense_layers=(0,))
    out = tmp_path / "count.json"
    write_engine_files(profile, "sglang-count", out, axis)
    assert json.loads(out.read_text()) == {"logical_count": [[0, 0, 0, 0], [5, 1, 0, 2],
                                                             [3, 3, 1, 1]]}
    assert np.array_equal(read_sglang_count(out, axis, 4).load, profile.load)


def test_vllm_writes_the_proposed_json_list_only(tmp_path):
    out = tmp_path / "v.json"
    axis = LayerAxis.resolve(2, num_hidden_layers=3, dense_layers=(0,))
    written, flags = write_engine_files(example(), "vllm", out, axis)
    assert written == [out] and sorted(p.name for p in tmp_path.iterdir()) == ["v.json"]
    assert json.loads(out.read_text()) == PHY2LOG.tolist()
    assert np.array_equal(read_vllm(out, num_gpus=2).phy2log, PHY2LOG)
    # The printed command starts vLLM 0.33 as it is; the map is for the unmerged proposal.
    assert json.loads(flag_json(flags, "--eplb-config")) == {"num_redundant_experts": 2}
    assert "initial_expert_map_path" in flags and "NOT MERGED" in flags


def flag_json(flags: str, flag: str) -> str:
    """The single-quoted JSON value after ``flag`` in printed engine flags."""
    return flags.split(flag + " '", 1)[1].split("'", 1)[0]


def test_vllm_ascend_round_trip(tmp_path):
    out = tmp_path / "a.json"
    write_engine_files(example(), "vllm-ascend", out)
    data = json.loads(out.read_text())
    assert data["moe_layer_count"] == 2
    assert data["layer_list"][1]["device_list"][1] == {"device_id": 1,
                                                       "device_expert": [2, 0, 3]}
    assert check_vllm_ascend(data).shape == (2, 2, 3)
    _, flags = write_engine_files(example(), "vllm-ascend", out)
    # Current vLLM-Ascend reads the map under eplb_config, with the redundant count.
    assert json.loads(flag_json(flags, "--additional-config")) == {
        "eplb_config": {"expert_map_path": str(out), "num_redundant_experts": 2}}
    assert "--enable-expert-parallel" in flags
    back = read_vllm_ascend(out)
    assert np.array_equal(back.phy2log, PHY2LOG) and back.num_gpus == 2


def _ascend(layers):
    return {"moe_layer_count": len(layers),
            "layer_list": [{"layer_id": i, "device_count": len(d),
                            "device_list": [{"device_id": g, "device_expert": e}
                                            for g, e in enumerate(d)]}
                           for i, d in enumerate(layers)]}


@pytest.mark.parametrize("data", [
    {"layer_list": []},
    {**_ascend([[[0, 1], [2, 3]]]), "moe_layer_count": 2},
    _ascend([[[0, 1], [2]]]),                        # ragged devices: no [G, S] tensor
    _ascend([[[0, 1], [2, 3]], [[0, 1, 2, 3]]]),     # device count changes between layers
    {"moe_layer_count": 1, "layer_list": [{"device_list": [{"experts": [0]}]}]},
])
def test_vllm_ascend_shape_rules(data):
    with pytest.raises(InputError):
        check_vllm_ascend(data)


def test_megatron_refuses_replicas(tmp_path):
    with pytest.raises(InputError, match="no replicas"):
        write_engine_files(example(), "megatron", tmp_path / "m.npy")
    assert not (tmp_path / "m.npy").exists()


def test_megatron_round_trip_with_empty_slots(tmp_path):
    # Free cluster sizes: GPU 0 holds 3 experts in layer 0, GPU 1 holds 1.
    phy2log = np.array([[0, 2, 3, 1, -1, -1], [0, 1, -1, 2, 3, -1]])
    placement = Placement(phy2log=phy2log, num_gpus=2, num_experts=4, allow_empty_slots=True)
    for fmt in ("sglang", "vllm", "vllm-ascend"):
        with pytest.raises(InputError, match="megatron"):
            write_engine_files(placement, fmt, tmp_path / f"{fmt}.json")
    out = tmp_path / "m.npy"
    write_engine_files(placement, "megatron", out)
    assert np.load(out).tolist() == [[0, 1, 0, 0], [0, 0, 1, 1]]
    back = read_megatron(out, num_gpus=2)
    assert np.array_equal(back.replicas_on_gpu, placement.replicas_on_gpu)
    assert np.array_equal(back.phy2log, phy2log)


def test_expert_gpu_equal_sizes_matches_placement_builder():
    expert_gpu = np.array([[1, 0, 1, 0], [0, 0, 1, 1]])
    assert np.array_equal(placement_from_expert_gpu(expert_gpu, 2).phy2log,
                          Placement.from_expert_gpu(expert_gpu, 2).phy2log)


@st.composite
def placements(draw):
    G = draw(st.integers(1, 4))
    E = G * draw(st.integers(1, 3))
    R = G * draw(st.integers(0, 2))
    L = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    rows = [rng.permutation(np.concatenate([np.arange(E), rng.integers(0, E, R)]))
            for _ in range(L)]
    return Placement(phy2log=np.array(rows), num_gpus=G, num_experts=E, allow_shared_gpu=True)


@settings(max_examples=25, deadline=None)
@given(placements(), st.integers(0, 2))
def test_every_format_round_trips(tmp_path_factory, placement, dense):
    tmp = tmp_path_factory.mktemp("rt")
    axis = LayerAxis.resolve(placement.num_layers, num_hidden_layers=placement.num_layers + dense,
                             dense_layers=tuple(range(dense)))
    shared = bool((placement.replicas_on_gpu > 1).any())
    write_engine_files(placement, "sglang", tmp / "s.json", axis,
                       backend="none" if shared else None)
    write_engine_files(placement, "vllm", tmp / "v.json", axis)
    backs = [read_sglang(tmp / "s.json"),
             read_vllm(tmp / "v.json", placement.num_gpus, placement.num_experts)]
    if shared:
        with pytest.raises(InputError, match="distinct GPUs"):
            write_engine_files(placement, "vllm-ascend", tmp / "a.json", axis)
    else:
        write_engine_files(placement, "vllm-ascend", tmp / "a.json", axis)
        backs.append(read_vllm_ascend(tmp / "a.json", placement.num_experts))
    for back in backs:
        assert np.array_equal(back.phy2log, placement.phy2log)
        assert back.num_gpus == placement.num_gpus
    if (placement.logcnt == 1).all():
        write_engine_files(placement, "megatron", tmp / "m.npy")
        back = read_megatron(tmp / "m.npy", placement.num_gpus)
        assert np.array_equal(back.replicas_on_gpu, placement.replicas_on_gpu)


def test_layer_axis_rejects_wrong_counts():
    with pytest.raises(InputError):
        LayerAxis.resolve(3, num_hidden_layers=4, dense_layers=(0, 1))
    with pytest.raises(InputError):
        LayerAxis.resolve(2, num_hidden_layers=3, dense_layers=(5,))


def test_sidecar_path():
    assert sidecar_path("out/p.json").name == "p.meta.json"
    assert sidecar_path("out/p").name == "p.meta.json"


def test_cli_export_prints_flags(tmp_path, capsys):
    src = tmp_path / "place.json"
    example().save(src)
    out = tmp_path / "sg.json"
    assert run(["export", str(src), "--format", "sglang", "--num-hidden-layers", "3",
                "--dense-layers", "0", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"--init-expert-location {out}" in printed
    assert "--ep-num-redundant-experts 2" in printed
    assert len(json.loads(out.read_text())["physical_to_logical_map"]) == 3


def test_cli_export_bad_input_exit_2(tmp_path, capsys):
    src = tmp_path / "place.json"
    example().save(src)
    out = tmp_path / "m.npy"
    assert run(["export", str(src), "--format", "megatron", "-o", str(out)]) == 2
    assert run(["export", str(src), "--format", "sglang", "--model", "mixtral-8x7b",
                "-o", str(tmp_path / "s.json")]) == 2
    assert run(["export", str(src), "--format", "nope", "-o", str(out)]) == 2
    assert "error" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["place.json"]


def test_cli_export_sglang_count_from_profile(tmp_path):
    prof = tmp_path / "prof.npz"
    Profile.from_load(np.array([[2, 0, 1, 1]]), top_k=1).save(prof)
    out = tmp_path / "count.json"
    assert run(["export", str(prof), "--format", "sglang-count", "-o", str(out)]) == 0
    assert json.loads(out.read_text()) == {"logical_count": [[2, 0, 1, 1]]}


# Expert 1 twice on GPU 0 in MoE layer 1 (hidden layer 2): what published EPLB can produce.
SHARED = np.array([[0, 1, 2, 3, 1, 2],
                   [1, 1, 0, 2, 3, 0]])


def shared_example() -> Placement:
    return Placement(phy2log=SHARED, num_gpus=2, num_experts=4, allow_shared_gpu=True,
                     source="shared.json")


@pytest.mark.parametrize("fmt, backend", [("sglang", None), ("sglang", "deepep"),
                                          ("sglang", "mooncake"), ("vllm-ascend", None)])
def test_replicas_on_one_gpu_refused_naming_layer_gpu_expert(tmp_path, fmt, backend):
    axis = LayerAxis.resolve(2, num_hidden_layers=3, dense_layers=(0,))
    with pytest.raises(InputError) as err:
        write_engine_files(shared_example(), fmt, tmp_path / "p.json", axis, backend)
    assert "layer 1 (hidden layer 2): GPU 0 holds 2 replicas of expert 1" in str(err.value)
    assert not list(tmp_path.iterdir())


def test_replicas_on_one_gpu_accepted_where_safe(tmp_path):
    # SGLang without an a2a backend and vLLM load them as they are.
    written, flags = write_engine_files(shared_example(), "sglang", tmp_path / "s.json",
                                        backend="none")
    assert "--moe-a2a-backend none" in flags and len(written) == 2
    assert np.array_equal(read_sglang(tmp_path / "s.json").phy2log, SHARED)
    write_engine_files(shared_example(), "vllm", tmp_path / "v.json")
    assert json.loads((tmp_path / "v.json").read_text()) == SHARED.tolist()


def test_published_eplb_placement_refused_for_deepep_unless_backend_none(tmp_path):
    from moetuner import make_cluster, place
    from moetuner.methods import PlaceOptions

    # One expert far hotter than the rest: EPLB puts several of its copies on one GPU.
    profile = Profile.from_load(np.array([[1000, 1, 1, 1]]))
    placement, _ = place(profile, make_cluster(2, 1), "eplb", PlaceOptions(redundant=4))
    assert (placement.replicas_on_gpu > 1).any()
    with pytest.raises(InputError, match="replicas of expert 0"):
        write_engine_files(placement, "sglang", tmp_path / "s.json")
    write_engine_files(placement, "sglang", tmp_path / "s.json", backend="none")
    fixed, _ = place(profile, make_cluster(2, 1), "eplb_fixed", PlaceOptions(redundant=4))
    write_engine_files(fixed, "sglang", tmp_path / "f.json")
    write_engine_files(fixed, "vllm-ascend", tmp_path / "a.json")


def test_backend_flag_checked(tmp_path):
    with pytest.raises(InputError, match="only with --format sglang"):
        write_engine_files(example(), "vllm", tmp_path / "v.json", backend="none")
    with pytest.raises(InputError, match="one of none, deepep"):
        write_engine_files(example(), "sglang", tmp_path / "s.json", backend="deep-ep")
    assert not list(tmp_path.iterdir())


def test_sglang_flags_name_the_redundant_count_and_backend(tmp_path):
    _, flags = write_engine_files(example(), "sglang", tmp_path / "s.json")
    assert "--ep-size 2 --moe-a2a-backend deepep" in flags
    assert "--ep-num-redundant-experts 2" in flags


def test_sglang_pair_is_written_all_or_none(tmp_path):
    # The sidecar cannot be written (a directory holds its name): the main file is not left.
    (tmp_path / "s.meta.json").mkdir()
    with pytest.raises(InputError, match="writable"):
        write_engine_files(example(), "sglang", tmp_path / "s.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.meta.json"]


def test_vllm_ascend_output_must_end_in_json(tmp_path):
    with pytest.raises(InputError, match="expert_map_path"):
        write_engine_files(example(), "vllm-ascend", tmp_path / "a.txt")


def test_cli_export_refuses_shared_gpu_and_overwriting_input(tmp_path, capsys):
    src = tmp_path / "place.json"
    shared_example().save(src)
    assert run(["export", str(src), "--format", "sglang", "-o", str(tmp_path / "s.json")]) == 2
    assert "GPU 0 holds 2 replicas of expert 1" in capsys.readouterr().err
    assert run(["export", str(src), "--format", "sglang", "--backend", "none",
                "-o", str(tmp_path / "s.json")]) == 0
    before = src.read_text()
    assert run(["export", str(src), "--format", "vllm", "-o", str(src)]) == 2
    assert src.read_text() == before


def test_cli_export_checks_the_model_expert_count(tmp_path, capsys):
    src = tmp_path / "place.json"
    placement = Placement(phy2log=np.tile(np.arange(8), (24, 1)), num_gpus=2, num_experts=8)
    placement.save(src)
    # gpt-oss-20b has 24 layers as here but 32 experts, not 8.
    assert run(["export", str(src), "--format", "sglang", "--model", "gpt-oss-20b",
                "-o", str(tmp_path / "s.json")]) == 2
    assert "32 experts per layer" in capsys.readouterr().err


def _flag_values(command: str) -> dict[str, str]:
    """``--flag value`` pairs of a printed command (``--flag`` alone maps to '')."""
    words = command.split()
    return {word: (words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--")
                   else "") for i, word in enumerate(words) if word.startswith("--")}


def test_sglang_launch_command_on_one_node():
    from moetuner.export import launch_commands

    (command,) = launch_commands(example(), "sglang", "p.json", model_path="org/model")
    assert command.startswith("python -m sglang.launch_server --model-path org/model ")
    flags = _flag_values(command)
    # EP over both GPUs: SGLang needs ep_size x moe_dp_size = tp_size; DP attention per GPU.
    assert {k: flags[k] for k in ("--tp-size", "--attn-dp-size", "--ep-size",
                                  "--ep-num-redundant-experts", "--init-expert-location",
                                  "--ep-dispatch-algorithm", "--moe-a2a-backend")} == {
        "--tp-size": "2", "--attn-dp-size": "2", "--ep-size": "2",
        "--ep-num-redundant-experts": "2", "--init-expert-location": "p.json",
        "--ep-dispatch-algorithm": "static", "--moe-a2a-backend": "deepep"}
    assert not {"--nnodes", "--node-rank", "--dist-init-addr", "--enable-eplb"} & set(flags)


def test_sglang_launch_commands_on_two_nodes():
    from moetuner.export import launch_commands

    placement = Placement(np.tile(np.arange(8), (2, 1)), 4, 8)
    commands = launch_commands(placement, "sglang", "p.json", num_nodes=2)
    assert len(commands) == 2
    for rank, command in enumerate(commands):
        flags = _flag_values(command)
        assert flags["--nnodes"] == "2" and flags["--node-rank"] == str(rank)
        assert flags["--dist-init-addr"] == "NODE0_ADDR:20000"
        assert flags["--tp-size"] == flags["--ep-size"] == flags["--attn-dp-size"] == "4"
    with pytest.raises(InputError, match="divisor of the 4 GPUs"):
        launch_commands(placement, "sglang", "p.json", num_nodes=3)


@pytest.mark.parametrize("fmt", ["vllm", "vllm-ascend"])
def test_vllm_launch_commands_give_the_placements_ep_ranks(fmt):
    from moetuner.export import launch_commands

    placement = Placement(np.tile(np.arange(8), (2, 1)), 4, 8)
    (single,) = launch_commands(placement, fmt, "p.json", model_path="org/model")
    flags = _flag_values(single)
    assert single.startswith("vllm serve org/model ")
    # vLLM's EP size is DP x TP with --enable-expert-parallel.
    assert int(flags["--data-parallel-size"]) * int(flags["--tensor-parallel-size"]) == 4
    assert "--enable-expert-parallel" in flags and "--headless" not in flags
    head, other = launch_commands(placement, fmt, "p.json", num_nodes=2)
    head, other = _flag_values(head), _flag_values(other)
    assert head["--data-parallel-size"] == other["--data-parallel-size"] == "4"
    assert head["--data-parallel-size-local"] == other["--data-parallel-size-local"] == "2"
    assert head["--data-parallel-address"] == other["--data-parallel-address"] == "NODE0_ADDR"
    assert head["--data-parallel-rpc-port"] == other["--data-parallel-rpc-port"]
    assert "--headless" not in head and "--data-parallel-start-rank" not in head
    assert "--headless" in other and other["--data-parallel-start-rank"] == "2"


def test_cli_export_prints_one_command_per_node_of_the_placements_cluster(tmp_path, capsys):
    from moetuner.cluster import make_cluster

    src = tmp_path / "place.json"
    Placement(np.tile(np.arange(8), (2, 1)), 4, 8,
              metadata={"cluster": make_cluster(4, 2).to_dict()}).save(src)
    out = tmp_path / "sg.json"
    assert run(["export", str(src), "--format", "sglang", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "# node 0\npython -m sglang.launch_server" in printed
    assert "# node 1\npython -m sglang.launch_server" in printed
    assert "--node-rank 1 --dist-init-addr NODE0_ADDR:20000" in printed
    # --nodes overrides the placement's cluster.
    assert run(["export", str(src), "--format", "sglang", "--nodes", "1", "-o",
                str(tmp_path / "one.json")]) == 0
    assert "--nnodes" not in capsys.readouterr().out


def test_cli_export_sglang_without_model_uses_the_preset_of_the_shape(tmp_path, capsys):
    # A DeepSeek-V3-shaped placement (58 MoE layers x 256 experts): SGLang's axis has 61 rows.
    spec = get_model("deepseek-v3")
    src = tmp_path / "dsv3.json"
    Placement(np.tile(np.arange(256), (58, 1)), 8, 256).save(src)
    out = tmp_path / "sg.json"
    assert run(["export", str(src), "--format", "sglang", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())["physical_to_logical_map"]
    assert len(rows) == spec.num_hidden_layers == 61
    assert "deepseek-v3" in printed and "61 hidden layers (dense: 0, 1, 2)" in printed
    assert f"--model-path {spec.hf_id}" in printed
    back = read_sglang(out)
    assert np.array_equal(back.phy2log, np.tile(np.arange(256), (58, 1)))


def test_cli_export_sglang_without_model_says_when_no_preset_matches(tmp_path, capsys):
    src = tmp_path / "place.json"
    example().save(src)
    out = tmp_path / "sg.json"
    assert run(["export", str(src), "--format", "sglang", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert len(json.loads(out.read_text())["physical_to_logical_map"]) == 2
    assert "no model preset has 2 MoE layers x 4 experts" in printed


def test_layer_axis_guess_refuses_an_ambiguous_shape(monkeypatch):
    from moetuner import models

    twin = models.ModelSpec("twin", "x/twin", 62, (0, 1, 2, 3), 256, 8, 7168, 2048)
    monkeypatch.setitem(models.MODELS, "twin", twin)
    with pytest.raises(InputError, match="--model.*deepseek-v3, twin"):
        LayerAxis.guess(58, 256)
