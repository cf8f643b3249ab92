#!/usr/bin/env bash
# The fidelity loop: profile the engine's backend, simulate an experiment with that profile,
# serve the same model with the same scheduler and cache, benchmark it with the same workload,
# and compare (issue "vajra-engine bench and the fidelity loop").
#
#   scripts/calibrate.sh EXPERIMENT MODEL_DIR OUT [BACKEND]      # BACKEND: cpu (default) or cuda
#   VAJRA_CALIBRATE_PROFILE=each|once   (default each)
#
# Steps (release builds of vajra-engine and vajra-sim):
#   1. vajra-engine profile --backend B --model MODEL_DIR --out OUT/profile   (skipped if present)
#   2. vajra-sim run EXPERIMENT -o OUT/sim, its predictor.profile pointed at OUT/profile/<model>
#   3. for every point of the sweep: with `each`, every point after the first is profiled again
#      just before it is served (OUT/profile-<point>, skipped if present) and simulated again with
#      that profile (OUT/sim/<point>), so that the profile and the run it predicts see the machine
#      in the same state (on a shared VM the speed drifts by 5-20 % over tens of minutes, which
#      the step logs of single-profile runs showed as the whole error); `once` uses step 1's
#      profile for every point. Then vajra-engine serve --experiment <point's config.resolved.toml>,
#      vajra-engine bench with the same file → OUT/measured/<point>,
#      (the server logs every step to OUT/steps-<point>.csv),
#      vajra-sim compare --steps → OUT/fidelity/<point>/fidelity.{md,csv}, steps.csv (every
#      logged batch priced by the simulator's predictor) and the overlaid report
#   4. OUT/fidelity.md: every point's headline rows side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
exp=${1:?usage: scripts/calibrate.sh EXPERIMENT MODEL_DIR OUT [cpu|cuda]}
model=${2:?model folder}
out=${3:?output folder}
backend=${4:-cpu}
per_point=${VAJRA_CALIBRATE_PROFILE:-each}
if [[ "$per_point" != each && "$per_point" != once ]]; then
    echo "VAJRA_CALIBRATE_PROFILE must be 'each' or 'once' (got '$per_point')" >&2
    exit 2
fi
features=""
[[ "$backend" == cuda ]] && features="--features cuda"
cargo build --release --locked -q -p vajra-engine $features
cargo build --release --locked -q -p vajra-sim
engine=target/release/vajra-engine
sim=target/release/vajra-sim
mkdir -p "$out"
name=$(basename "$(cd "$model" && pwd)")
if [[ ! -f "$out/profile/$name/mlp.csv" ]]; then
    echo "== 1. profile ($backend)"
    "$engine" profile --backend "$backend" --model "$model" --out "$out/profile"
fi
echo "== 2. simulate (with the profile just measured)"
# A copy of the experiment beside the original (relative paths still resolve), reading OUT's profile.
copy="$(dirname "$exp")/.calibrate-$(basename "$exp")"
prof=$(cd "$out/profile/$name" && pwd)
sed -E "s|^profile = .*|profile = \"$prof\"|" "$exp" > "$copy"
trap 'rm -f "$copy"' EXIT
"$sim" run "$copy" -o "$out/sim" --quiet
if [[ "$per_point" == each ]]; then
    # Points are re-simulated with their own profiles below; a sweep table would mix profiles.
    rm -f "$out/sim/sweep.csv" "$out/sim/sweep.md"
fi
port=$((20000 + RANDOM % 20000))
summary="$out/fidelity.md"
echo "# Fidelity: $(basename "$exp"), $name on the $backend backend ($(date -u +%Y-%m-%d))" > "$summary"
echo >> "$summary"
echo "| point | metric | simulated | measured | error |" >> "$summary"
echo "|---|---|---:|---:|---:|" >> "$summary"
rm -f "$summary.notes" "$summary.profiles"
for point in "$out"/sim/*/; do
    point=${point%/}
    label=$(basename "$point")
    cfg="$point/config.resolved.toml"
    if [[ "$per_point" == each && -n "${profiled_once:-}" ]]; then
        echo "== 3. $label: profile ($backend), simulate"
        if [[ ! -f "$out/profile-$label/$name/mlp.csv" ]]; then
            "$engine" profile --backend "$backend" --model "$model" --out "$out/profile-$label"
        fi
        own=$(cd "$out/profile-$label/$name" && pwd)
        sed -E "s|^profile = .*|profile = \"$own\"|" "$cfg" > "$out/sim-$label.toml"
        "$sim" run "$out/sim-$label.toml" -o "$point" --quiet
        rm "$out/sim-$label.toml"
    fi
    profiled_once=1   # step 1's profile was taken just before the first point
    echo "== 3. $label: serve, bench, compare"
    "$engine" serve --backend "$backend" --model "$model" --experiment "$cfg" --port "$port" \
        --served-model-name "$name" --steps-log "$out/steps-$label.csv" 2> "$out/serve-$label.log" &
    pid=$!
    for _ in $(seq 1 120); do
        grep -q "serving" "$out/serve-$label.log" 2>/dev/null && break
        sleep 0.5
    done
    "$engine" bench --url "http://127.0.0.1:$port" --experiment "$cfg" --model-dir "$model" \
        -o "$out/measured/$label" --quiet
    kill "$pid"; wait "$pid" 2>/dev/null || true
    "$sim" compare "$point" "$out/measured/$label" -o "$out/fidelity/$label" \
        --steps "$out/steps-$label.csv" > /dev/null
    grep -E "^\| (ttft_s p50|ttft_s p90|tpot_s p50|tpot_s p90|e2e_s p50|batches|mean batch size|mean batch time|step time|per-step error p50|outside)" \
        "$out/fidelity/$label/fidelity.md" | sed "s/^| /| $label | /" >> "$summary"
    # compare's warning when the logged batches themselves are mispriced (machine speed drift)
    grep "^> Warning" "$out/fidelity/$label/fidelity.md" | sed "s/^> /> $label: /" >> "$summary.notes" || true
    echo "> $label: simulated with $(grep -E '^profile = ' "$point/config.resolved.toml" | sed -E 's/^profile = //')" >> "$summary.profiles"
done
{ echo; cat "$summary.profiles"; } >> "$summary"
if [[ -s "$summary.notes" ]]; then
    { echo; cat "$summary.notes"; } >> "$summary"
fi
rm -f "$summary.notes" "$summary.profiles"
echo "== 4. $summary"
cat "$summary"
