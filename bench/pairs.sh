#!/usr/bin/env bash
# A cache hit's share of the `/healthz` floor, from many short runs in pairs: each pair is one
# `/healthz` run and one run of the scenario, SECS seconds each, back to back on the same server,
# the order swapped every other pair so that a steady drift weighs on both sides alike. The
# share is the median of the pairs' ratios, with its quartiles.
#
# usage: bench/pairs.sh [EDGEGATE_BIN]    (default: target/release/edgegate, built here)
#
# Why: this kind of machine changes pace from one second to the next (one-second `/healthz`
# runs back to back: 75,000-110,000 req/s), so a `bench/load.sh` run, which compares one
# floor run with one scenario run up to minutes apart, gave the same binary's hits 65-90 % of
# the floor (BENCHMARKS.md, "twelfth pass"). Thirty pairs of one second put the median within
# a few points of where another thirty put it.
#
# The server runs on SERVER_CPU with the tokens' keys inline, wrk on LOAD_CPU (CONNECTIONS
# connections, loopback only). Scenarios (bench/load.sh's cache-hit sets): es256 (2,000
# distinct ES256 tokens, cycled), es256_one (one, repeated), hs256, rs256 (2,000 each); each is
# sent for 2 s before the pairs, so that every token is in the verified-token cache.
# Variables: PAIRS (30), SECS (1), SCENARIOS ("es256 es256_one hs256 rs256"), CONNECTIONS (64),
# SERVER_PORT, SERVER_CPU, LOAD_CPU, HALT_POLL_NS, LOG_SINK (bench/lib.sh), OUT (a file for
# the pairs as "pair scenario healthz_requests scenario_requests" lines; default: scratch).
# Runs PAIRS x (scenarios) x 2 x SECS seconds, plus start-up: about 4.5 min by default.
set -euo pipefail

PAIRS=${PAIRS:-30}
SECS=${SECS:-1}
SCENARIOS=${SCENARIOS:-es256 es256_one hs256 rs256}
CONNECTIONS=${CONNECTIONS:-64}
SERVER_PORT=${SERVER_PORT:-18848}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}

# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
OUT=${OUT:-$WORK/pairs.txt}
log() { printf '%s\n' "$*" >&2; }

need_wrk
server_bin "$@"
make_tokens "$WORK/tokens" 2000 1
TOK=$WORK/tokens
start_inline "$BIN"
echo "idle vCPUs: $(halt_poll_setting); server on CPU $SERVER_CPU, wrk on CPU $LOAD_CPU"
echo "$PAIRS pairs of ${SECS}s runs a scenario, $CONNECTIONS connections"
for scenario in $SCENARIOS; do
    drive 2 "$CONNECTIONS" "$TOK/$scenario.txt" >/dev/null
done

requests() { # scenario: requests answered in SECS seconds (/healthz for "healthz")
    local result
    if [ "$1" = healthz ]; then
        result=$(drive "$SECS" "$CONNECTIONS" "$TOK/es256_one.txt" 0 /healthz)
    else
        result=$(drive "$SECS" "$CONNECTIONS" "$TOK/$1.txt")
    fi
    all_answered "$result" "$1" || exit 1
    field "$result" requests
}

: >"$OUT"
for pair in $(seq 1 "$PAIRS"); do
    for scenario in $SCENARIOS; do
        if [ $((pair % 2)) = 1 ]; then
            floor=$(requests healthz)
            rate=$(requests "$scenario")
        else
            rate=$(requests "$scenario")
            floor=$(requests healthz)
        fi
        echo "$pair $scenario $floor $rate" >>"$OUT"
    done
done

python3 - "$OUT" <<'EOF'
import statistics
import sys
from collections import defaultdict

ratios = defaultdict(list)
floors = []
for line in open(sys.argv[1]):
    _, scenario, floor, rate = line.split()
    ratios[scenario].append(int(rate) / int(floor))
    floors.append(int(floor))
floors.sort()
print(f"/healthz runs: {len(floors)}, requests a run {floors[0]}-{floors[-1]} (median {statistics.median(floors):.0f})")
print("| scenario | pairs | share of /healthz: median | quartiles | min-max |")
print("|---|---|---|---|---|")
for scenario, values in ratios.items():
    values.sort()
    n = len(values)
    quartiles = statistics.quantiles(values, n=4) if n > 1 else [values[0]] * 3
    print(
        f"| {scenario} | {n} | {statistics.median(values):.1%} "
        f"| {quartiles[0]:.1%}-{quartiles[2]:.1%} | {values[0]:.1%}-{values[-1]:.1%} |"
    )
EOF
