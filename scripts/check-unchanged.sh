#!/usr/bin/env bash
# Behaviour guard for refactors: runs the shipped experiments (and the 10k-request speed
# benchmark when the Vidur profiles it reads are present) and compares the hashes of their
# summary.json, requests.csv, sweep.csv and capacity tables with scripts/unchanged.sha256.
#
#   scripts/check-unchanged.sh            # check (release build)
#   scripts/check-unchanged.sh --record   # rewrite scripts/unchanged.sha256 from this tree
#   PROFILE=dev scripts/check-unchanged.sh   # debug build (CI)
#
# A refactor that must not change results runs `--record` on the commit before it and the
# check after it; a change that alters results on purpose re-records and says why.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${PROFILE:-release}
record=0
[[ "${1:-}" == "--record" ]] && record=1
cargo build -q --locked --profile "$profile" -p vajra-sim
dir=$([[ "$profile" == dev ]] && echo debug || echo "$profile")
sim="target/$dir/vajra-sim"
out=target/unchanged
rm -rf "$out" && mkdir -p "$out"
for name in quickstart routing prefix_caching fairness capacity sessions slo_classes disaggregation; do
    "$sim" run "experiments/$name.toml" -o "$out/$name" --quiet --no-trace
done
"$sim" capacity experiments/capacity.toml -o "$out/capacity-search" -j 2 >/dev/null
if [[ -d ../shared/reference/vidur/profiling ]]; then
    "$sim" run benches/experiments/vidur_10k.toml -o "$out/vidur_10k" --quiet --no-trace
else
    echo "NOTE: ../shared/reference is absent: benches/experiments/vidur_10k.toml is not checked"
fi
hashes=$(cd "$out" && find . -name summary.json -o -name requests.csv -o -name sweep.csv \
    -o -name 'capacity.csv' -o -name 'capacity.json' | LC_ALL=C sort | xargs sha256sum)
if [[ $record == 1 ]]; then
    echo "$hashes" >scripts/unchanged.sha256
    echo "recorded $(wc -l <scripts/unchanged.sha256) hashes in scripts/unchanged.sha256"
    exit 0
fi
expected=scripts/unchanged.sha256
if [[ ! -d $out/vidur_10k ]]; then
    expected_filtered=$(grep -v ' ./vidur_10k/' "$expected")
else
    expected_filtered=$(cat "$expected")
fi
if diff <(echo "$expected_filtered") <(echo "$hashes"); then
    echo "unchanged: $(echo "$hashes" | wc -l) files match scripts/unchanged.sha256"
else
    echo "CHANGED: the files above differ from scripts/unchanged.sha256 (< recorded, > now)"
    exit 1
fi
