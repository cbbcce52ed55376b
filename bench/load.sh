#!/usr/bin/env bash
# Load test of jwt-test: edgegate (release build) against the Edge Function it replaces
# (bench/peer: Deno 2 + jose), one after the other in the same run, each pinned to one core with
# wrk on the other, both verifying against the same local JWKS host. Loopback only; every wrk
# run is bounded; the servers this script starts are stopped on exit.
#
# usage: bench/load.sh            (RUNS=3 DURATION=10 by default; see the variables below)
#
# First the bare signature checks (criterion's `raw/aws_lc_verify`, benches/verify.rs) on the
# server's core: with the `/healthz` floor they give each scenario's limit on that core.
#
# Scenarios (DURATION seconds each, after a short warm-up; RUNS rounds of all of them, so that
# the floor and the scenarios compared with it share the machine's moments):
#   healthz      GET /healthz with the same request headers: the HTTP floor (edgegate only)
#   es256        2,000 distinct ES256 tokens, cycled
#   es256_one    one ES256 token, repeated
#   hs256        2,000 distinct HS256 (legacy secret) tokens
#   rs256        2,000 distinct RS256 tokens
#   es256_fresh  60,000 ES256 tokens, each run going on where the set's last one stopped, so
#                that a token comes round again only after all the others: a signature check
#                on every request, even for edgegate's verified-token cache (an answer from
#                it stops the script; the set runs after the others in a round, since it
#                churns that cache, and the cache-hit sets are sent again for 1 s before they
#                are measured in the next round)
#   rs256_fresh, eddsa_fresh  the same with RS256 and EdDSA tokens
#   paced        ES256 traffic at a fixed offered rate (VALID_RATE req/s), alone
#   flood        the same paced traffic plus random-kid tokens at FLOOD_FACTOR x VALID_RATE;
#                JWKS fetches during it are counted at the JWKS host
# Variables: RUNS, DURATION, WARMUP, CONNECTIONS, VALID_RATE, FLOOD_FACTOR, MIN_REFRESH
# (JWKS_MIN_REFRESH_SECONDS of both servers), SCENARIOS, SERVERS ("edgegate peer"),
# EDGEGATE_BIN (another edgegate binary to measure), SERVER_CPU, LOAD_CPU, HALT_POLL_NS (see
# bench/lib.sh: idle vCPUs poll that long before halting, for this run), LOG_SINK (file, or
# pipe: each server's output through a pipe, as in a container; bench/lib.sh open_log).
# Output: one line per run, then a table of medians with the spread (min-max), peak RSS
# (VmHWM) per server, the ratios edgegate/peer, and edgegate's share of the limit per scenario
# (cache hits: of /healthz; fresh tokens: of 1 / (floor time + bare verify time)), median
# against median and round by round (each round against its own /healthz and its own bare
# checks; bench/summarize.py).
set -euo pipefail

RUNS=${RUNS:-3}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-3}
CONNECTIONS=${CONNECTIONS:-64}
VALID_RATE=${VALID_RATE:-500}
FLOOD_FACTOR=${FLOOD_FACTOR:-10}
MIN_REFRESH=${MIN_REFRESH:-5}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
SCENARIOS=${SCENARIOS:-healthz es256 es256_one hs256 rs256 es256_fresh rs256_fresh eddsa_fresh paced flood}
SERVERS=${SERVERS:-edgegate peer}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH=$ROOT/bench
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
JWKS_PORT=${JWKS_PORT:-18800}
SERVER_PORT=${SERVER_PORT:-18801}

# shellcheck source=bench/lib.sh
source "$BENCH/lib.sh"

need_wrk

log "building edgegate (release) and the token generator"
cargo build --release --locked --quiet --bin edgegate --example bench_tokens
# EDGEGATE_BIN measures another build (e.g. the parent commit's) with the same harness.
EDGEGATE=${EDGEGATE_BIN:-$CARGO_TARGET_DIR/release/edgegate}

# The limit's other half, measured in this run on the server's core: criterion's median time of
# one bare aws-lc-rs signature check per algorithm, once before the servers start (the medians'
# limit) and again in each of edgegate's rounds just before its first fresh-token set, in
# shorter runs, for the round-by-round shares (this kind of machine changes pace by a third
# within minutes).
bare_checks() { # OUT [criterion time options]: writes "ALG<TAB>us" lines, one per algorithm
    local out=$1
    shift
    (cd "$ROOT" && taskset -c "$SERVER_CPU" cargo bench --locked --quiet --bench verify -- \
        --noplot "$@" raw/aws_lc_verify) >"$WORK/bare.txt" 2>&1
    python3 - "$WORK/bare.txt" >"$out" <<'PY'
import re
import sys

UNIT = {"ns": 1e-3, "µs": 1.0, "us": 1.0, "ms": 1e3}
name = None
for line in open(sys.argv[1], encoding="utf-8"):
    words = line.split()
    if words and words[0].endswith("/raw/aws_lc_verify"):
        name = words[0].split("/")[0]
    match = re.search(r"time:\s+\[\S+ \S+ (\S+) (\S+) \S+ \S+\]", line)
    if match and name:
        print(f"{name}\t{float(match.group(1)) * UNIT[match.group(2)]:.3f}")
        name = None
PY
    if [ "$(wc -l <"$out")" -ne 3 ]; then
        log "the bare verify benchmark did not give three times:"
        cat "$WORK/bare.txt" >&2
        exit 1
    fi
}
log "bare signature checks (criterion raw/aws_lc_verify, CPU $SERVER_CPU)"
LIMITS=$WORK/limits.tsv
cargo bench --locked --quiet --bench verify --no-run
bare_checks "$LIMITS"
# Each round's bare checks, as "run<TAB>ALG<TAB>us" lines.
ROUND_LIMITS=$WORK/round_limits.tsv
: >"$ROUND_LIMITS"
log "bare verify (us): $(tr '\t\n' '= ' <"$LIMITS")"

log "installing the peer (deno, jose) from the npm registry"
(cd "$BENCH/peer" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
DENO=$BENCH/peer/node_modules/@deno/linux-x64-glibc/deno
export DENO_DIR=$BENCH/peer/.deno
export DENO_NO_UPDATE_CHECK=1

log "generating keys and tokens"
"$CARGO_TARGET_DIR/release/examples/bench_tokens" "$WORK/tokens" "$TOKEN_ISSUER" "$TOKEN_SECRET" 2000 60000 >/dev/null
TOKENS=$WORK/tokens

FETCH_LOG=$WORK/jwks_fetches.log
: >"$FETCH_LOG"
taskset -c "$LOAD_CPU" python3 "$BENCH/jwks_host.py" "$JWKS_PORT" "$TOKENS/jwks.json" "$FETCH_LOG" &
PIDS+=($!)

wait_for "http://127.0.0.1:$JWKS_PORT/jwks.json"
: >"$FETCH_LOG"

SERVER_PID=
start_server() { # edgegate|peer
    local jwks_url="http://127.0.0.1:$JWKS_PORT/jwks.json"
    open_log "$WORK/$1.log"
    case $1 in
    edgegate)
        mkdir -p "$WORK/db"
        # The container's logging defaults (JSON at info), so the cost of logging is counted.
        env -i PATH="$PATH" HOST=127.0.0.1 PORT="$SERVER_PORT" \
            DATABASE_URL="sqlite://$WORK/db/edgegate.db" \
            SUPABASE_JWKS_URL="$jwks_url" SUPABASE_JWT_SECRET="$TOKEN_SECRET" \
            JWT_ISSUERS="$TOKEN_ISSUER" JWKS_MIN_REFRESH_SECONDS="$MIN_REFRESH" \
            LOG_FORMAT=json RUST_LOG=info \
            taskset -c "$SERVER_CPU" "$EDGEGATE" serve >&"$LOG_FD" 2>&1 &
        ;;
    peer)
        env -i PATH="$PATH" DENO_DIR="$DENO_DIR" DENO_NO_UPDATE_CHECK=1 PORT="$SERVER_PORT" \
            SUPABASE_JWKS_URL="$jwks_url" SUPABASE_JWT_SECRET="$TOKEN_SECRET" \
            JWT_ISSUER="$TOKEN_ISSUER" JWKS_MIN_REFRESH_SECONDS="$MIN_REFRESH" \
            taskset -c "$SERVER_CPU" "$DENO" run --cached-only --no-prompt \
            --allow-net=127.0.0.1 --allow-env --config "$BENCH/peer/deno.json" \
            "$BENCH/peer/jwt-test.ts" >&"$LOG_FD" 2>&1 &
        ;;
    esac
    SERVER_PID=$!
    exec {LOG_FD}>&-
    PIDS+=("$SERVER_PID")
    local i
    for i in $(seq 1 200); do
        if [ "$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $(cat "$TOKENS/es256_one.txt")" \
            "http://127.0.0.1:$SERVER_PORT/functions/v1/jwt-test")" = 200 ]; then
            return 0
        fi
        sleep 0.05
    done
    log "$1 did not answer 200 with a valid token; its log:"
    cat "$WORK/$1.log" >&2
    return 1
}

stop_server() {
    kill "$SERVER_PID"
    wait "$SERVER_PID" 2>/dev/null || true
}

peak_rss_kib() { awk '/^VmHWM/ {print $2}' "/proc/$SERVER_PID/status"; }

RESULTS=$WORK/results.tsv
: >"$RESULTS"
record() { # server scenario run RESULT-line [extra]
    local requests duration rps
    requests=$(field "$4" requests)
    duration=$(field "$4" duration_us)
    rps=$(awk -v r="$requests" -v d="$duration" 'BEGIN {printf "%.0f", r / (d / 1e6)}')
    all_answered "$4" "WARNING: $1 $2 run $3" || true
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$rps" \
        "$(field "$4" p50_us)" "$(field "$4" p99_us)" "${5:-}" >>"$RESULTS"
    log "$1 $2 run $3: $rps req/s, p50 $(field "$4" p50_us) us, p99 $(field "$4" p99_us) us ${5:-}"
}

# Paced connections: each waits delay_ms between requests, so connections * 1000 / delay_ms
# is the offered rate while answers come back quickly; many connections with a long delay keep
# a rise in latency under the flood from lowering the offered rate much.
PACED_CONNECTIONS=50
paced_delay_ms() { awk -v c="$PACED_CONNECTIONS" -v r="$1" 'BEGIN {printf "%d", c * 1000 / r}'; }

run_scenario() { # server scenario run
    local result flood_result fetches_before fetches
    case $2 in
    healthz)
        # The peer (an Edge Function) has no health route.
        if [ "$1" = peer ]; then return 0; fi
        result=$(drive "$DURATION" "$CONNECTIONS" "$TOKENS/es256_one.txt" 0 /healthz)
        record "$1" "$2" "$3" "$result"
        ;;
    es256 | es256_one | hs256 | rs256)
        result=$(drive "$DURATION" "$CONNECTIONS" "$TOKENS/$2.txt")
        record "$1" "$2" "$3" "$result"
        ;;
    es256_fresh | rs256_fresh | eddsa_fresh)
        local hits=0
        if [ "$1" = edgegate ]; then hits=$(cache_hits "$SERVER_PORT"); fi
        result=$(drive "$DURATION" "$CONNECTIONS" "$TOKENS/$2.txt")
        if [ "$1" = edgegate ]; then no_cache_answers "$2" "$SERVER_PORT" "$hits"; fi
        record "$1" "$2" "$3" "$result"
        ;;
    paced)
        result=$(drive "$DURATION" "$PACED_CONNECTIONS" "$TOKENS/es256.txt" "$(paced_delay_ms "$VALID_RATE")")
        record "$1" "$2" "$3" "$result"
        ;;
    flood)
        fetches_before=$(wc -l <"$FETCH_LOG")
        # The random-kid tokens answer 401 by design: only the valid stream's result counts.
        local flood_connections=$((PACED_CONNECTIONS * FLOOD_FACTOR))
        taskset -c "$LOAD_CPU" wrk -t1 -c "$flood_connections" -d "${DURATION}s" --timeout 5s \
            -s "$BENCH/tokens.lua" "http://127.0.0.1:$SERVER_PORT" -- \
            "$TOKENS/random_kid.txt" "$(paced_delay_ms "$VALID_RATE")" \
            >"$WORK/flood.out" &
        local flood_pid=$!
        PIDS+=("$flood_pid")
        result=$(drive "$DURATION" "$PACED_CONNECTIONS" "$TOKENS/es256.txt" "$(paced_delay_ms "$VALID_RATE")")
        wait "$flood_pid" || true
        flood_result=$(grep '^RESULT' "$WORK/flood.out")
        fetches=$(($(wc -l <"$FETCH_LOG") - fetches_before))
        record "$1" "$2" "$3" "$result" \
            "flood_rps=$(awk -v r="$(field "$flood_result" requests)" -v d="$(field "$flood_result" duration_us)" 'BEGIN {printf "%.0f", r / (d / 1e6)}') jwks_fetches=$fetches"
        ;;
    esac
}

RSS=$WORK/rss.tsv
: >"$RSS"
for server in $SERVERS; do
    log "== $server"
    start_server "$server"
    log "warm-up (${WARMUP}s per token set)"
    for set in es256 hs256 rs256; do
        drive "$WARMUP" "$CONNECTIONS" "$TOKENS/$set.txt" >/dev/null
    done
    # In rounds, each scenario once a round: a machine whose speed drifts over minutes then
    # weighs on the floor and on every scenario alike, rather than on whichever ran last.
    for run in $(seq 1 "$RUNS"); do
        for scenario in $SCENARIOS; do
            case $scenario in
            es256 | es256_one | hs256 | rs256)
                # The fresh sets of the round before evicted these tokens from the cache.
                if [ "$run" -gt 1 ]; then
                    drive 1 "$CONNECTIONS" "$TOKENS/$scenario.txt" >/dev/null
                fi
                ;;
            es256_fresh | rs256_fresh | eddsa_fresh)
                if [ "$server" = edgegate ] && ! awk -v r="$run" '$1 == r {f = 1} END {exit !f}' "$ROUND_LIMITS"; then
                    bare_checks "$WORK/round_bare.tsv" --warm-up-time 1 --measurement-time 2
                    sed "s/^/$run\t/" "$WORK/round_bare.tsv" >>"$ROUND_LIMITS"
                    log "round $run: bare verify (us): $(tr '\t\n' '= ' <"$WORK/round_bare.tsv")"
                fi
                ;;
            esac
            run_scenario "$server" "$scenario" "$run"
        done
    done
    if [ "$server" = edgegate ]; then
        curl -s "http://127.0.0.1:$SERVER_PORT/metrics" | grep -E '^[a-z_]*token_cache_hits' >&2 || true
    fi
    printf '%s\t%s\n' "$server" "$(peak_rss_kib)" >>"$RSS"
    stop_server
done

echo
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); servers on CPU $SERVER_CPU, wrk on CPU $LOAD_CPU"
echo "idle vCPUs: $(halt_poll_setting); server logs: ${LOG_SINK:-file}"
echo "runs: $RUNS x ${DURATION}s, $CONNECTIONS connections (paced: $PACED_CONNECTIONS at $VALID_RATE req/s, flood x$FLOOD_FACTOR); JWKS_MIN_REFRESH_SECONDS=$MIN_REFRESH"
echo "flood bound: at most $((DURATION / MIN_REFRESH + 1)) JWKS fetches in ${DURATION}s (one per ${MIN_REFRESH}s)"
echo "bare verify, criterion raw/aws_lc_verify on CPU $SERVER_CPU (us): $(tr '\t\n' '= ' <"$LIMITS")"
python3 "$BENCH/summarize.py" "$RESULTS" "$RSS" "$LIMITS" "$ROUND_LIMITS"
