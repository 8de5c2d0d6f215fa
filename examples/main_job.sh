#!/usr/bin/env bash
# The main job on the shipped GPT-OSS-20B slice: profile -> place -> evaluate -> verdict, per
# phase (prefill and decode often run on separate clusters, each with its own placement).
# evaluate replays the held-out GPQA requests at serving scale (decode: 128 tokens per GPU on
# DeepEP low-latency kernels; prefill: 4,096 per GPU on DeepEP normal kernels) and ends with
# the verdict: the placement to deploy, its predicted gain over the engine's default (linear)
# and over EPLB; it exports that placement for SGLang (nothing when none beats the default)
# and prints the launch command. Outputs go to out/ (override with OUT=dir).
set -euo pipefail
cd "$(dirname "$0")/.."
TRACE=data/gpt-oss-20b/slice.npz
OUT=${OUT:-out}
CLUSTER=(--gpus 8 --nodes 2 --gpu h100)
PROFILED=(--select 'seq_dataset=mmlu*' --drop seq_repetition)
HELD_OUT=(--select 'seq_dataset=gpqa*' --drop seq_repetition)

moetuner profile "$TRACE" "${PROFILED[@]}" -o "$OUT/mmlu.npz"
moetuner info "$OUT/mmlu.npz"
moetuner place "$OUT/mmlu.npz" "${CLUSTER[@]}" --method moetuner --time-limit 10 \
    -o "$OUT/moetuner.json"
moetuner place "$OUT/mmlu.npz" "${CLUSTER[@]}" --redundant 8 --method eplb -o "$OUT/eplb.json"
for phase in decode prefill; do
    # joint: the mean step time of this phase's serving-scale steps, 8 replicas, hedged over
    # mixes of the profiled request kinds (the served workload will differ from the profile).
    moetuner place "$TRACE" "${PROFILED[@]}" "${CLUSTER[@]}" --redundant 8 --method joint \
        --exec return --param phase=$phase --time-limit 20 -o "$OUT/joint-$phase.json"
    moetuner evaluate "$OUT/joint-$phase.json" "$OUT/moetuner.json" "$OUT/eplb.json" \
        --trace "$TRACE" "${HELD_OUT[@]}" --model gpt-oss-20b "${CLUSTER[@]}" --exec return \
        --phase $phase --export-best "$OUT/sglang-$phase.json"
done
