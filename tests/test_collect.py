import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from moetuner.cli import run  # noqa: E402
from moetuner.collect import collect_trace, find_routers, read_texts  # noqa: E402
from moetuner.errors import InputError  # noqa: E402
from moetuner.trace import load_trace  # noqa: E402

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "and", "ran", "far", "away"]
TEXTS = ["the cat sat on the mat", "a dog ran", "the dog ran far away and sat on a mat"]
COMMON = dict(vocab_size=32, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=64)
# Tiny configs, 4 experts, top-2; DeepSeek-V2's first layer is dense (one MoE layer).
CONFIGS = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=16),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
    "deepseek_v2": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                        first_k_dense_replace=1, n_shared_experts=1, kv_lora_rank=8,
                        q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
                        v_head_dim=8, n_group=1, topk_group=1),
    "deepseek_v3": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                        first_k_dense_replace=0, n_shared_experts=1, kv_lora_rank=8,
                        q_lora_rank=8, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                        head_dim=8, n_group=1, topk_group=1),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2,
                    layer_types=["sliding_attention", "full_attention"], sliding_window=8),
}
MOE_LAYERS = {"deepseek_v2": 1}


def tiny_tokenizer():
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=model, pad_token="[PAD]",
                                                unk_token="[UNK]", eos_token="[EOS]")


def tiny_model(arch):
    config = transformers.AutoConfig.for_model(arch, **{**COMMON, **CONFIGS[arch]})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random routers, so every expert gets picked
        for router in find_routers(model):
            router.weight.normal_()
    return model


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_recorded_trace_equals_router_outputs(arch, tmp_path):
    model, tokenizer = tiny_model(arch), tiny_tokenizer()
    routers = find_routers(model)
    assert len(routers) == MOE_LAYERS.get(arch, 2)
    inputs = [[] for _ in routers]
    hooks = [r.register_forward_pre_hook(lambda m, args, i=i: inputs[i].append(args[0]))
             for i, r in enumerate(routers)]
    trace = collect_trace(model, tokenizer, TEXTS, tmp_path / "t.npz", batch_size=1,
                    decode_tokens=3)
    for hook in hooks:
        hook.remove()
    # Batch 1, no padding: the router inputs, pass after pass, are the trace's tokens.
    expected = []
    for router, seen in zip(routers, inputs, strict=True):
        hidden = torch.cat([h.reshape(-1, router.hidden_dim) for h in seen]).float()
        logits = hidden @ router.weight.float().T
        if getattr(router, "bias", None) is not None:
            logits = logits + router.bias.float()
        expected.append(torch.argsort(logits, dim=1, descending=True)[:, :2].numpy())
    assert np.array_equal(trace.topk_ids, np.stack(expected, axis=1))
    assert (np.diff(trace.topk_weights, axis=2) <= 0).all()
    lengths = [len(t.split()) for t in TEXTS]
    assert trace.seq_lens.tolist() == [n for length in lengths for n in (length, 2)]
    assert trace.seq_labels["seq_phase"].tolist() == ["prefill", "decode"] * 3
    assert trace.seq_labels["seq_request"].tolist() == [0, 0, 1, 1, 2, 2]
    saved = load_trace(tmp_path / "t.npz")
    assert np.array_equal(saved.topk_ids, trace.topk_ids) and saved.num_experts == 4
    assert [p.name for p in tmp_path.iterdir()] == ["t.npz"]   # chunks removed


def test_mixtral_weights_are_renormalised_softmax(tmp_path):
    model, tokenizer = tiny_model("mixtral"), tiny_tokenizer()
    trace = collect_trace(model, tokenizer, TEXTS[:1], tmp_path / "t.npz")
    assert np.allclose(trace.topk_weights.sum(axis=2), 1.0, atol=1e-5)


def test_batching_with_padding_matches_one_by_one(tmp_path):
    model, tokenizer = tiny_model("qwen3_moe"), tiny_tokenizer()
    one = collect_trace(model, tokenizer, TEXTS, tmp_path / "one.npz", batch_size=1)
    batched = collect_trace(model, tokenizer, TEXTS, tmp_path / "all.npz", batch_size=3)
    assert np.array_equal(one.topk_ids, batched.topk_ids)
    assert np.allclose(one.topk_weights, batched.topk_weights, atol=1e-4)


def test_cli_collect_from_local_folder(tmp_path, capsys):
    folder = tmp_path / "model"
    tiny_model("olmoe").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"text": t, "dataset": d}) + "\n"
                            for t, d in zip(TEXTS, ["mmlu", "gsm8k", "mmlu"], strict=True)))
    out = tmp_path / "trace.npz"
    assert run(["collect", "--model", str(folder), "--data", str(data), "-o", str(out),
                "--batch-size", "2", "--device", "cpu"]) == 0
    trace = load_trace(out, select=["seq_dataset=mmlu"])
    assert trace.num_tokens == len(TEXTS[0].split()) + len(TEXTS[2].split())
    assert "recorded" in capsys.readouterr().out


def test_cli_collect_bad_inputs(tmp_path, capsys):
    data = tmp_path / "p.txt"
    data.write_text("the cat\n")
    assert run(["collect", "--model", str(tmp_path / "missing"), "--data", str(data),
                "-o", str(tmp_path / "t.npz")]) == 2
    assert run(["collect", "--model", "x", "--data", str(tmp_path / "none.txt"),
                "-o", str(tmp_path / "t.npz")]) == 2
    assert not (tmp_path / "t.npz").exists()


def test_router_bypassed_is_a_clear_error(tmp_path):
    model, tokenizer = tiny_model("qwen3_moe"), tiny_tokenizer()
    # A fused kernel that never calls the second router: its hook records nothing.
    model.model.layers[1].mlp.forward = lambda hidden: hidden
    with pytest.raises(InputError, match="once per forward pass"):
        collect_trace(model, tokenizer, TEXTS[:1], tmp_path / "t.npz")
    assert not (tmp_path / "t.npz").exists()


def test_read_texts(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first\n\nsecond\n")
    assert read_texts(txt) == (["first", "second"], None)
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "x"}\n{"text": "y"}\n')
    assert read_texts(jsonl) == (["x", "y"], None)
    jsonl.write_text('{"prompt": "x"}\n{"body": "y"}\n')
    with pytest.raises(InputError, match="line 2"):
        read_texts(jsonl)
    with pytest.raises(InputError, match="routers"):
        find_routers(torch.nn.Linear(2, 2))
