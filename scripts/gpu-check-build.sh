#!/usr/bin/env bash
# Build, on this (GPU-less) machine, what scripts/gpu-check.sh runs on the lent GPU machine, which
# has CUDA 13 but no cargo: the release engine and the release test binaries of the `cuda`
# feature, copied (stripped) into .gpu/ (ignored by git; pass it to the device tool's `carry`).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu && mkdir -p .gpu
cargo build --release --locked -p vajra-engine --features cuda
cp target/release/vajra-engine .gpu/vajra-engine
# The test binaries: the fidelity tests (CPU test bodies on the CUDA backend) and the library's
# unit tests (NVRTC compilation of every kernel).
cargo test --release --locked -p vajra-engine --features cuda --no-run --message-format=json 2>/dev/null \
  | python3 -c '
import json, sys, shutil
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable") or not m["profile"]["test"]:
        continue
    name = m["target"]["name"]
    kind = m["target"]["kind"][0]
    if (name, kind) in (("fidelity", "test"), ("vajra_engine", "lib")):
        shutil.copy(m["executable"], ".gpu/test-" + name)
'
strip .gpu/* 2>/dev/null || true
ls -la .gpu
du -sh .gpu
