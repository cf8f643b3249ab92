#!/usr/bin/env bash
# Side-by-side speed of vajra-sim and inference-lab 1.0.0 on the same 10,000-request list
# (docs/peers.md). Needs `cargo install inference-lab --version 1.0.0 --locked`
# (binary on PATH or INFERENCE_LAB=path). Usage: benches/peers/run.sh [repetitions]
set -euo pipefail
cd "$(dirname "$0")"
REPS=${1:-5}
IL=${INFERENCE_LAB:-$(command -v inference-lab || echo /tmp/il/bin/inference-lab)}
SIM=../../target/release/vajra-sim
(cd ../.. && cargo build --release -p vajra-sim --locked -q)
mkdir -p /tmp/vajra-peers
$SIM trace generate --workload vidur_10k_wl.toml --seed 42 -o /tmp/vajra-peers/req_10k.csv >/dev/null
python3 mk_sessions.py /tmp/vajra-peers/req_10k.csv /tmp/vajra-peers/il_sessions_10k.jsonl
t() { /usr/bin/time -f "%e s wall, %U+%S s CPU, %M KiB" "$@" 2>&1 >/dev/null | tail -1; }
for i in $(seq "$REPS"); do
  echo "rep $i"
  echo "  inference-lab            : $(t "$IL" --config il_llama2_7b_h100_r4.toml --workload il_wl_10k.toml --quiet --no-color --output /tmp/vajra-peers/il.json --request-csv /tmp/vajra-peers/il_requests.csv)"
  echo "  vajra-sim, every output  : $(t $SIM run vidur_10k_replay.toml -o /tmp/vajra-peers/vajra --quiet --overwrite)"
  echo "  vajra-sim, no trace.json : $(t $SIM run vidur_10k_replay.toml -o /tmp/vajra-peers/vajra-nt --quiet --no-trace --overwrite)"
done
