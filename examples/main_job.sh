#!/usr/bin/env bash
# The main job on the shipped GPT-OSS-20B slice: profile -> place -> evaluate -> verdict.
# evaluate ends with the verdict: the placement to deploy per phase and execution model, its
# predicted gain over the engine's default (linear) and over EPLB; it exports the one to
# deploy for SGLang (nothing when none beats the default) and prints the launch command.
# Outputs go to out/ (override with OUT=dir).
set -euo pipefail
cd "$(dirname "$0")/.."
TRACE=data/gpt-oss-20b/slice.npz
OUT=${OUT:-out}
CLUSTER=(--gpus 8 --nodes 2 --gpu h100)

moetuner profile "$TRACE" --select 'seq_dataset=mmlu*' --drop seq_repetition -o "$OUT/mmlu.npz"
moetuner info "$OUT/mmlu.npz"
moetuner place "$OUT/mmlu.npz" "${CLUSTER[@]}" --method moetuner --time-limit 20 \
    -o "$OUT/moetuner.json"
moetuner place "$OUT/mmlu.npz" "${CLUSTER[@]}" --redundant 8 --method eplb -o "$OUT/eplb.json"
# joint: balance and traffic in one objective, 8 replicas, hedged over MMLU subjects (drift).
moetuner place "$TRACE" --select 'seq_dataset=mmlu*' --drop seq_repetition \
    --split-by seq_category "${CLUSTER[@]}" --redundant 8 --method joint --exec return \
    --time-limit 20 -o "$OUT/joint.json"
moetuner evaluate "$OUT/joint.json" "$OUT/moetuner.json" "$OUT/eplb.json" --trace "$TRACE" \
    --select 'seq_dataset=gpqa*' --drop seq_repetition --model gpt-oss-20b "${CLUSTER[@]}" \
    --exec both --export-best "$OUT/sglang.json"
