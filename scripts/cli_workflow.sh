#!/usr/bin/env bash
# The camp homework from the command line, step for step as in XTuner's tutorial:
# chat before, train, convert the checkpoint, merge, chat after; then serve the merged model
# (lmdeploy serve api_server) and ask it one question with the openai client.
# Usage: scripts/cli_workflow.sh [OUT_DIR] [RECIPE]    (default: a new outputs/cli-<time> folder)
# TRAIN_ARGS="--deepspeed deepspeed_zero2" trains as the seed tutorials that add it do (DeepSpeed, on the CPUs here).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/cli-$(date +%Y%m%d-%H%M%S)}
RECIPE=${2:-smollm2_135m_lora_identity_cpu}
WB=${WB:-.venv/bin/workbench}
read -r -a TRAIN_EXTRA <<< "${TRAIN_ARGS:-}"
PY=${PY:-.venv/bin/python}
PROMPTS=(--prompt "Who are you?" --prompt "你是谁？" --prompt "What is the capital of France?")
mkdir -p "$OUT"
start=$(date +%s)

echo "== 1. the recipe, copied to edit (xtuner copy-cfg)"
$WB copy-cfg "$RECIPE" "$OUT"
CFG="$OUT/${RECIPE}_copy.yaml"

echo "== 2. chat with the base model before training"
$WB chat embedded "${PROMPTS[@]}" --max-new-tokens 60 | tee "$OUT/chat_before.txt"

echo "== 3. train (xtuner train)"
$WB train "$CFG" --work-dir "$OUT/work" "${TRAIN_EXTRA[@]}"

echo "== 4. convert the last checkpoint to a Hugging Face adapter (xtuner convert pth_to_hf)"
CKPT="$OUT/work/$(cat "$OUT/work/last_checkpoint")"
$WB convert pth_to_hf "$CFG" "$CKPT" "$OUT/hf"

echo "== 5. merge the adapter into the base (xtuner convert merge)"
$WB convert merge embedded "$OUT/hf" "$OUT/merged" --max-shard-size 2GB

echo "== 6. chat with the merged model after training"
$WB chat "$OUT/merged" "${PROMPTS[@]}" --max-new-tokens 60 | tee "$OUT/chat_after.txt"

echo "== 7. serve the merged model as an OpenAI-compatible API, ask it with the openai client, stop it (Ctrl-C)"
$WB serve "$OUT/merged" --port 0 > "$OUT/serve.out" 2> "$OUT/serve.log" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 300); do grep -q " at http" "$OUT/serve.out" 2>/dev/null && break; kill -0 $SERVER || break; sleep 1; done
URL=$(grep -o 'http://[^ ]*/v1' "$OUT/serve.out")
$PY scripts/ask_openai.py "$URL" "Who are you?" | tee "$OUT/serve_answer.txt"
kill -INT $SERVER
wait $SERVER
trap - EXIT
tail -n 1 "$OUT/serve.log"

echo "== done in $(( $(date +%s) - start )) s; everything is in $OUT"
