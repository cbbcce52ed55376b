#!/usr/bin/env bash
# System calls a request, by call: which the server makes for each request it answers, and
# how many. On these virtual machines a system call costs a few hundred nanoseconds (0.35-0.47
# µs for getrandom, BENCHMARKS.md, "thirteenth pass"), 3-5 % of a `/healthz` request, so one
# more a request shows here before any wall-clock run can tell.
#
# usage: bench/syscalls.sh [EDGEGATE_BIN]    (default: target/release/edgegate, built here)
#
# The server runs with the tokens' keys inline; for each scenario, after 2 s of warm-up,
# `strace -c -f` is attached to it (all its threads) while wrk drives the scenario for DURATION
# seconds at CONNECTIONS connections (loopback only, bounded), and each call's count is divided
# by the requests answered. strace slows the server many times over, so the rates it prints
# mean nothing; the counts a request are what it is for. Scenarios: healthz, or a token set of
# bench/load.sh (es256_one, es256_fresh, rs256_fresh, ...).
# Variables: SCENARIOS ("healthz es256_one es256_fresh"), DURATION (3), CONNECTIONS (16),
# SERVER_PORT, SERVER_CPU, LOAD_CPU, LOG_SINK (bench/lib.sh).
# Output: per scenario, the requests, then the calls a request by name (those at 0.01 or more).
set -euo pipefail

SCENARIOS=${SCENARIOS:-healthz es256_one es256_fresh}
DURATION=${DURATION:-3}
CONNECTIONS=${CONNECTIONS:-16}
SERVER_PORT=${SERVER_PORT:-18849}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}

# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
need_wrk
if ! command -v strace >/dev/null; then
    log "installing strace"
    apt-get update -qq && apt-get install -y -qq strace >/dev/null
fi
server_bin "$@"
make_tokens "$WORK/tokens" 1 60000
TOK=$WORK/tokens
start_inline "$BIN"

for scenario in $SCENARIOS; do
    target "$scenario"
    file=$TARGET_FILE path=$TARGET_PATH
    drive 2 "$CONNECTIONS" "$TOK/$file.txt" 0 "$path" >/dev/null
    strace -c -f -q -p "$SERVER_PID" -o "$WORK/strace.$scenario.txt" &
    strace_pid=$!
    sleep 0.5 # attached to every thread before the counted requests start
    result=$(drive "$DURATION" "$CONNECTIONS" "$TOK/$file.txt" 0 "$path")
    kill -INT "$strace_pid"
    wait "$strace_pid" || true
    requests=$(field "$result" requests)
    echo "$scenario: $requests requests"
    # strace -c's table: % time, seconds, usecs/call, calls, [errors,] syscall.
    awk -v r="$requests" '
        $1 ~ /^[0-9.]+$/ && NF >= 5 && $NF != "total" {
            per = $4 / r
            if (per >= 0.01) printf "  %-20s %.2f a request\n", $NF, per
            total += $4
        }
        END { printf "  %-20s %.2f a request\n", "(all)", total / r }
    ' "$WORK/strace.$scenario.txt"
done
