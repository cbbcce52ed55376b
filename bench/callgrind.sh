#!/usr/bin/env bash
# Instructions per request of the release server, counted by callgrind: unlike req/s, the count
# does not depend on what else the machine is doing, so it decides which change to keep.
#
# usage: bench/callgrind.sh [EDGEGATE_BIN]    (default: target/release/edgegate, built here)
#
# For each scenario the server runs under `valgrind --tool=callgrind` with instrumentation off,
# answers WARMUP requests, then collects over exactly REQUESTS requests on one keep-alive
# connection (bench/callgrind_client.py, loopback only; every answer must be 200) and stops.
#   healthz  GET /healthz (the HTTP floor)
#   hit      jwt-test with one ES256 token, repeated (a verified-token cache hit)
#   hit-hs256  the same with one HS256 token (the legacy secret: its usage is recorded)
#   hit-hs256-js  hit-hs256 as supabase-js sends it, naming itself in `x-client-info` (the
#            client its legacy usage is recorded under)
#   fresh    jwt-test with ES256 tokens that never repeat (a signature check each)
#   fresh-rs256, fresh-eddsa  the same with RS256 and EdDSA tokens
#   churn    fresh, after a warm-up of CHURN_WARMUP (10,300) fresh tokens that fills the
#            verified-token cache (10,000 entries): each counted request also evicts one
#   hit-otel hit, with every span exported over OTLP (always_on) to bench/otlp_sink.py: the
#            export task's work (encoding, sending) falls inside the counted requests
# Output: instructions per request per scenario, and each scenario's top functions (self cost)
# in OUT_DIR (default: a scratch folder, printed) as callgrind.<scenario>.{out,txt}.
# Variables: REQUESTS (2000), WARMUP (300), CHURN_WARMUP, SCENARIOS, OUT_DIR, SERVER_PORT,
# SINK_PORT, TOP (25),
# LOG_LEVEL (RUST_LOG, default info: the container's logging, JSON lines included).
set -euo pipefail

REQUESTS=${REQUESTS:-2000}
WARMUP=${WARMUP:-300}
SCENARIOS=${SCENARIOS:-healthz hit fresh}
CHURN_WARMUP=${CHURN_WARMUP:-10300}
TOP=${TOP:-25}
LOG_LEVEL=${LOG_LEVEL:-info}
SERVER_PORT=${SERVER_PORT:-18821}
SINK_PORT=${SINK_PORT:-18822}

# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
OUT_DIR=${OUT_DIR:-$WORK/out}
mkdir -p "$OUT_DIR"

log() { printf '%s\n' "$*" >&2; }

command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind >/dev/null; }
[ -n "${1:-}" ] || cargo build --release --locked --quiet --bin edgegate
EDGEGATE=${1:-$CARGO_TARGET_DIR/release/edgegate}
make_tokens "$WORK/tokens" 1 $((WARMUP + REQUESTS))
# The keys inline, so that no JWKS host is needed and nothing is fetched while counting.
JWKS=$(cat "$WORK/tokens/jwks.json")

# vgdb finds valgrind by a name made of USER and HOST, so the control side needs the server's.
control() { env -u USER HOST=127.0.0.1 callgrind_control "$@" >/dev/null; }

run() { # scenario path token_file [VAR=value…]
    local out=$OUT_DIR/callgrind.$1.out pid
    mkdir -p "$WORK/db"
    rm -f "$WORK/db/"*
    env -i PATH="$PATH" HOST=127.0.0.1 PORT="$SERVER_PORT" \
        DATABASE_URL="sqlite://$WORK/db/edgegate.db" \
        SUPABASE_JWKS="$JWKS" SUPABASE_JWT_SECRET="$TOKEN_SECRET" JWT_ISSUERS="$TOKEN_ISSUER" \
        LOG_FORMAT=json RUST_LOG="$LOG_LEVEL" "${@:4}" \
        valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" \
        "$EDGEGATE" serve >"$WORK/server.$1.log" 2>"$WORK/valgrind.$1.log" &
    pid=$!
    PIDS+=("$pid")
    python3 "$BENCH/callgrind_client.py" "$SERVER_PORT" "$2" "$3" "$WARMUP" 0 --wait
    control -i on "$pid"
    python3 "$BENCH/callgrind_client.py" "$SERVER_PORT" "$2" "$3" "$REQUESTS" "$WARMUP"
    control -i off "$pid"
    kill -TERM "$pid"
    wait "$pid" || true
    local total
    total=$(awk '/^totals:/ {print $2}' "$out")
    callgrind_annotate --threshold=100 "$out" 2>/dev/null >"$WORK/annotate.txt" || true
    head -n $((TOP + 25)) "$WORK/annotate.txt" >"$OUT_DIR/callgrind.$1.txt"
    printf '%s\t%s\t%s\n' "$1" "$total" "$((total / REQUESTS))" >>"$OUT_DIR/summary.tsv"
    log "$1: $total instructions over $REQUESTS requests = $((total / REQUESTS)) a request"
}

: >"$OUT_DIR/summary.tsv"
for scenario in $SCENARIOS; do
    case $scenario in
    healthz) run healthz /healthz "$WORK/tokens/es256_one.txt" ;;
    hit) run hit /functions/v1/jwt-test "$WORK/tokens/es256_one.txt" ;;
    hit-hs256) run hit-hs256 /functions/v1/jwt-test "$WORK/tokens/hs256.txt" ;;
    hit-hs256-js)
        CLIENT_INFO=supabase-js/2.47.0 run hit-hs256-js /functions/v1/jwt-test \
            "$WORK/tokens/hs256.txt"
        ;;
    fresh) run fresh /functions/v1/jwt-test "$WORK/tokens/es256_fresh.txt" ;;
    fresh-rs256) run fresh-rs256 /functions/v1/jwt-test "$WORK/tokens/rs256_fresh.txt" ;;
    fresh-eddsa) run fresh-eddsa /functions/v1/jwt-test "$WORK/tokens/eddsa_fresh.txt" ;;
    churn)
        make_tokens "$WORK/churn" 1 $((CHURN_WARMUP + REQUESTS))
        # The same key as the other scenarios' (it is inline), so these tokens are re-signed.
        WARMUP=$CHURN_WARMUP run churn /functions/v1/jwt-test "$WORK/churn/es256_fresh.txt" \
            SUPABASE_JWKS="$(cat "$WORK/churn/jwks.json")"
        ;;
    hit-otel)
        python3 "$BENCH/otlp_sink.py" "$SINK_PORT" "$WORK/sink.count" &
        PIDS+=($!)
        # Batches of 100 so that the counted requests hold 20 whole exports at the default
        # REQUESTS, rather than at most 3 of the default 512.
        run hit-otel /functions/v1/jwt-test "$WORK/tokens/es256_one.txt" \
            OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$SINK_PORT" OTEL_TRACES_SAMPLER=always_on \
            OTEL_BSP_MAX_EXPORT_BATCH_SIZE=100
        ;;
    *) log "unknown scenario $scenario" && exit 1 ;;
    esac
done
echo "binary: $EDGEGATE; $REQUESTS requests per scenario after $WARMUP; profiles in $OUT_DIR"
echo "| scenario | instructions a request |"
echo "|---|---|"
awk -F'\t' '{printf "| %s | %d |\n", $1, $3}' "$OUT_DIR/summary.tsv"
if [ -z "${KEEP:-}" ] && [ "$OUT_DIR" = "$WORK/out" ]; then
    for scenario in $SCENARIOS; do
        echo
        echo "== $scenario: top functions by own instructions"
        sed -n "1,$((TOP + 25))p" "$OUT_DIR/callgrind.$scenario.txt"
    done
fi
