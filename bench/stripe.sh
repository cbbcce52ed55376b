#!/usr/bin/env bash
# The Stripe measurements of BENCHMARKS.md, against the release build, loopback only:
#   sync     the catalogue sync of N products and 3N prices from a fake Stripe
#            (examples/fake_stripe.rs), on PostgreSQL and then on SQLite: wall time and edgegate's
#            peak RSS (VmHWM) of a first sync into an empty database, then of a second, unchanged
#            one (nothing upserted); a fresh database and a fresh edgegate process per run.
#   webhook  Stripe webhook ingestion on PostgreSQL: K distinct signed events plus DUP_PERCENT %
#            re-sends, interleaved (examples/webhook_load.rs), each sent once with CONNECTIONS
#            in flight; events/s, p50/p99, the duplicate answers, then the ledger and the rows the
#            events wrote are checked with psql (every event stored once and applied once).
#   reconcile POST /admin/stripe/reconcile of E events listed by the fake Stripe's /v1/events
#            (newest first, pages of 100), into an empty database, then a rerun that finds every
#            event in the ledger: wall time and edgegate's peak RSS (VmHWM) after each, the
#            answer's counts and the ledger checked; a fresh database and process per run.
#
# usage: bench/stripe.sh          (RUNS=3 N=10000 K=20000 DUP_PERCENT=10 E=10000 by default)
# Variables: RUNS, N, K, DUP_PERCENT, E, CONNECTIONS, PHASES ("sync webhook reconcile"), BACKENDS
# ("postgres sqlite"), PG (server URL without database), PG_DB (dropped and created per run),
# PG_DB_SETTING (name=value set on that database, for diagnosis),
# FIXTURES, SERVER_CPU (edgegate), LOAD_CPU (the fake Stripe and the load client).
# PostgreSQL itself is the local server, not pinned.
set -euo pipefail

RUNS=${RUNS:-3}
N=${N:-10000}
K=${K:-20000}
DUP_PERCENT=${DUP_PERCENT:-10}
E=${E:-10000}
CONNECTIONS=${CONNECTIONS:-64}
PHASES=${PHASES:-sync webhook reconcile}
BACKENDS=${BACKENDS:-postgres sqlite}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
PG=${PG:-postgres://postgres@127.0.0.1:5432}
PG_DB=${PG_DB:-edgegate_bench}
# A diagnostic: a PostgreSQL setting for the bench database, e.g. plan_cache_mode=force_custom_plan.
PG_DB_SETTING=${PG_DB_SETTING:-}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH=$ROOT/bench
FIXTURES=${FIXTURES:-$ROOT/../shared/vectors/stripe/fixtures3.json}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
STRIPE_PORT=${STRIPE_PORT:-18810}
SERVER_PORT=${SERVER_PORT:-18811}
STRIPE_KEY=sk_test_bench0123456789abcdefghij
SB_SECRET=sb_secret_bench0123456789abcdefghijkl
WHSEC=whsec_bench0123456789abcdefghijklmnop
# Every call is bounded: a sync or a whole webhook run taking longer than this fails the script.
MAX_SECONDS=${MAX_SECONDS:-600}

# shellcheck source=bench/lib.sh
source "$BENCH/lib.sh"
cleanup_extra() {
    dropdb --if-exists -h 127.0.0.1 -U postgres "$PG_DB" 2>/dev/null || true
}

[ -r "$FIXTURES" ] || { log "fixtures not readable: $FIXTURES"; exit 1; }

log "load at start: $(uptime)"
log "building edgegate (release), the fake Stripe and the webhook load client"
cargo build --release --locked --quiet --bin edgegate --example fake_stripe --example webhook_load
EDGEGATE=${EDGEGATE_BIN:-$CARGO_TARGET_DIR/release/edgegate}
EXAMPLES=$CARGO_TARGET_DIR/release/examples

psql_value() { psql -X -A -t -q -h 127.0.0.1 -U postgres -d "$PG_DB" -c "$1"; }

fresh_database() { # backend -> prints DATABASE_URL
    case $1 in
    postgres)
        dropdb --if-exists -h 127.0.0.1 -U postgres "$PG_DB"
        createdb -h 127.0.0.1 -U postgres "$PG_DB"
        if [ -n "$PG_DB_SETTING" ]; then
            psql -X -q -h 127.0.0.1 -U postgres -d postgres \
                -c "ALTER DATABASE $PG_DB SET ${PG_DB_SETTING%%=*} = '${PG_DB_SETTING#*=}'" >&2
        fi
        echo "$PG/$PG_DB"
        ;;
    sqlite)
        rm -rf "$WORK/db"
        mkdir -p "$WORK/db"
        echo "sqlite://$WORK/db/edgegate.db"
        ;;
    esac
}

SERVER_PID=
start_edgegate() { # DATABASE_URL
    env -i PATH="$PATH" HOST=127.0.0.1 PORT="$SERVER_PORT" DATABASE_URL="$1" \
        SUPABASE_SECRET_KEYS="{\"bench\":\"$SB_SECRET\"}" \
        STRIPE_SECRET_KEY="$STRIPE_KEY" STRIPE_API_BASE="http://127.0.0.1:$STRIPE_PORT/" \
        STRIPE_WEBHOOK_SECRET="$WHSEC" STRIPE_RECONCILE_INTERVAL_SECONDS=0 \
        LOG_FORMAT=json RUST_LOG=info \
        taskset -c "$SERVER_CPU" "$EDGEGATE" serve >>"$WORK/edgegate.log" 2>&1 &
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    wait_for "http://127.0.0.1:$SERVER_PORT/healthz" || { tail -20 "$WORK/edgegate.log" >&2; return 1; }
}

stop_edgegate() {
    kill "$SERVER_PID"
    wait "$SERVER_PID" 2>/dev/null || true
}

peak_rss_kib() { awk '/^VmHWM/ {print $2}' "/proc/$SERVER_PID/status"; }

# One sync; prints "seconds products_seen products_upserted prices_seen prices_upserted
# deactivated duration_ms" after checking the answer is a 200.
sync_once() {
    local out=$WORK/sync.json status seconds
    read -r status seconds < <(curl -sS -o "$out" -w '%{http_code} %{time_total}\n' \
        --max-time "$MAX_SECONDS" -X POST -H "apikey: $SB_SECRET" \
        "http://127.0.0.1:$SERVER_PORT/functions/v1/sync-stripe-products-hardened")
    if [ "$status" != 200 ]; then
        log "sync answered $status: $(cat "$out")"
        return 1
    fi
    python3 -c 'import json, sys
b = json.load(open(sys.argv[1]))
p, q = b["products"], b["prices"]
print(sys.argv[2], p["seen"], p["upserted"], q["seen"], q["upserted"],
      p["deactivated"] + q["deactivated"], b["duration_ms"])' "$out" "$seconds"
}

# One reconciliation from `since` (unix seconds), or without a body (the default window: on an
# empty ledger, everything Stripe keeps); prints "seconds seen applied already_applied ignored
# duration_ms since" after checking it answered 200.
reconcile_once() { # [since]
    local out=$WORK/reconcile.json status seconds body=()
    if [ $# -gt 0 ]; then
        body=(-H 'content-type: application/json' -d "{\"since\": $1}")
    fi
    read -r status seconds < <(curl -sS -o "$out" -w '%{http_code} %{time_total}\n' \
        --max-time "$MAX_SECONDS" -X POST -H "apikey: $SB_SECRET" "${body[@]}" \
        "http://127.0.0.1:$SERVER_PORT/admin/stripe/reconcile")
    if [ "$status" != 200 ]; then
        log "reconcile answered $status: $(cat "$out")"
        return 1
    fi
    python3 -c 'import json, sys
b = json.load(open(sys.argv[1]))
e = b["events"]
print(sys.argv[2], e["seen"], e["applied"], e["already_applied"], e["ignored"], b["duration_ms"],
      b["since"])' \
        "$out" "$seconds"
}

ledger_rows() { # backend
    case $1 in
    postgres) psql_value 'SELECT count(*) FROM stripe_events' ;;
    sqlite) sqlite3 "$WORK/db/edgegate.db" 'SELECT count(*) FROM stripe_events' ;;
    esac
}

expect() { # what got wanted
    if [ "$2" != "$3" ]; then
        log "FAILED: $1: got $2, wanted $3"
        exit 1
    fi
}

SYNC_RESULTS=$WORK/sync.tsv
WEBHOOK_RESULTS=$WORK/webhook.tsv
RECONCILE_RESULTS=$WORK/reconcile.tsv
: >"$SYNC_RESULTS"
: >"$WEBHOOK_RESULTS"
: >"$RECONCILE_RESULTS"

run_sync() { # backend run
    local url first second rss1 rss2
    url=$(fresh_database "$1")
    start_edgegate "$url"
    first=$(sync_once)
    rss1=$(peak_rss_kib)
    second=$(sync_once)
    rss2=$(peak_rss_kib)
    stop_edgegate
    read -r s1 ps1 pu1 qs1 qu1 d1 ms1 <<<"$first"
    read -r s2 ps2 pu2 qs2 qu2 d2 ms2 <<<"$second"
    expect "first sync: products seen/upserted, prices seen/upserted, deactivated" \
        "$ps1 $pu1 $qs1 $qu1 $d1" "$N $N $((3 * N)) $((3 * N)) 0"
    expect "second sync: products seen/upserted, prices seen/upserted, deactivated" \
        "$ps2 $pu2 $qs2 $qu2 $d2" "$N 0 $((3 * N)) 0 0"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$s1" "$ms1" "$rss1" "$s2" "$ms2" "$rss2" \
        >>"$SYNC_RESULTS"
    log "sync $1 run $2: first ${s1}s (server ${ms1} ms), VmHWM ${rss1} KiB; second ${s2}s (server ${ms2} ms), VmHWM ${rss2} KiB"
}

run_reconcile() { # backend run
    local url first second rss1 rss2 rows
    url=$(fresh_database "$1")
    start_edgegate "$url"
    first=$(reconcile_once)
    rss1=$(peak_rss_kib)
    read -r s1 seen1 applied1 already1 ignored1 ms1 since1 <<<"$first"
    # The same window again (a default one would now start an hour before the newest event).
    second=$(reconcile_once "$since1")
    rss2=$(peak_rss_kib)
    stop_edgegate
    rows=$(ledger_rows "$1")
    read -r s2 seen2 applied2 already2 ignored2 ms2 _ <<<"$second"
    expect "first reconcile: seen applied already_applied ignored" \
        "$seen1 $applied1 $already1 $ignored1" "$E $((E - E / 10)) 0 $((E / 10))"
    expect "rerun: seen applied already_applied ignored" \
        "$seen2 $applied2 $already2 $ignored2" "$E 0 $E 0"
    expect "stripe_events rows" "$rows" "$E"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$s1" "$ms1" "$rss1" "$s2" "$ms2" "$rss2" \
        >>"$RECONCILE_RESULTS"
    log "reconcile $1 run $2: first ${s1}s (server ${ms1} ms), VmHWM ${rss1} KiB; rerun ${s2}s (server ${ms2} ms), VmHWM ${rss2} KiB; ledger $rows rows"
}

run_webhook() { # run
    local url result requests duplicates expected_dups
    url=$(fresh_database postgres)
    start_edgegate "$url"
    # Signed right before sending: edgegate refuses signatures older than 300 s.
    taskset -c "$LOAD_CPU" "$EXAMPLES/webhook_load" generate "$WORK/events.txt" "$FIXTURES" \
        "$WHSEC" "$K" "$DUP_PERCENT" 2>/dev/null
    expected_dups=$(($(wc -l <"$WORK/events.txt") - K))
    result=$(timeout "$MAX_SECONDS" taskset -c "$LOAD_CPU" "$EXAMPLES/webhook_load" send \
        "$WORK/events.txt" "http://127.0.0.1:$SERVER_PORT/functions/v1/stripe-webhook" \
        "$CONNECTIONS" 2>"$WORK/load.err" | grep '^RESULT')
    local rss
    rss=$(peak_rss_kib)
    stop_edgegate
    requests=$(field "$result" requests)
    duplicates=$(field "$result" duplicates)
    expect "deliveries answered 2xx" "$(field "$result" ok)" "$((K + expected_dups))"
    expect "{\"duplicate\":true} answers" "$duplicates" "$expected_dups"
    # The ledger: every distinct event exactly once, each marked applied.
    expect "stripe_events rows" "$(psql_value 'SELECT count(*) FROM stripe_events')" "$K"
    expect "stripe_events applied" \
        "$(psql_value 'SELECT count(*) FROM stripe_events WHERE applied')" "$K"
    # The rows the events wrote, one per event, each stamped with its own event's receipt time:
    # a duplicate applied again would have stamped its row later (the upserts accept an equal
    # `created` and set synced_at/updated_at to the time of receipt).
    local products=$(((K + 2) / 3)) prices=$(((K + 1) / 3)) invoices=$((K / 3))
    expect "stripe_products rows" "$(psql_value 'SELECT count(*) FROM stripe_products')" "$products"
    expect "stripe_prices rows" "$(psql_value 'SELECT count(*) FROM stripe_prices')" "$prices"
    expect "stripe_invoices rows" "$(psql_value 'SELECT count(*) FROM stripe_invoices')" "$invoices"
    expect "products stamped by their own event" "$(psql_value "SELECT count(*) FROM stripe_events e
        JOIN stripe_products p ON p.id = 'prod_W' || substr(e.id, 6) AND p.synced_at = e.received_at")" \
        "$products"
    expect "prices stamped by their own event" "$(psql_value "SELECT count(*) FROM stripe_events e
        JOIN stripe_prices p ON p.id = 'price_W' || substr(e.id, 6) AND p.synced_at = e.received_at")" \
        "$prices"
    expect "invoices stamped by their own event" "$(psql_value "SELECT count(*) FROM stripe_events e
        JOIN stripe_invoices i ON i.id = 'in_W' || substr(e.id, 6) AND i.updated_at = e.received_at
        AND i.paid_at IS NOT NULL")" "$invoices"
    local rps
    rps=$(awk -v r="$requests" -v d="$(field "$result" duration_us)" 'BEGIN {printf "%.0f", r / (d / 1e6)}')
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$rps" "$(field "$result" p50_us)" \
        "$(field "$result" p99_us)" "$requests" "$duplicates" "$rss" >>"$WEBHOOK_RESULTS"
    log "webhook run $1: $requests deliveries ($duplicates duplicates) at $rps/s, p50 $(field "$result" p50_us) us, p99 $(field "$result" p99_us) us; ledger and rows checked"
}

# Runs `$1 backend run` for every backend and run against a fake Stripe started with the rest
# of the arguments (objects to list, fixtures, key, events to list).
with_fake_stripe() {
    local each=$1
    shift
    taskset -c "$LOAD_CPU" "$EXAMPLES/fake_stripe" "$STRIPE_PORT" "$@" 2>"$WORK/fake_stripe.log" &
    STRIPE_PID=$!
    PIDS+=("$STRIPE_PID")
    wait_for "http://127.0.0.1:$STRIPE_PORT/v1/balance" -H "Authorization: Bearer $STRIPE_KEY"
    for backend in $BACKENDS; do
        for run in $(seq 1 "$RUNS"); do
            "$each" "$backend" "$run"
        done
    done
    log "fake Stripe peak RSS (not edgegate's): $(awk '/^VmHWM/ {print $2}' "/proc/$STRIPE_PID/status") KiB"
    kill "$STRIPE_PID"
    wait "$STRIPE_PID" 2>/dev/null || true
}

for phase in $PHASES; do
    case $phase in
    sync) with_fake_stripe run_sync "$N" "$FIXTURES" "$STRIPE_KEY" ;;
    webhook)
        for run in $(seq 1 "$RUNS"); do
            run_webhook "$run"
        done
        ;;
    reconcile) with_fake_stripe run_reconcile 0 "$FIXTURES" "$STRIPE_KEY" "$E" ;;
    esac
done

echo
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); edgegate on CPU $SERVER_CPU, fake Stripe and load client on CPU $LOAD_CPU; PostgreSQL $(psql -X -A -t -h 127.0.0.1 -U postgres -d postgres -c 'SHOW server_version') not pinned"
echo "sync: N=$N products, $((3 * N)) prices; webhook: K=$K events + $DUP_PERCENT % duplicates, $CONNECTIONS in flight; reconcile: E=$E events; $RUNS runs each"
echo "load: $(uptime)"
python3 "$BENCH/stripe_summary.py" "$SYNC_RESULTS" "$WEBHOOK_RESULTS" "$((4 * N))" \
    "$RECONCILE_RESULTS" "$E"
