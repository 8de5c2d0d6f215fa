"""Model specs: the MoE shapes that placement, the cost model and export need.

Figures come from each model's public ``config.json`` on the Hugging Face Hub (fields named
in brackets): hidden layers [num_hidden_layers], dense layers [first_k_dense_replace for
DeepSeek; none for the others], routed experts [num_local_experts / num_experts /
n_routed_experts], top-k [num_experts_per_tok], hidden size [hidden_size], expert
intermediate size [intermediate_size for Mixtral, OLMoE and GPT-OSS; moe_intermediate_size
for Qwen3 and DeepSeek]. Expert weight formats: GPT-OSS ships its experts in MXFP4 (4-bit
values plus one 8-bit scale per 32, 4.25 bits a weight), DeepSeek-V3 in FP8, the rest in BF16.
Total parameters come from each model card (DeepSeek-V3: 671B without its MTP module); the
weights that are not routed experts (attention, embeddings, dense and shared FFNs) are the
total minus the routed experts', in BF16 (FP8 for DeepSeek-V3's linear layers; its BF16
embeddings make that an underestimate of about 1 GB).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moetuner.errors import InputError


@dataclass(frozen=True)
class ModelSpec:
    """Shapes of an MoE model.

    Attributes:
        name: preset name (``--model``).
        hf_id: the Hugging Face repository the figures come from.
        num_hidden_layers: all transformer layers, dense ones included (SGLang's layer axis).
        dense_layers: hidden-layer indices whose FFN is dense (no experts).
        num_experts: routed experts per MoE layer (E).
        top_k: experts per token (k).
        hidden_size: model width (the size of a token's activation).
        expert_intermediate_size: one expert's FFN inner width.
        expert_bytes_per_param: bytes per expert weight (2 for BF16, 1 for FP8, 0.53125 MXFP4).
        activation_bytes: bytes per activation element sent in all-to-all (BF16 = 2).
        num_shared_experts: always-active experts (not placed; informational).
        num_expert_groups: expert groups of group-limited routing [n_group; 1 for models
            without it]; the engines pass it to EPLB as ``num_groups`` (8 for DeepSeek-V3
            selects EPLB's hierarchical policy).
        total_params: all weights of the model (model card), 0 when unknown.
        other_bytes_per_param: bytes per weight of everything but the routed experts.
    """

    name: str
    hf_id: str
    num_hidden_layers: int
    dense_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    hidden_size: int
    expert_intermediate_size: int
    expert_bytes_per_param: float = 2.0
    activation_bytes: float = 2.0
    num_shared_experts: int = 0
    num_expert_groups: int = 1
    total_params: float = 0.0
    other_bytes_per_param: float = 2.0

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Hidden-layer indices of the MoE layers, in order."""
        return tuple(i for i in range(self.num_hidden_layers) if i not in self.dense_layers)

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def expert_params(self) -> int:
        """Weights of one expert: gate, up and down projections (3 x hidden x intermediate)."""
        return 3 * self.hidden_size * self.expert_intermediate_size

    @property
    def expert_weight_bytes(self) -> float:
        return self.expert_params * self.expert_bytes_per_param

    @property
    def other_weight_bytes(self) -> float:
        """Bytes of the weights that are not routed experts (attention, embeddings, dense and
        shared FFNs): every GPU holds them all under data-parallel attention; 0 when the
        total is unknown."""
        routed = self.num_moe_layers * self.num_experts * self.expert_params
        return max(self.total_params - routed, 0.0) * self.other_bytes_per_param

    @property
    def token_bytes(self) -> float:
        """Bytes of one token's activation moved by dispatch or combine."""
        return self.hidden_size * self.activation_bytes

    def to_dict(self) -> dict:
        return asdict(self)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec("gpt-oss-20b", "openai/gpt-oss-20b", 24, (), 32, 4, 2880, 2880,
                  expert_bytes_per_param=4.25 / 8, total_params=20.91e9),
        ModelSpec("deepseek-v2-lite", "deepseek-ai/DeepSeek-V2-Lite", 27, (0,), 64, 6, 2048,
                  1408, num_shared_experts=2, total_params=15.7e9),
        ModelSpec("mixtral-8x7b", "mistralai/Mixtral-8x7B-v0.1", 32, (), 8, 2, 4096, 14336,
                  total_params=46.7e9),
        ModelSpec("olmoe-1b-7b", "allenai/OLMoE-1B-7B-0924", 16, (), 64, 8, 2048, 1024,
                  total_params=6.9e9),
        ModelSpec("qwen3-30b-a3b", "Qwen/Qwen3-30B-A3B", 48, (), 128, 8, 2048, 768,
                  total_params=30.5e9),
        ModelSpec("qwen3-235b-a22b", "Qwen/Qwen3-235B-A22B", 94, (), 128, 8, 4096, 1536,
                  total_params=235e9),
        ModelSpec("deepseek-v3", "deepseek-ai/DeepSeek-V3", 61, (0, 1, 2), 256, 8, 7168, 2048,
                  expert_bytes_per_param=1.0, num_shared_experts=1, num_expert_groups=8,
                  total_params=671e9, other_bytes_per_param=1.0),
    ]
}


def get_model(name: str) -> ModelSpec:
    """The preset called ``name``; an ``InputError`` listing the presets otherwise."""
    try:
        return MODELS[name]
    except KeyError:
        raise InputError("--model", "name", f"one of {', '.join(MODELS)}", repr(name)) from None


def model_with_shape(num_layers: int, num_experts: int, top_k: int | None) -> ModelSpec | None:
    """The first preset with these MoE layers, experts and k (any k when None), or None."""
    for model in MODELS.values():
        if (model.num_moe_layers, model.num_experts) == (num_layers, num_experts) \
                and top_k in (None, model.top_k):
            return model
    return None


def models_with_moe_shape(num_moe_layers: int, num_experts: int) -> list[ModelSpec]:
    """The presets with this many MoE layers and routed experts per layer (any k)."""
    return [model for model in MODELS.values()
            if (model.num_moe_layers, model.num_experts) == (num_moe_layers, num_experts)]


def expert_memory_per_gpu(model: ModelSpec, slots_per_gpu: int, num_moe_layers: int) -> float:
    """Bytes of expert weights on each GPU: slots per GPU x MoE layers x one expert's bytes."""
    return slots_per_gpu * num_moe_layers * model.expert_weight_bytes


def memory_warning(model: ModelSpec, expert_bytes: float, gpu_name: str,
                   gpu_memory_bytes: float) -> str | None:
    """A line saying the weights do not fit when ``expert_bytes`` of experts plus the model's
    other weights exceed one GPU's memory (no room left for the KV cache); None when
    they fit."""
    total = expert_bytes + model.other_weight_bytes
    if total <= gpu_memory_bytes:
        return None
    return (f"{expert_bytes / 1e9:.1f} GB of expert weights + {model.other_weight_bytes / 1e9:.1f}"
            f" GB of {model.name}'s other weights per GPU exceed the {gpu_name}'s "
            f"{gpu_memory_bytes / 1e9:.0f} GB (no room for the KV cache)")
