#!/usr/bin/env bash
# Per-kernel times of one decode step on the lent GPU machine, with Nsight Compute (ncu; present
# there, Firecracker runtime). Diagnostic companion of scripts/gpu-check.sh (same .gpu/ carry):
#   scripts/gpu-ncu.sh OUT_DIR [batch ...]
# For each batch size (default 1 32) and each kernel set (v2, v1) it profiles 60 kernel
# launches in the middle of gpu-bench's timed decode steps (Llama-3-8B shape, context 512):
# duration, DRAM throughput (% of peak) and bytes read, one CSV per run, then a summary
# (median per kernel name) in OUT_DIR/ncu-summary.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu-ncu.sh OUT_DIR [batch ...]}
shift
batches=("${@:-1 32}")
[[ $# -eq 0 ]] && batches=(1 32)
mkdir -p "$out"
libs=""
for pat in /usr/local/cuda/lib64 /opt/torch/.venv/lib/python3*/site-packages/nvidia/cu13/lib \
           /usr/local/lib/python3*/dist-packages/nvidia/cu13/lib; do
    for d in $pat; do [[ -e "$d/libnvrtc.so.13" || -e "$d/libcublas.so.13" ]] && libs="$libs:$d"; done
done
export LD_LIBRARY_PATH="${libs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1 || echo /usr/local/cuda/bin/ncu)
for b in "${batches[@]}"; do
    for set in v2 v1; do
        # ~240 weight-fill launches, cuBLAS timing GEMMs, then 3 warm-up steps of ~400 launches.
        VAJRA_CUDA_KERNELS=$set timeout 240 "$ncu" --clock-control none --csv --page raw --print-units base \
            --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum \
            --launch-skip 1800 --launch-count 60 \
            .gpu/vajra-engine gpu-bench --shape Meta-Llama-3-8B --decode-batches "$b" --prefill 64 \
            >"$out/ncu-b$b-$set.csv" 2>"$out/ncu-b$b-$set.err"
        echo "ncu batch $b $set: exit $?"
    done
done
python3 - "$out" <<'PY'
import csv, glob, io, os, statistics, sys
out = sys.argv[1]
lines = ["| run | kernel | launches | median µs | DRAM % peak | MB read |", "|---|---|---:|---:|---:|---:|"]
for f in sorted(glob.glob(os.path.join(out, "ncu-b*.csv"))):
    text = open(f).read()
    start = text.find('"ID"')
    if start < 0:
        lines.append(f"| {os.path.basename(f)} | (no ncu rows) | | | | |")
        continue
    rows = list(csv.DictReader(io.StringIO(text[start:])))[1:]  # second row holds units
    by = {}
    for r in rows:
        by.setdefault(r["Kernel Name"][:60], []).append(r)
    num = lambda v: float(v.replace(",", ""))
    for name, rs in sorted(by.items(), key=lambda kv: -sum(num(r["gpu__time_duration.sum"]) for r in kv[1])):
        med = lambda k: statistics.median(num(r[k]) for r in rs)
        lines.append(f"| {os.path.basename(f)[4:-4]} | `{name}` | {len(rs)} | {med('gpu__time_duration.sum')/1e3:.1f} | "
                     f"{med('dram__throughput.avg.pct_of_peak_sustained_elapsed'):.0f} | {med('dram__bytes_read.sum')/1e6:.1f} |")
open(os.path.join(out, "ncu-summary.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
