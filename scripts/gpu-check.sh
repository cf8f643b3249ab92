#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (CUDA 13, no cargo). Build first, here:
#   scripts/gpu-check-build.sh            # → .gpu/ (release engine + test binaries, `cuda` feature)
# then on the device (repo root; carry .gpu):
#   scripts/gpu-check.sh "$OUT"
# It runs, in about two minutes on an H100:
#   1. the GPU tests: the CPU backend's fidelity test bodies on the CUDA backend (tiny Llama and
#      Qwen2 against transformers' logits, mixed chunked batches, split-K decode vs the CPU
#      backend, greedy tokens through the engine) and NVRTC compilation of every kernel;
#   2. ptxas -v over the kernels' PTX (registers, spills), when ptxas is on the machine;
#   3. gpu-bench on Meta-Llama-3-8B's shape with random weights: decode at batch 1/8/32/128
#      against the bandwidth floor, prefill at 512/2,048 tokens against a cuBLAS GEMM; with the
#      default (v2) kernels (with a sweep of split-K's aim, 1–8 attention blocks per SM and whole
#      waves of the decode kernel's resident blocks, and
#      sampled decodes at batch 1 and 32 drawn on the device against the host sampler), then with CUDA graphs for decode (VAJRA_CUDA_GRAPHS=on), graphs
#      and timed cuBLASLt projections (VAJRA_CUDA_GEMM=tuned), v2 with two decode stages
#      (VAJRA_CUDA_DECODE_STAGES=2) and v1's kernels (VAJRA_CUDA_KERNELS=v1), appended to
#      gpu-bench.md;
#   4. vajra-engine profile: per-operator times → profile/{mlp,attention,lm_head}.csv.
# Everything lands in OUT_DIR (at most 8 files, as the device tool returns).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu-check.sh OUT_DIR}
mkdir -p "$out"
log="$out/gpu-tests.log"

# The CUDA libraries: the toolkit's, else the PyTorch wheels' (nvidia/cu13/lib).
libs=""
for pat in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-*/lib64 \
           /opt/torch/.venv/lib/python3*/site-packages/nvidia/cu13/lib \
           /usr/local/lib/python3*/dist-packages/nvidia/cu13/lib; do
    for d in $pat; do
        [[ -e "$d/libnvrtc.so.13" || -e "$d/libcublas.so.13" ]] && libs="$libs:$d"
    done
done
export LD_LIBRARY_PATH="${libs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export VAJRA_FIXTURES="$PWD/tests/fixtures" RUST_BACKTRACE=1 VAJRA_DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)" VAJRA_COMMIT="${VAJRA_COMMIT:-unknown}"

{
    echo "== $(date -u) on $(hostname)"; nvidia-smi; echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    echo "== 1. GPU tests"
    VAJRA_PTX_DIR=/tmp/vajra-ptx .gpu/test-vajra_engine --test-threads 1 --nocapture cuda
    echo "exit status (unit tests): $?"
    .gpu/test-fidelity --test-threads 1 --nocapture
    echo "exit status (fidelity tests): $?"
} 2>&1 | tee "$log"

{
    echo "== 2. ptxas -v (sm_90)"
    if command -v ptxas >/dev/null || [[ -x /usr/local/cuda/bin/ptxas ]]; then
        px=$(command -v ptxas || echo /usr/local/cuda/bin/ptxas)
        for f in /tmp/vajra-ptx/*.ptx; do echo "-- $f"; "$px" -arch=sm_90 -v "$f" -o /dev/null 2>&1; done
    else
        echo "no ptxas on this machine"
    fi
} 2>&1 | tee "$out/ptxas.txt"

echo "== 3. gpu-bench (v2 kernels, the default; then with CUDA graphs, graphs + tuned projections, two decode stages and v1's kernels, appended)"
.gpu/vajra-engine gpu-bench --shape Meta-Llama-3-8B --split-sweep 1,2,3,4,6,8,waves --sampled-batches 1,32 --out "$out/gpu-bench.json" 2>&1 | tee "$out/gpu-bench.md"
echo | tee -a "$out/gpu-bench.md"
VAJRA_CUDA_GRAPHS=on .gpu/vajra-engine gpu-bench --shape Meta-Llama-3-8B --decode-batches 1,8,32,128 --prefill 512 --sampled-batches 1,32 --out /tmp/gpu-bench-graphs.json 2>&1 | tee -a "$out/gpu-bench.md"
echo | tee -a "$out/gpu-bench.md"
VAJRA_CUDA_GRAPHS=on VAJRA_CUDA_GEMM=tuned .gpu/vajra-engine gpu-bench --shape Meta-Llama-3-8B --decode-batches 1,8,32,128 --prefill 512 --out /tmp/gpu-bench-tuned.json 2>&1 | tee -a "$out/gpu-bench.md"
echo | tee -a "$out/gpu-bench.md"
VAJRA_CUDA_DECODE_STAGES=2 .gpu/vajra-engine gpu-bench --shape Meta-Llama-3-8B --decode-batches 1,8,32,128 --prefill 512 --out /tmp/gpu-bench-stages2.json 2>&1 | tee -a "$out/gpu-bench.md"
echo | tee -a "$out/gpu-bench.md"
VAJRA_CUDA_KERNELS=v1 .gpu/vajra-engine gpu-bench --shape Meta-Llama-3-8B --out /tmp/gpu-bench-v1.json 2>&1 | tee -a "$out/gpu-bench.md"

echo "== 4. profile"
.gpu/vajra-engine profile --backend cuda --shape Meta-Llama-3-8B --out "$out/profile" 2>&1 | tee -a "$log"
echo "== done $(date -u)" | tee -a "$log"
