#!/usr/bin/env bash
# The criterion micro-benchmarks (benches/verify.rs), pinned to one core and repeated RUNS
# times; prints each benchmark's median time over the runs, the spread, and the single-core
# rate it implies.
#
# usage: bench/micro.sh            (RUNS=3, CPU=0 by default)
set -euo pipefail

RUNS=${RUNS:-3}
CPU=${CPU:-0}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

cd "$ROOT"
cargo bench --locked --bench verify --no-run --quiet
for run in $(seq 1 "$RUNS"); do
    echo "micro-benchmarks: run $run of $RUNS" >&2
    taskset -c "$CPU" cargo bench --locked --quiet --bench verify -- --noplot >"$OUT/run$run.txt" 2>&1
done
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); benchmarks on CPU $CPU"
python3 - "$OUT"/run*.txt <<'PY'
import re
import statistics
import sys

UNIT = {"ns": 1e-3, "µs": 1.0, "us": 1.0, "ms": 1e3, "s": 1e6}
times = {}
order = []
for path in sys.argv[1:]:
    name = None
    for line in open(path, encoding="utf-8"):
        words = line.split()
        if words and "time:" not in line and re.match(r"^[A-Za-z0-9_]+/[A-Za-z0-9_/]+$", words[0]):
            name = words[0]
        match = re.search(r"time:\s+\[\S+ \S+ (\S+) (\S+) \S+ \S+\]", line)
        if match:
            if words[0] != "time:":
                name = words[0]
            micros = float(match.group(1)) * UNIT[match.group(2)]
            if name not in times:
                order.append(name)
            times.setdefault(name, []).append(micros)
print("| benchmark | median time (min-max) | single-core rate |")
print("|---|---|---|")
for name in order:
    values = times[name]
    median = statistics.median(values)
    print(f"| {name} | {median:.2f} µs ({min(values):.2f}-{max(values):.2f}) | {1e6 / median:,.0f} /s |")
PY
