import numpy as np
import pytest

from moetuner.cluster import make_cluster
from moetuner.errors import InputError
from moetuner.models import MODELS, get_model, model_with_shape


def test_cluster_topology_and_link_cost():
    c = make_cluster(8, 2, "h100")
    assert c.gpus_per_node == 4
    np.testing.assert_array_equal(c.node_of_gpu, [0, 0, 0, 0, 1, 1, 1, 1])
    assert c.bandwidth_ratio == pytest.approx(9.0)
    cost = c.link_cost()
    assert cost[0, 0] == 0 and cost[0, 3] == 1 and cost[0, 4] == pytest.approx(9.0)
    assert make_cluster(4, 1, "h200", inter_bandwidth=25e9).inter_bandwidth == 25e9


@pytest.mark.parametrize("kwargs, field", [
    ({"gpus": 8, "nodes": 3}, "--nodes"),
    ({"gpus": 0}, "--gpus"),
    ({"gpus": 8, "gpu": "tpu"}, "--gpu"),
    ({"gpus": 8, "intra_bandwidth": -1.0}, "--intra-bw"),
])
def test_bad_cluster(kwargs, field):
    with pytest.raises(InputError, match=field):
        make_cluster(**kwargs)


def test_model_presets_match_public_configs():
    v3 = get_model("deepseek-v3")
    assert (v3.num_moe_layers, v3.num_experts, v3.top_k, v3.hidden_size) == (58, 256, 8, 7168)
    assert v3.moe_layers[0] == 3 and v3.moe_layers[-1] == 60
    assert get_model("qwen3-235b-a22b").num_moe_layers == 94
    assert get_model("mixtral-8x7b").expert_params == 3 * 4096 * 14336
    assert get_model("deepseek-v2-lite").num_moe_layers == 26
    oss = get_model("gpt-oss-20b")
    assert (oss.num_moe_layers, oss.num_experts, oss.top_k) == (24, 32, 4)
    assert len(MODELS) == 7
    with pytest.raises(InputError, match="deepseek-v3"):
        get_model("gpt-5")


def test_model_with_shape():
    assert model_with_shape(24, 32, 4).name == "gpt-oss-20b"
    assert model_with_shape(58, 256, 8).name == "deepseek-v3"
    assert model_with_shape(3, 5, 2) is None
