#!/usr/bin/env bash
# Where a request's real time goes, symbol by symbol: CPU µs a request per symbol (perf's share
# of the samples x the server's CPU time a request), for each scenario, and for the last two
# scenarios the symbols that differ most. Complements bench/callgrind.sh, which counts
# instructions: an atomic increment or a cache miss is one instruction there, tens or hundreds
# of cycles here (this is how the router's per-request clones were found, BENCHMARKS.md,
# "seventh pass").
#
# usage: bench/profile.sh [EDGEGATE_BIN]    (default: target/release/edgegate, built here)
#
# The server runs on SERVER_CPU with the tokens' keys inline, wrk on LOAD_CPU (64 connections,
# DURATION seconds a scenario after 2 s of warm-up, loopback only); `perf record -e cpu-clock`
# samples the server during each run (cycles are not counted in these virtual machines).
# Scenarios: healthz, or any token set of bench/load.sh (es256_one, es256_fresh, ...).
# Variables: SCENARIOS ("healthz es256_one"), DURATION (6), TOP (25), SERVER_PORT, SERVER_CPU,
# LOAD_CPU, HALT_POLL_NS, LOG_SINK (bench/lib.sh).
set -euo pipefail

SCENARIOS=${SCENARIOS:-healthz es256_one}
DURATION=${DURATION:-6}
TOP=${TOP:-25}
SERVER_PORT=${SERVER_PORT:-18842}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}

# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
start_sampling "$@"
profiles=()
for scenario in $SCENARIOS; do
    sample "$scenario" "$WORK/perf.$scenario.data"
    requests=$SAMPLED_REQUESTS cpu_us=$SAMPLED_CPU_US
    echo "$scenario: $requests requests, $((requests / DURATION)) req/s, $cpu_us CPU µs a request"
    perf report -q -i "$WORK/perf.$scenario.data" --no-children --sort dso,symbol --stdio \
        -g none 2>/dev/null >"$WORK/report.$scenario.txt"
    profiles+=("$scenario" "$cpu_us" "$WORK/report.$scenario.txt")
done

python3 - "$TOP" "${profiles[@]}" <<'EOF'
import collections
import re
import sys

top = int(sys.argv[1])
args = sys.argv[2:]
LINE = re.compile(r"\s*([\d.]+)%\s+(\S+)\s+\[[.k]\]\s+(.*?)(?:\s+-\s+-)?\s*$")


def load(path, cpu_us):
    """µs a request by (object, symbol); a symbol perf lists twice is summed."""
    us = collections.Counter()
    for line in open(path, encoding="utf-8", errors="replace"):
        match = LINE.match(line)
        if match:
            share, dso, symbol = match.groups()
            us[(dso, symbol[:100])] += float(share) * cpu_us / 100
    return us


runs = [(args[i], load(args[i + 2], float(args[i + 1]))) for i in range(0, len(args), 3)]
for name, us in runs:
    print(f"\n{name}: µs a request by symbol, top {top}")
    print("| µs | object | symbol |\n|---|---|---|")
    for (dso, symbol), value in us.most_common(top):
        print(f"| {value:.2f} | {dso} | `{symbol}` |")
if len(runs) >= 2:
    (a, ua), (b, ub) = runs[-2], runs[-1]
    keys = set(ua) | set(ub)
    order = sorted(keys, key=lambda k: -abs(ub[k] - ua[k]))[:top]
    print(f"\n{b} against {a}: the symbols that differ most, µs a request")
    print(f"| {a} | {b} | difference | symbol |\n|---|---|---|---|")
    for key in order:
        print(f"| {ua[key]:.2f} | {ub[key]:.2f} | {ub[key] - ua[key]:+.2f} | `{key[1]}` |")
    for tag in ("kernel", "libc"):
        sa = sum(v for k, v in ua.items() if tag in k[0])
        sb = sum(v for k, v in ub.items() if tag in k[0])
        print(f"{tag}: {sa:.2f} -> {sb:.2f} µs")
EOF
