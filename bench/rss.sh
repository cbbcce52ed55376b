#!/usr/bin/env bash
# Peak RSS of two edgegate binaries side by side: both serve at once, pinned to SERVER_CPU, and
# wrk drives them in turn through the same sets, SECS seconds each (`healthz`, the four cache-hit
# sets, the three fresh sets), each server's VmHWM read after each set. Across runs the kind of
# machine and its kernel change what a binary's pages cost; side by side they do not
# (BENCHMARKS.md, "Peak RSS against the first commit, side by side").
#
# usage: bench/rss.sh BINARY_A BINARY_B
#
# The servers verify the tokens with their keys inline, each on a SQLite file of its own;
# wrk runs on LOAD_CPU (64 connections, loopback only, every run bounded). Each run starts both
# servers afresh. Variables: RUNS (3), SECS (5), ENV_A, ENV_B (extra VAR=value words for one
# server's environment, e.g. ENV_B=MIMALLOC_VERBOSE=1), PORT_A, PORT_B, SERVER_CPU, LOAD_CPU,
# HALT_POLL_NS (bench/lib.sh), FRESH (60000: a fresh set's size). A fresh set that gets an
# answer from the verified-token cache fails the script; a binary that evicts badly can find a
# token again once a run has gone round the set (the first commit needs FRESH=250000). SETS
# (the eight above, in a line) chooses the sets; LARGE (0) writes the set `hs256_large_fresh`
# of that many legacy tokens of 7.9 KiB, for the cache's memory when callers fill their claims
# (`SETS=hs256_large_fresh LARGE=12000`: more than the cache's 10,000 entries).
# RUNS x 2 x 8 x SECS seconds plus start-up: about 5 minutes by default.
# Output: a line per run and server with VmHWM in MiB after each set, then each server's peak
# over the runs (median, min-max).
set -euo pipefail

RUNS=${RUNS:-3}
SECS=${SECS:-5}
PORT_A=${PORT_A:-18881}
PORT_B=${PORT_B:-18882}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
read -r -a SETS <<<"${SETS:-healthz es256_one es256 hs256 rs256 es256_fresh rs256_fresh eddsa_fresh}"

# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
[ $# -eq 2 ] || { echo "usage: bench/rss.sh BINARY_A BINARY_B" >&2; exit 2; }
need_wrk
# Each run starts new servers, so a fresh set can start over: no server has seen its tokens.
make_tokens "$WORK/tokens" 2000 "${FRESH:-60000}" "${LARGE:-0}"
TOK=$WORK/tokens
echo "idle vCPUs: $(halt_poll_setting); servers on CPU $SERVER_CPU, wrk on CPU $LOAD_CPU"
echo "A: $1 ${ENV_A:-}; B: $2 ${ENV_B:-}; $RUNS runs, ${SECS}s a set"
echo "VmHWM in MiB: at start, then after each of: ${SETS[*]}"

hwm_mib() { awk '/^VmHWM/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }

: >"$WORK/peaks.txt"
declare -A port=([A]=$PORT_A [B]=$PORT_B) bin=([A]=$1 [B]=$2) extra=([A]=${ENV_A:-} [B]=${ENV_B:-})
declare -A pid line
for run in $(seq 1 "$RUNS"); do
    for side in A B; do
        SERVER_PORT=${port[$side]} SERVER_ENV=${extra[$side]} \
            start_inline "${bin[$side]}" info "$side$run"
        pid[$side]=$SERVER_PID
        line[$side]="$side run $run: $(hwm_mib "$SERVER_PID")"
    done
    for set in "${SETS[@]}"; do
        target "$set"
        for side in A B; do
            hits=$(cache_hits "${port[$side]}")
            result=$(SERVER_PORT=${port[$side]} \
                drive "$SECS" 64 "$TOK/$TARGET_FILE.txt" 0 "$TARGET_PATH")
            all_answered "$result" "$side, $set" || exit 1
            no_cache_answers "$set" "${port[$side]}" "$hits"
            line[$side]+=" $(hwm_mib "${pid[$side]}")"
        done
    done
    for side in A B; do
        echo "${line[$side]}"
        echo "$side $(hwm_mib "${pid[$side]}")" >>"$WORK/peaks.txt"
    done
    kill "${pid[A]}" "${pid[B]}"
    wait "${pid[A]}" "${pid[B]}" 2>/dev/null || true
    # A cursor goes with its server: the next run's servers have seen no token.
    rm -f "$WORK"/cursor.*
done

python3 - "$WORK/peaks.txt" <<'EOF'
import sys

peaks = {"A": [], "B": []}
for line in open(sys.argv[1]):
    side, mib = line.split()
    peaks[side].append(float(mib))
median = {}
for side, values in peaks.items():
    values.sort()
    median[side] = values[len(values) // 2]
    print(
        f"peak RSS {side}: median {median[side]:.1f} MiB "
        f"({values[0]:.1f}-{values[-1]:.1f}, {len(values)} runs)"
    )
print(f"B/A peak RSS (medians): {median['B'] / median['A']:.3f}")
EOF
