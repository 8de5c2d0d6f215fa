"""Adapters that let serving engines call moetuner in their own processes.

- ``moetuner.integrations.vllm``: EPLB policy classes with vLLM 0.33's interface for every
  registered method, and a vLLM general plugin that installs one.
- ``moetuner.integrations.sglang``: a function with the signature of SGLang's EPLB
  algorithm entry point (``sglang.srt.eplb.eplb_algorithms.rebalance_experts``).

Neither module imports an engine at import time; each runs where the engine is not installed.
"""
