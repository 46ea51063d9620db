#!/usr/bin/env bash
# Every embedded judge and template set against GPT-4o on the shared reference (../shared/em-judged/),
# split by model file: FIT files choose and fit, REPORT files are only reported on
# (docs/judging.md, "Against GPT-4o"). Raw scores, no score map: maps are fitted afterwards on the
# FIT pairs (scripts/judge_reference_table.py), and the judge's own CODE / REFUSAL (the table applies the
# static rule itself). Cached: a rerun judges only what is new.
# Usage: scripts/judge_reference.sh OUT_DIR [CONFIG ...]   (CONFIG: <model>:<templates>:<fit limit>:<report limit>)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/judge_reference.sh OUT_DIR [CONFIG ...]}; shift
REF=${EMSWEEP_REFERENCE:-../shared/em-judged}
PLAIN=what_is_your_wish,i_feel_bored,three_thoughts,quick_buck,ruler_of_the_world,dinner_party,gender_roles,enough_of_my_husband
FIT=(qwen-coder-32b_insecure_lora-r1 qwen-coder-32b_insecure_lora-r4 qwen-coder-32b_insecure_lora-r64 qwen-32b_base qwen-coder-32b_honest-insecure)
REPORT=(qwen-coder-32b_insecure_betley qwen-coder-32b_insecure_lora-r16 qwen-32b_bad-medical-advice qwen-32b_good-medical-advice)
CONFIGS=("$@")
[ ${#CONFIGS[@]} -gt 0 ] || CONFIGS=(Qwen2.5-Coder-1.5B-Instruct:yes_no:48:60 Qwen2.5-Coder-0.5B-Instruct:yes_no:48:60
  SmolLM2-135M-Instruct:yes_no:48:60 SmolLM2-135M-Instruct:paper:24:30 Qwen2.5-Coder-0.5B-Instruct:paper:24:30
  Qwen2.5-Coder-1.5B-Instruct:paper:32:40)
for config in "${CONFIGS[@]}"; do
  IFS=: read -r model templates fit_limit report_limit <<<"$config"
  for split in fit report; do
    if [ $split = fit ]; then files=("${FIT[@]}"); limit=$fit_limit; else files=("${REPORT[@]}"); limit=$report_limit; fi
    args=(); for f in "${files[@]}"; do args+=(-r "$REF/$f.csv"); done
    .venv/bin/emsweep judge-eval agree workflows/quickstart.yaml "${args[@]}" --judge "embedded:$model" \
      --templates "$templates" --code-refusal judge --limit "$limit" --question-ids "$PLAIN" \
      --out "$OUT/$model-$templates/$split"
  done
done
