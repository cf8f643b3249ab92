#!/usr/bin/env bash
# The fidelity loop: profile the engine's backend, simulate an experiment with that profile,
# serve the same model with the same scheduler and cache, benchmark it with the same workload,
# and compare (issue "vajra-engine bench and the fidelity loop").
#
#   scripts/calibrate.sh EXPERIMENT MODEL_DIR OUT [BACKEND]      # BACKEND: cpu (default) or cuda
#   VAJRA_CALIBRATE_PROFILE=serve|each|once                       # default serve
#
# Where each point's profile comes from:
#   serve  the serving process profiles its own backend before it takes requests
#          (`serve --profile-out OUT/profile-<point>`): same process, same weights in memory,
#          the minutes just before the run;
#   each   a separate `vajra-engine profile` just before each point (OUT/profile-<point>;
#          the first point reuses step 1's);
#   once   step 1's profile for every point.
# On this shared VM the engine's speed drifts by 5-20 % over tens of minutes, which in
# single-profile runs was the whole error on the logged batches (benches/results/fidelity-*).
#
# Steps (release builds of vajra-engine and vajra-sim):
#   1. (each, once) vajra-engine profile --backend B --model MODEL_DIR --out OUT/profile
#      (skipped if present)
#   2. vajra-sim run EXPERIMENT -o OUT/sim, its predictor.profile pointed at OUT/profile/<model>
#      (serve: the experiment's own profile, only to lay out the points)
#   3. for every point of the sweep: vajra-engine serve --experiment <point's config.resolved.toml>
#      (serve: with --profile-out), the point simulated again with its own profile (serve,
#      each), vajra-engine bench with the same file → OUT/measured/<point>,
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
mode=${VAJRA_CALIBRATE_PROFILE:-serve}
if [[ "$mode" != serve && "$mode" != each && "$mode" != once ]]; then
    echo "VAJRA_CALIBRATE_PROFILE must be 'serve', 'each' or 'once' (got '$mode')" >&2
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
copy="$(dirname "$exp")/.calibrate-$(basename "$exp")"
trap 'rm -f "$copy"' EXIT
if [[ "$mode" == serve ]]; then
    echo "== 2. lay out the points (every point is simulated again with its server's profile)"
    cp "$exp" "$copy"
else
    if [[ ! -f "$out/profile/$name/mlp.csv" ]]; then
        echo "== 1. profile ($backend)"
        "$engine" profile --backend "$backend" --model "$model" --out "$out/profile"
    fi
    echo "== 2. simulate (with the profile just measured)"
    # A copy of the experiment beside the original (relative paths still resolve), reading
    # OUT's profile.
    prof=$(cd "$out/profile/$name" && pwd)
    sed -E "s|^profile = .*|profile = \"$prof\"|" "$exp" > "$copy"
fi
"$sim" run "$copy" -o "$out/sim" --quiet --overwrite
if [[ "$mode" != once ]]; then
    # Points are simulated again with their own profiles below; a sweep table would mix profiles.
    rm -f "$out/sim/sweep.csv" "$out/sim/sweep.md"
fi
port=$((20000 + RANDOM % 20000))
summary="$out/fidelity.md"
echo "# Fidelity: $(basename "$exp"), $name on the $backend backend ($(date -u +%Y-%m-%d))" > "$summary"
echo >> "$summary"
echo "| point | metric | simulated | measured | error |" >> "$summary"
echo "|---|---|---:|---:|---:|" >> "$summary"
rm -f "$summary.notes" "$summary.profiles"
# A sweep's points are folders of OUT/sim; an experiment without a sweep is one point, OUT/sim.
if [[ -f "$out/sim/summary.json" ]]; then
    points=("$out/sim")
else
    points=("$out"/sim/*/)
fi
for point in "${points[@]}"; do
    point=${point%/}
    label=$(basename "$point")
    cfg="$point/config.resolved.toml"
    own=""
    profile_arg=()
    if [[ "$mode" == serve ]]; then
        own="$out/profile-$label"
        profile_arg=(--profile-out "$own")
    elif [[ "$mode" == each && -n "${profiled_once:-}" ]]; then
        own="$out/profile-$label"
        if [[ ! -f "$own/$name/mlp.csv" ]]; then
            echo "== 3. $label: profile ($backend)"
            "$engine" profile --backend "$backend" --model "$model" --out "$own"
        fi
    fi
    profiled_once=1   # step 1's profile was taken just before the first point
    echo "== 3. $label: serve${profile_arg:+ (profiling first)}, simulate, bench, compare"
    "$engine" serve --backend "$backend" --model "$model" --experiment "$cfg" --port "$port" \
        --served-model-name "$name" --steps-log "$out/steps-$label.csv" "${profile_arg[@]}" \
        2> "$out/serve-$label.log" &
    pid=$!
    # Up to 20 minutes: with --profile-out the server profiles (3-4 minutes on 2 cores) first.
    for _ in $(seq 1 2400); do
        grep -q "serving" "$out/serve-$label.log" 2>/dev/null && break
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "the server exited before serving:" >&2
            cat "$out/serve-$label.log" >&2
            exit 1
        fi
        sleep 0.5
    done
    if [[ -n "$own" ]]; then
        prof=$(cd "$own/$name" && pwd)
        sed -E "s|^profile = .*|profile = \"$prof\"|" "$cfg" > "$out/sim-$label.toml"
        "$sim" run "$out/sim-$label.toml" -o "$point" --quiet --overwrite
        rm "$out/sim-$label.toml"
    fi
    "$engine" bench --url "http://127.0.0.1:$port" --experiment "$cfg" --model-dir "$model" \
        -o "$out/measured/$label" --quiet
    kill "$pid"; wait "$pid" 2>/dev/null || true
    "$sim" compare "$point" "$out/measured/$label" -o "$out/fidelity/$label" \
        --steps "$out/steps-$label.csv" > /dev/null
    grep -E "^\| (ttft_s p50|ttft_s p90|tpot_s p50|tpot_s p90|e2e_s p50|batches|mean batch size|mean batch time|step time|per-step error p50|outside|prefix hit rate)" \
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
