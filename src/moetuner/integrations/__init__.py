"""Adapters that let serving engines call moetuner in their own processes.

- ``moetuner.integrations.vllm``: EPLB policy classes with vLLM 0.33's interface for every
  registered method, and a vLLM general plugin that installs one.
- ``moetuner.integrations.sglang``: a function with the signature of SGLang's EPLB
  algorithm entry point (``sglang.srt.eplb.eplb_algorithms.rebalance_experts``).
- ``moetuner.integrations.joint_online``: the ``joint`` policy for online rebalancing (vLLM
  policy class, SGLang-signature function, and the plain callable of ``moetuner evaluate
  --online``), keeping the affinity learned offline and limiting moves per rebalance.

Neither module imports an engine at import time; each runs where the engine is not installed.
"""
