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
# HALT_POLL_NS (bench/lib.sh), FRESH (60000: a fresh set's size; a binary that evicts badly
# can find a token again once a run has gone round the set, which fails the script: the first
# commit needs 250000). A fresh set that gets an answer from the verified-token cache fails the
# script. RUNS x 2 x (8 sets x SECS + 2) seconds: about 5 minutes by default.
# Output: a line per run and server with VmHWM in MiB after each set, then each server's peak
# over the runs (median, min-max).
set -euo pipefail

RUNS=${RUNS:-3}
SECS=${SECS:-5}
PORT_A=${PORT_A:-18881}
PORT_B=${PORT_B:-18882}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
SETS=(healthz es256_one es256 hs256 rs256 es256_fresh rs256_fresh eddsa_fresh)

# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
[ $# -eq 2 ] || { echo "usage: bench/rss.sh BINARY_A BINARY_B" >&2; exit 2; }
need_wrk
# Each run starts new servers, so a fresh set can start over: no server has seen its tokens.
make_tokens "$WORK/tokens" 2000 "${FRESH:-60000}"
TOK=$WORK/tokens
echo "idle vCPUs: $(halt_poll_setting); servers on CPU $SERVER_CPU, wrk on CPU $LOAD_CPU"
echo "A: $1 ${ENV_A:-}; B: $2 ${ENV_B:-}; $RUNS runs, ${SECS}s a set"
echo "VmHWM in MiB: at start, then after each of: ${SETS[*]}"

hwm_mib() { awk '/^VmHWM/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }

: >"$WORK/peaks.txt"
for run in $(seq 1 "$RUNS"); do
    SERVER_PORT=$PORT_A SERVER_ENV=${ENV_A:-} start_inline "$1" info "a$run"
    PID_A=$SERVER_PID
    SERVER_PORT=$PORT_B SERVER_ENV=${ENV_B:-} start_inline "$2" info "b$run"
    PID_B=$SERVER_PID
    line_a="A run $run: $(hwm_mib "$PID_A")" line_b="B run $run: $(hwm_mib "$PID_B")"
    for set in "${SETS[@]}"; do
        target "$set"
        for side in A B; do
            if [ $side = A ]; then port=$PORT_A pid=$PID_A; else port=$PORT_B pid=$PID_B; fi
            hits=$(cache_hits "$port")
            result=$(SERVER_PORT=$port drive "$SECS" 64 "$TOK/$TARGET_FILE.txt" 0 "$TARGET_PATH")
            all_answered "$result" "$side, $set" || exit 1
            no_cache_answers "$set" "$port" "$hits"
            if [ $side = A ]; then line_a+=" $(hwm_mib "$pid")"; else line_b+=" $(hwm_mib "$pid")"; fi
        done
    done
    echo "$line_a"
    echo "$line_b"
    echo "A $(hwm_mib "$PID_A")" >>"$WORK/peaks.txt"
    echo "B $(hwm_mib "$PID_B")" >>"$WORK/peaks.txt"
    kill "$PID_A" "$PID_B"
    wait "$PID_A" "$PID_B" 2>/dev/null || true
    # A cursor goes with its server: the next run's servers have seen no token.
    rm -f "$WORK"/cursor.*
done

python3 - "$WORK/peaks.txt" <<'EOF'
import sys

peaks = {}
for line in open(sys.argv[1]):
    side, mib = line.split()
    peaks.setdefault(side, []).append(float(mib))
for side, values in sorted(peaks.items()):
    values.sort()
    print(
        f"peak RSS {side}: median {values[len(values) // 2]:.1f} MiB "
        f"({values[0]:.1f}-{values[-1]:.1f}, {len(values)} runs)"
    )
if "A" in peaks and "B" in peaks:
    a = sorted(peaks["A"])[len(peaks["A"]) // 2]
    b = sorted(peaks["B"])[len(peaks["B"]) // 2]
    print(f"B/A peak RSS (medians): {b / a:.3f}")
EOF
