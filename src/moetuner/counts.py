"""What a replay counts and what the cost model makes of it, step by step.

The types shared by the replay (``moetuner.evaluate``), the cost model
(``moetuner.costmodel``) and the online replay (``moetuner.online``). Imports go one way: this
module imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moetuner.models import ModelSpec


@dataclass(frozen=True)
class Exchange:
    """One all-to-all step of every layer (dispatch or combine).

    Attributes:
        tokens: int ``[L, G, G]`` token moves from GPU (row) to GPU (column), one per token
            and distinct destination GPU whatever the kernel; diagonal 0.
        messages: int ``[4, L, G]`` the kernel's messages (``moetuner.engine``) each GPU
            sends inside its node, receives inside its node, sends across nodes, receives
            across nodes.
    """

    tokens: np.ndarray
    messages: np.ndarray

    @property
    def node_sent(self) -> np.ndarray:
        """int ``[L, G]`` cross-node messages each GPU sends."""
        return self.messages[2]

    @property
    def node_received(self) -> np.ndarray:
        """int ``[L, G]`` cross-node messages each GPU receives."""
        return self.messages[3]

    def __add__(self, other: Exchange) -> Exchange:
        return Exchange(self.tokens + other.tokens, self.messages + other.messages)


@dataclass(frozen=True)
class Replay:
    """What a trace does on a placement under one execution model, replica policy and
    kernel, summed over all its tokens (the per-step figures are in ``StepTimes``).

    Attributes:
        exec_model: ``return`` or ``follow``.
        replica_policy: ``even`` or ``nearest``.
        kernel: the all-to-all kernel whose messages ``dispatch`` and ``combine`` count.
        num_tokens: tokens replayed (T).
        node_of_gpu: int ``[G]`` node of each GPU.
        load: int ``[L, G]`` token-expert pairs computed by each GPU.
        tokens_in: int ``[L, G]`` distinct tokens each GPU computes for.
        active_experts: int ``[L, G]`` slots of each GPU that received at least one token.
        dispatch: tokens sent to the experts' GPUs.
        combine: results sent back (``return``) or to the combining GPU (``follow``).
        moves: int ``[L]`` (token, distinct destination GPU) pairs of dispatch.
        moves_cross_gpu: int ``[L]`` of those, destinations other than the token's GPU.
        moves_cross_node: int ``[L]`` of those, destinations on another node.
        remote_nodes: int ``[L]`` (token, distinct remote node) pairs of dispatch.
    """

    exec_model: str
    replica_policy: str
    kernel: str
    num_tokens: int
    node_of_gpu: np.ndarray
    load: np.ndarray
    tokens_in: np.ndarray
    active_experts: np.ndarray
    dispatch: Exchange
    combine: Exchange
    moves: np.ndarray
    moves_cross_gpu: np.ndarray
    moves_cross_node: np.ndarray
    remote_nodes: np.ndarray

    @property
    def num_layers(self) -> int:
        return int(self.load.shape[0])

    @property
    def num_gpus(self) -> int:
        return int(self.load.shape[1])

    @property
    def imbalance_per_layer(self) -> np.ndarray:
        """``[L]`` max GPU load / mean GPU load (1.0 is perfect; 1.0 for an empty layer)."""
        mean = self.load.mean(axis=1)
        return np.divide(self.load.max(axis=1), mean, out=np.ones_like(mean), where=mean > 0)

    @property
    def imbalance(self) -> float:
        return float(self.imbalance_per_layer.mean())

    @property
    def balancedness(self) -> float:
        """Sum over layers of mean GPU load / sum of max GPU load (1.0 is perfect)."""
        peak = float(self.load.max(axis=1).sum())
        return float(self.load.mean(axis=1).sum()) / peak if peak else 1.0

    @property
    def tokens_received(self) -> np.ndarray:
        """``[L, G]`` tokens each GPU receives from other GPUs in dispatch."""
        return self.dispatch.tokens.sum(axis=1)

    @property
    def traffic(self) -> np.ndarray:
        """``[L, G, G]`` token messages of dispatch and combine together."""
        return self.dispatch.tokens + self.combine.tokens

    @property
    def share_cross_gpu(self) -> float:
        return _share(self.moves_cross_gpu, self.moves)

    @property
    def share_cross_node(self) -> float:
        return _share(self.moves_cross_node, self.moves)

    @property
    def remote_nodes_per_token(self) -> float:
        """Mean distinct remote nodes a token's dispatch reaches per layer."""
        return float(self.remote_nodes.sum()) / max(self.num_tokens * self.num_layers, 1)

    def traffic_bytes(self, model: ModelSpec) -> np.ndarray:
        """``[L, G, G]`` bytes of dispatch and combine (one token activation per message)."""
        return self.traffic * model.token_bytes

    def __add__(self, other: Replay) -> Replay:
        """Two disjoint sets of tokens replayed alike (e.g. the intervals of an online
        replay); a slot counts as active when it is in either."""
        return Replay(exec_model=self.exec_model, replica_policy=self.replica_policy,
                      kernel=self.kernel, num_tokens=self.num_tokens + other.num_tokens,
                      node_of_gpu=self.node_of_gpu, load=self.load + other.load,
                      tokens_in=self.tokens_in + other.tokens_in,
                      active_experts=np.maximum(self.active_experts, other.active_experts),
                      dispatch=self.dispatch + other.dispatch,
                      combine=self.combine + other.combine, moves=self.moves + other.moves,
                      moves_cross_gpu=self.moves_cross_gpu + other.moves_cross_gpu,
                      moves_cross_node=self.moves_cross_node + other.moves_cross_node,
                      remote_nodes=self.remote_nodes + other.remote_nodes)

    def summary(self) -> dict:
        """The scalar metrics, for tables and JSON."""
        return {
            "exec_model": self.exec_model,
            "replica_policy": self.replica_policy,
            "kernel": self.kernel,
            "tokens": self.num_tokens,
            "imbalance": self.imbalance,
            "balancedness": self.balancedness,
            "share_cross_gpu": self.share_cross_gpu,
            "share_cross_node": self.share_cross_node,
            "traffic_tokens": int(self.traffic.sum()),
            "node_messages": int(self.dispatch.node_sent.sum() + self.combine.node_sent.sum()),
            "remote_nodes_per_token": self.remote_nodes_per_token,
        }


def _share(part: np.ndarray, whole: np.ndarray) -> float:
    total = int(whole.sum())
    return int(part.sum()) / total if total else 0.0


@dataclass(frozen=True)
class StepTimes:
    """Predicted MoE time of every engine step (the cost model applied step by step).

    Attributes:
        tokens: int ``[S]`` tokens of each step (for ``--batching none``: the cost model's
            batch of ``tokens_per_gpu_batch x G`` tokens).
        dispatch: float ``[S, L]`` seconds of the dispatch exchange per step and layer.
        compute: float ``[S, L]`` seconds of the step's slowest GPU's expert compute.
        combine: float ``[S, L]`` seconds of the combine exchange.
        peak_load: float ``[S, L]`` token-expert pairs of the step's busiest GPU.
        mean_load: float ``[S, L]`` mean token-expert pairs per GPU in the step.
        batching: how the steps were formed (``moetuner.steps.Steps.description``).
    """

    tokens: np.ndarray
    dispatch: np.ndarray
    compute: np.ndarray
    combine: np.ndarray
    peak_load: np.ndarray
    mean_load: np.ndarray
    batching: str = ""

    @property
    def num_steps(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def step_time(self) -> np.ndarray:
        """``[S]`` seconds of the MoE layers of each step."""
        return (self.dispatch + self.compute + self.combine).sum(axis=1)

    @property
    def total(self) -> float:
        """Seconds of the MoE layers of all steps."""
        return float(self.step_time.sum())

    @property
    def mean_step_time(self) -> float:
        """Mean over the steps that hold tokens."""
        times = self._busy_times()
        return float(times.mean()) if times.size else 0.0

    def step_time_percentile(self, q: float) -> float:
        """The ``q``-th percentile (0-100) of the step times of steps that hold tokens."""
        times = self._busy_times()
        return float(np.percentile(times, q)) if times.size else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Tokens over the seconds of all steps' MoE layers."""
        total = self.total
        return float(self.tokens.sum()) / total if total else float("inf")

    @property
    def step_imbalance(self) -> float:
        """Sum over steps and layers of the busiest GPU's load over the sum of the mean GPU
        load (1.0 is perfect)."""
        mean = float(self.mean_load.sum())
        return float(self.peak_load.sum()) / mean if mean else 1.0

    def _busy_times(self) -> np.ndarray:
        return self.step_time[self.tokens > 0]

    @staticmethod
    def concatenate(parts: list[StepTimes]) -> StepTimes:
        """The steps of ``parts`` one after another."""
        return StepTimes(*(np.concatenate([getattr(p, name) for p in parts])
                           for name in ("tokens", "dispatch", "compute", "combine",
                                        "peak_load", "mean_load")),
                         batching=parts[0].batching)

    def summary(self) -> dict:
        """The scalar figures, for tables and JSON."""
        return {"batching": self.batching, "steps": self.num_steps,
                "mean_step_time_s": self.mean_step_time,
                "p50_step_time_s": self.step_time_percentile(50),
                "p99_step_time_s": self.step_time_percentile(99),
                "tokens_per_s": self.tokens_per_s, "step_imbalance": self.step_imbalance,
                "dispatch_s": float(self.dispatch.sum()), "compute_s": float(self.compute.sum()),
                "combine_s": float(self.combine.sum())}
