#!/usr/bin/env bash
# Regenerates every roofline profile under profiles/generated/ (deterministic: the same code
# writes the same bytes). Usage: scripts/generate-profiles.sh [path/to/vajra-sim]
set -euo pipefail
cd "$(dirname "$0")/.."
SIM=${1:-}
if [[ -z "$SIM" ]]; then
  cargo build --release -p vajra-sim --locked
  SIM=target/release/vajra-sim
fi
for device in h100 h200 a100; do
  for model in meta-llama/Llama-2-7b-hf meta-llama/Meta-Llama-3-8B meta-llama/Meta-Llama-3-70B \
               mistralai/Mistral-7B-v0.1 Qwen/Qwen2-7B; do
    "$SIM" profile generate --device "$device" --model "$model"
  done
done
