# Shared by the bench scripts (sourced): a scratch folder and the processes a script started,
# both removed on exit however the script ends (a script may define `cleanup_extra` for more),
# and the wrk driver of jwt-test (`drive`, `field`).
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

# The issuer and legacy secret of the tokens examples/bench_tokens.rs makes for the servers.
ISSUER=https://bench.supabase.co/auth/v1
SECRET=bench-legacy-jwt-secret-with-at-least-32-characters

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

# wrk on LOAD_CPU against jwt-test on SERVER_PORT (bench/tokens.lua), printing its RESULT line.
drive() { # seconds connections token_file [delay_ms]
    taskset -c "$LOAD_CPU" wrk -t1 -c "$2" -d "$1s" --timeout 5s -s "$BENCH/tokens.lua" \
        "http://127.0.0.1:$SERVER_PORT" -- "$3" "${4:-0}" | grep '^RESULT'
}

field() { # RESULT-line name
    sed -E "s/.* $2=([0-9]+).*/\1/" <<<"$1"
}
