# Shared by the bench scripts (sourced): the project's folders (ROOT, BENCH, CARGO_TARGET_DIR), a
# scratch folder and the processes a script started, the last two removed on exit however the
# script ends (a script may define `cleanup_extra` for more), the tokens, and the wrk driver of
# jwt-test (`drive`, `field`).
ROOT=${ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
BENCH=$ROOT/bench
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
WORK=$(mktemp -d)
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if declare -F cleanup_extra >/dev/null; then
        cleanup_extra
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# Keys and tokens for a scratch server: the issuer and legacy secret they are made for, and
# `make_tokens DIR COUNT FRESH` (examples/bench_tokens.rs; needs CARGO_TARGET_DIR).
TOKEN_ISSUER=https://bench.supabase.co/auth/v1
TOKEN_SECRET=bench-legacy-jwt-secret-with-at-least-32-characters
make_tokens() {
    cargo build --release --locked --quiet --example bench_tokens
    "$CARGO_TARGET_DIR/release/examples/bench_tokens" "$1" "$TOKEN_ISSUER" "$TOKEN_SECRET" "$2" "$3" >/dev/null
}

log() { printf '%s\n' "$*" >&2; }

wait_for() { # URL [curl arguments]
    local i
    for i in $(seq 1 200); do
        if curl -fsS -o /dev/null "$@" 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    log "no answer from $1"
    return 1
}

# wrk on LOAD_CPU against SERVER_PORT (bench/tokens.lua: jwt-test, or the path given), printing
# its RESULT line.
drive() { # seconds connections token_file [delay_ms [path]]
    taskset -c "$LOAD_CPU" wrk -t1 -c "$2" -d "$1s" --timeout 5s -s "$BENCH/tokens.lua" \
        "http://127.0.0.1:$SERVER_PORT" -- "$3" "${4:-0}" ${5:+"$5"} | grep '^RESULT'
}

field() { # RESULT-line name
    sed -E "s/.* $2=([0-9]+).*/\1/" <<<"$1"
}
