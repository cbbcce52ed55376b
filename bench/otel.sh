#!/usr/bin/env bash
# The cost of exporting traces: jwt-test throughput of one release binary with tracing off (no
# OTEL variable) and with every request's span exported (OTEL_TRACES_SAMPLER=always_on, or SAMPLER) to a
# local OTLP sink (bench/otlp_sink.py), the two configurations alternated run after run. Server
# pinned to SERVER_CPU, wrk and the sink to LOAD_CPU, loopback only, every wrk run bounded.
#
# usage: bench/otel.sh   (RUNS=5 DURATION=10 WARMUP=3 CONNECTIONS=64 TOKENS=es256 LOG_LEVEL=info)
# Output: one line per run (with the load average and the server's CPU time per request), then
# the medians and the cost of export, in throughput and in CPU time per request.
set -euo pipefail

RUNS=${RUNS:-5}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-3}
CONNECTIONS=${CONNECTIONS:-64}
TOKEN_SET=${TOKENS:-es256}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
LOG_LEVEL=${LOG_LEVEL:-info}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH=$ROOT/bench
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
JWKS_PORT=${JWKS_PORT:-18810}
SERVER_PORT=${SERVER_PORT:-18811}
SINK_PORT=${SINK_PORT:-18812}

# shellcheck source=bench/lib.sh
source "$BENCH/lib.sh"

command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
log "building edgegate (release) and the token generator"
cargo build --release --locked --quiet --bin edgegate --example bench_tokens
EDGEGATE=${EDGEGATE_BIN:-$CARGO_TARGET_DIR/release/edgegate}
"$CARGO_TARGET_DIR/release/examples/bench_tokens" "$WORK/tokens" "$TOKEN_ISSUER" "$TOKEN_SECRET" 2000 2000 >/dev/null

taskset -c "$LOAD_CPU" python3 "$BENCH/jwks_host.py" "$JWKS_PORT" "$WORK/tokens/jwks.json" /dev/null &
PIDS+=($!)
wait_for "http://127.0.0.1:$JWKS_PORT/jwks.json"

SERVER_PID=
start_server() { # off|on
    local otel=()
    if [ "$1" = on ]; then
        otel=(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$SINK_PORT" OTEL_TRACES_SAMPLER="${SAMPLER:-always_on}")
    fi
    rm -rf "$WORK/db" && mkdir -p "$WORK/db"
    # The container's logging defaults (JSON at info), as bench/load.sh.
    env -i PATH="$PATH" HOST=127.0.0.1 PORT="$SERVER_PORT" \
        DATABASE_URL="sqlite://$WORK/db/edgegate.db" \
        SUPABASE_JWKS_URL="http://127.0.0.1:$JWKS_PORT/jwks.json" SUPABASE_JWT_SECRET="$TOKEN_SECRET" \
        JWT_ISSUERS="$TOKEN_ISSUER" LOG_FORMAT=json RUST_LOG="$LOG_LEVEL" "${otel[@]}" \
        taskset -c "$SERVER_CPU" "$EDGEGATE" serve >"$WORK/edgegate.log" 2>&1 &
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    wait_for "http://127.0.0.1:$SERVER_PORT/healthz"
}

stop_server() {
    kill "$SERVER_PID"
    wait "$SERVER_PID" 2>/dev/null || true
}

# The server's CPU time so far (user + system, in clock ticks): the cost per request, which
# other work on a shared machine disturbs far less than it does the throughput.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$SERVER_PID/stat"; }
TICKS_PER_SECOND=$(getconf CLK_TCK)

metric() { # name
    curl -s "http://127.0.0.1:$SERVER_PORT/metrics" | awk -v m="$1" '$1 == m {print $2}'
}

RESULTS=$WORK/results.tsv
: >"$RESULTS"
for run in $(seq 1 "$RUNS"); do
    for config in off on; do
        : >"$WORK/sink.count"
        taskset -c "$LOAD_CPU" python3 "$BENCH/otlp_sink.py" "$SINK_PORT" "$WORK/sink.count" &
        sink=$!
        PIDS+=("$sink")
        start_server "$config"
        drive "$WARMUP" "$CONNECTIONS" "$WORK/tokens/$TOKEN_SET.txt" >/dev/null
        cpu_before=$(cpu_ticks)
        result=$(drive "$DURATION" "$CONNECTIONS" "$WORK/tokens/$TOKEN_SET.txt")
        cpu_after=$(cpu_ticks)
        exported=$(metric edgegate_otel_spans_exported_total)
        dropped=$(metric edgegate_otel_spans_dropped_total)
        stop_server
        kill "$sink" && wait "$sink" 2>/dev/null || true
        rps=$(awk -v r="$(field "$result" requests)" -v d="$(field "$result" duration_us)" 'BEGIN {printf "%.0f", r / (d / 1e6)}')
        load=$(cut -d' ' -f1 /proc/loadavg)
        cpu_us=$(awk -v t=$((cpu_after - cpu_before)) -v hz="$TICKS_PER_SECOND" -v r="$(field "$result" requests)" 'BEGIN {printf "%.1f", t * 1e6 / hz / r}')
        printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$config" "$rps" "$(field "$result" p50_us)" "$(field "$result" p99_us)" "$load" "$cpu_us" >>"$RESULTS"
        log "run $run tracing $config: $rps req/s, $cpu_us us CPU/request, p50 $(field "$result" p50_us) us, p99 $(field "$result" p99_us) us, non-2xx $(field "$result" non2xx); exported $exported, dropped $dropped; sink $(cat "$WORK/sink.count"); load $load"
    done
done

echo "machine: $(nproc) cores; server on CPU $SERVER_CPU, wrk and the sink on CPU $LOAD_CPU; $RUNS x ${DURATION}s, $CONNECTIONS connections, tokens $TOKEN_SET"
python3 - "$RESULTS" <<'PY'
import statistics, sys
rows = [line.split("\t") for line in open(sys.argv[1]).read().splitlines()]
med = {}
for config in ("off", "on"):
    mine = [r for r in rows if r[0] == config]
    rps = [int(r[1]) for r in mine]
    cpu = [float(r[5]) for r in mine]
    med[config] = (statistics.median(rps), statistics.median(cpu))
    print(f"tracing {config:3}: median {med[config][0]:.0f} req/s (min {min(rps)}, max {max(rps)}), "
          f"{med[config][1]:.1f} us CPU/request (min {min(cpu)}, max {max(cpu)}), "
          f"p50 {statistics.median(int(r[2]) for r in mine):.0f} us, "
          f"p99 {statistics.median(int(r[3]) for r in mine):.0f} us, "
          f"load {', '.join(r[4] for r in mine)}")
print(f"cost of exporting every span: {100 * (1 - med['on'][0] / med['off'][0]):.1f} % of throughput; "
      f"{100 * (1 - med['off'][1] / med['on'][1]):.1f} % of the throughput one core allows "
      f"(CPU time per request)")
PY
