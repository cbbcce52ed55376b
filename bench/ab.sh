#!/usr/bin/env bash
# Side-by-side wall clock of several edgegate binaries: each round starts each binary in turn
# (server on SERVER_CPU, wrk on LOAD_CPU, same tokens, JWKS inline) and drives the SCENARIOS,
# DURATION seconds each, so that the machine's load falls on all binaries alike: /healthz, one
# repeated ES256 token (cache hit), fresh ES256 tokens, and on request fresh RS256 and EdDSA
# tokens (60,000 a set, more than the verified-token cache holds; an answer from it fails the
# script). Loopback only; every wrk run is bounded. Beside req/s, the server's CPU time a request, user and system apart
# (/proc/PID/stat), which says whether a change moved the process's own work or the kernel's.
#
# usage: bench/ab.sh BINARY[:RUST_LOG] ...     e.g. bench/ab.sh /tmp/edgegate-before target/release/edgegate
# Variables: ROUNDS (3), DURATION (8), CONNECTIONS (64), SCENARIOS ("healthz es256_one
# es256_fresh"; also rs256_fresh, eddsa_fresh), SERVER_PORT, SERVER_CPU, LOAD_CPU, HALT_POLL_NS,
# LOG_SINK (file, or pipe: the server's log through a pipe, as in a container; see bench/lib.sh).
# Output: one tab-separated line per run (round, binary:level, scenario, req/s, load average,
# user and system CPU µs a request, wrk's RESULT line), then medians per binary and scenario.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8}
CONNECTIONS=${CONNECTIONS:-64}
SCENARIOS=${SCENARIOS:-healthz es256_one es256_fresh}
SERVER_PORT=${SERVER_PORT:-18831}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}

# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
[ $# -gt 0 ] || { echo "usage: bench/ab.sh BINARY[:RUST_LOG] ..." >&2; exit 2; }
need_wrk

make_tokens "$WORK/tokens" 1 60000
TOK=$WORK/tokens
OUT=$WORK/ab.tsv
: >"$OUT"

for round in $(seq 1 "$ROUNDS"); do
    for spec in "$@"; do
        bin=${spec%%:*}
        level=info
        [ "$spec" = "$bin" ] || level=${spec#*:}
        start_inline "$bin" "$level"
        pid=$SERVER_PID
        drive 2 "$CONNECTIONS" "$TOK/es256_one.txt" >/dev/null
        for scenario in $SCENARIOS; do
            case $scenario in
            healthz) file=es256_one path=/healthz ;;
            es256_one | es256_fresh | rs256_fresh | eddsa_fresh) file=$scenario path=/functions/v1/jwt-test ;;
            *) echo "unknown scenario $scenario" >&2 && exit 2 ;;
            esac
            hits=$(cache_hits "$SERVER_PORT")
            user0=$(cpu_ticks "$pid" 14)
            system0=$(cpu_ticks "$pid" 15)
            result=$(drive "$DURATION" "$CONNECTIONS" "$TOK/$file.txt" 0 "$path")
            user1=$(cpu_ticks "$pid" 14)
            system1=$(cpu_ticks "$pid" 15)
            no_cache_answers "$scenario" "$SERVER_PORT" "$hits"
            requests=$(sed -E 's/.* requests=([0-9]+).*/\1/' <<<"$result")
            duration=$(sed -E 's/.* duration_us=([0-9]+).*/\1/' <<<"$result")
            rps=$(awk -v r="$requests" -v d="$duration" 'BEGIN {printf "%.0f", r / (d / 1e6)}')
            user=$(awk -v a="$user0" -v b="$user1" -v t="$TICK_US" -v r="$requests" \
                'BEGIN {printf "%.2f", (b - a) * t / r}')
            system=$(awk -v a="$system0" -v b="$system1" -v t="$TICK_US" -v r="$requests" \
                'BEGIN {printf "%.2f", (b - a) * t / r}')
            printf '%s\t%s:%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$(basename "$bin")" "$level" \
                "$scenario" "$rps" "$(cut -d' ' -f1 /proc/loadavg)" "$user" "$system" "$result" |
                tee -a "$OUT"
        done
        kill "$pid"
        wait "$pid" 2>/dev/null || true
    done
done
echo
echo "idle vCPUs: $(halt_poll_setting); server log: ${LOG_SINK:-file}"
python3 - "$OUT" <<'PY'
import statistics
import sys
from collections import defaultdict

runs = defaultdict(list)
for line in open(sys.argv[1]):
    _round, binary, scenario, rps, _load, user, system = line.split("\t")[:7]
    runs[(binary, scenario)].append((int(rps), float(user), float(system)))
print("| binary | scenario | req/s median (runs) | user µs a request | system µs a request |")
print("|---|---|---|---|---|")
for (binary, scenario), values in runs.items():
    rps = [v[0] for v in values]
    user = statistics.median(v[1] for v in values)
    system = statistics.median(v[2] for v in values)
    print(
        f"| {binary} | {scenario} | {statistics.median(rps):.0f} ({', '.join(map(str, rps))})"
        f" | {user:.1f} | {system:.1f} |"
    )
PY
