#!/usr/bin/env bash
# Two edgegate binaries side by side in many short alternating runs: both serve at once, pinned
# to SERVER_CPU (the one not driven sits idle), and wrk drives them in turn, SECS seconds each,
# the order swapped every other pair. For a change of a few per cent, which bench/ab.sh's
# rounds (each binary started in turn, seconds to minutes apart) cannot resolve on these
# machines: their pace moves by a fifth from one second to the next, and here it moves for
# both binaries within the same two seconds (BENCHMARKS.md, "thirteenth pass").
#
# usage: bench/ab_pairs.sh BINARY_A BINARY_B
#
# The servers verify the tokens with their keys inline, each on a SQLite file of its own;
# wrk runs on LOAD_CPU (CONNECTIONS connections, loopback only, every run bounded).
# Variables: PAIRS (60), SECS (1), SCENARIO (healthz; a cache-hit set of bench/pairs.sh:
# es256_one, es256, hs256, rs256; or a fresh set of bench/load.sh: es256_fresh, rs256_fresh,
# eddsa_fresh, or hs256_fresh (legacy-secret tokens; not in load.sh's default scenarios),
# 60,000 tokens, each gone from the verified-token cache before it comes round
# again: the runs go on through the set (bench/lib.sh `drive`), and any answer from the cache
# fails the script), FRESH (60000: a fresh set's size; one that none of the runs comes round,
# PAIRS x SECS x the rate, leaves no token to be found in any cache, even one that evicts
# badly), SCENARIO_B (SCENARIO: B's set, when it is not A's; with one binary as A and B and
# `healthz` as A's set, a set and the floor are measured in the same seconds, and a hit set's
# rate against A's is the share of the floor that bench/load.sh reports), CONNECTIONS (64),
# PORT_A, PORT_B, SERVER_CPU, LOAD_CPU, HALT_POLL_NS (bench/lib.sh).
# Output: B's rate against A's as the median of the pairs' ratios with quartiles, how many
# pairs B won, B's CPU µs a request against A's likewise, and each binary's CPU µs a request
# (user + system, /proc/PID/stat) over all its runs, for the whole and for each half of the
# pairs. Run it with the same binary twice to see how far apart two equal binaries come out.
# PAIRS x 2 x SECS seconds: 2 minutes by default.
set -euo pipefail

PAIRS=${PAIRS:-60}
SECS=${SECS:-1}
SCENARIO=${SCENARIO:-healthz}
CONNECTIONS=${CONNECTIONS:-64}
PORT_A=${PORT_A:-18871}
PORT_B=${PORT_B:-18872}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}

# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
[ $# -eq 2 ] || { echo "usage: bench/ab_pairs.sh BINARY_A BINARY_B" >&2; exit 2; }
need_wrk
SCENARIO_B=${SCENARIO_B:-$SCENARIO}
fresh=1
case "$SCENARIO $SCENARIO_B" in *_fresh*) fresh=${FRESH:-60000} ;; esac
make_tokens "$WORK/tokens" 2000 "$fresh"
TOK=$WORK/tokens
target "$SCENARIO"
file_a=$TARGET_FILE path_a=$TARGET_PATH
target "$SCENARIO_B"
file_b=$TARGET_FILE path_b=$TARGET_PATH

SERVER_PORT=$PORT_A start_inline "$1" info a
PID_A=$SERVER_PID
SERVER_PORT=$PORT_B start_inline "$2" info b
PID_B=$SERVER_PID
echo "idle vCPUs: $(halt_poll_setting); servers on CPU $SERVER_CPU, wrk on CPU $LOAD_CPU"
echo "A: $1 ($SCENARIO); B: $2 ($SCENARIO_B); $PAIRS pairs of ${SECS}s runs, $CONNECTIONS connections"

run() { # PORT PID TOKEN_FILE PATH: prints "requests CPU-ticks" for one run
    local before result after
    before=$(($(cpu_ticks "$2" 14) + $(cpu_ticks "$2" 15)))
    result=$(SERVER_PORT=$1 drive "$SECS" "$CONNECTIONS" "$TOK/$3.txt" 0 "$4")
    after=$(($(cpu_ticks "$2" 14) + $(cpu_ticks "$2" 15)))
    all_answered "$result" "port $1" || exit 1
    echo "$(field "$result" requests) $((after - before))"
}

# Warm-up: each server answers the set for 2 s (a cache-hit set is then in its cache).
SERVER_PORT=$PORT_A drive 2 "$CONNECTIONS" "$TOK/$file_a.txt" 0 "$path_a" >/dev/null
SERVER_PORT=$PORT_B drive 2 "$CONNECTIONS" "$TOK/$file_b.txt" 0 "$path_b" >/dev/null
hits_a=$(cache_hits "$PORT_A") hits_b=$(cache_hits "$PORT_B")
: >"$WORK/pairs.txt"
for pair in $(seq 1 "$PAIRS"); do
    if [ $((pair % 2)) = 1 ]; then
        a=$(run "$PORT_A" "$PID_A" "$file_a" "$path_a")
        b=$(run "$PORT_B" "$PID_B" "$file_b" "$path_b")
    else
        b=$(run "$PORT_B" "$PID_B" "$file_b" "$path_b")
        a=$(run "$PORT_A" "$PID_A" "$file_a" "$path_a")
    fi
    echo "$a $b" >>"$WORK/pairs.txt"
done

no_cache_answers "$SCENARIO" "$PORT_A" "$hits_a"
no_cache_answers "$SCENARIO_B" "$PORT_B" "$hits_b"

python3 - "$WORK/pairs.txt" "$TICK_US" <<'EOF'
import sys

rows = [[int(x) for x in line.split()] for line in open(sys.argv[1])]
tick_us = int(sys.argv[2])
ratios = sorted(b / a for a, _, b, _ in rows)
n = len(ratios)
print(
    f"B/A req/s: median {ratios[n // 2]:.3f} (quartiles {ratios[n // 4]:.3f}-"
    f"{ratios[3 * n // 4]:.3f}); B answered more in {sum(r > 1 for r in ratios)} of {n} pairs"
)


def cpu_us(part, at):
    return sum(r[at + 1] for r in part) * tick_us / sum(r[at] for r in part)


costs = sorted((bt / b) / (at / a) for a, at, b, bt in rows if a and b and at)
print(
    f"B/A CPU us a request: median {costs[n // 2]:.3f} (quartiles {costs[n // 4]:.3f}-"
    f"{costs[3 * n // 4]:.3f}), pair by pair ({tick_us} us ticks)"
)
for name, part in (("all pairs", rows), ("first half", rows[: n // 2]), ("second half", rows[n // 2 :])):
    print(f"CPU us a request, {name}: A {cpu_us(part, 0):.2f}, B {cpu_us(part, 2):.2f}")
EOF
