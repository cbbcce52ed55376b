# Shared by the bench scripts (sourced): the project's folders (ROOT, BENCH, CARGO_TARGET_DIR), a
# scratch folder and the processes a script started, the last two removed on exit however the
# script ends (a script may define `cleanup_extra` for more), the guest's idle polling
# (HALT_POLL_NS, below), the tokens, a server verifying them (`start_inline`), and the wrk driver
# of jwt-test (`drive`, `field`).
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
    if [ -n "${HALT_POLL_BEFORE:-}" ]; then
        echo "$HALT_POLL_BEFORE" >"$HALT_POLL_PARAM" || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# HALT_POLL_NS (optional): on a KVM or Firecracker guest with the haltpoll cpuidle driver, how
# long an idle vCPU polls before it halts (the kernel's guest_halt_poll_ns; these machines boot
# with 0), set for the script's run and restored on exit. With it, an answer that finds
# wrk asleep on the other core wakes it without an inter-processor interrupt, i.e. without a
# VM exit charged to the server's write; without it, that exit is counted as the server's
# system time whenever the server is the slower side (BENCHMARKS.md, "Guest halt polling").
HALT_POLL_PARAM=/sys/module/haltpoll/parameters/guest_halt_poll_ns
HALT_POLL_BEFORE=
halt_poll_setting() { # prints the setting in effect, for the report
    if [ -r "$HALT_POLL_PARAM" ]; then
        echo "guest_halt_poll_ns=$(cat "$HALT_POLL_PARAM")"
    else
        echo "no haltpoll cpuidle driver"
    fi
}
if [ -n "${HALT_POLL_NS:-}" ]; then
    if [ ! -w "$HALT_POLL_PARAM" ]; then
        echo "HALT_POLL_NS is set but $HALT_POLL_PARAM cannot be written (no haltpoll cpuidle driver, or not root)" >&2
        exit 2
    fi
    HALT_POLL_BEFORE=$(cat "$HALT_POLL_PARAM")
    echo "$HALT_POLL_NS" >"$HALT_POLL_PARAM"
fi

# Keys and tokens for a scratch server: the issuer and legacy secret they are made for, and
# `make_tokens DIR COUNT FRESH [LARGE]` (examples/bench_tokens.rs; needs CARGO_TARGET_DIR).
TOKEN_ISSUER=https://bench.supabase.co/auth/v1
TOKEN_SECRET=bench-legacy-jwt-secret-with-at-least-32-characters
make_tokens() {
    cargo build --release --locked --quiet --example bench_tokens
    "$CARGO_TARGET_DIR/release/examples/bench_tokens" "$1" "$TOKEN_ISSUER" "$TOKEN_SECRET" "$2" "$3" "${4:-0}" >/dev/null
}

log() { printf '%s\n' "$*" >&2; }

need_wrk() {
    if ! command -v wrk >/dev/null; then
        log "installing wrk"
        apt-get update -qq && apt-get install -y -qq wrk >/dev/null
    fi
}

wait_for() { # URL [curl arguments]
    local i
    for i in $(seq 1 200); do
        if curl -fsS -o /dev/null "$@" 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    log "no answer from $1"
    return 1
}

# A process's CPU time in clock ticks of TICK_US µs: `cpu_ticks PID 14` user, `15` system
# (fields of /proc/PID/stat, counted after the command name, which may hold spaces).
TICK_US=$((1000000 / $(getconf CLK_TCK)))
cpu_ticks() {
    awk -v f="$2" '{sub(/.*\) /, ""); print $(f - 2)}' "/proc/$1/stat"
}

# `open_log FILE`: opens LOG_FD for a server's output to FILE; with LOG_SINK=pipe through a pipe
# to `cat` (on LOAD_CPU), as under a container runtime or a log shipper, instead of straight into
# the file. Close it (`exec {LOG_FD}>&-`) once the server holds it.
open_log() {
    if [ "${LOG_SINK:-file}" = pipe ]; then
        exec {LOG_FD}> >(exec taskset -c "$LOAD_CPU" cat >"$1")
    else
        exec {LOG_FD}>"$1"
    fi
}

# `port_free PORT`: fails, naming what holds it, when something listens on 127.0.0.1:PORT (a
# server left over from an earlier run, say): it would answer our `wait_for` and our load in
# place of the server started here, which would have failed to bind.
port_free() {
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
        return 0
    fi
    local holder
    holder=$(ss -Hltnp "sport = :$1" 2>/dev/null | sed -n 's/.*users:(\(.*\))$/\1/p' | head -1)
    if [ -z "$holder" ] && command -v fuser >/dev/null; then
        holder=$(fuser -n tcp "$1" 2>/dev/null | xargs -r ps -o pid=,args= -p 2>/dev/null | head -1)
    fi
    log "port $1 is already in use by ${holder:-another process (not visible to this user)}:" \
        "stop it, or choose another port (SERVER_PORT, or 0 for one the kernel picks)"
    return 1
}

# `bound_port LOG PID`: the port the edgegate PID reports in its JSON LOG ("edgegate
# listening"), waiting for it at most 30 s; fails, with the log, if it exits first or never says.
bound_port() {
    local i port
    for i in $(seq 1 300); do
        port=$(sed -n -E 's/.*"message":"edgegate listening".*"address":"[^"]*:([0-9]+)".*/\1/p' \
            "$1" 2>/dev/null | head -1)
        if [ -n "$port" ]; then
            echo "$port"
            return 0
        fi
        if ! kill -0 "$2" 2>/dev/null; then
            tail -20 "$1" >&2
            log "edgegate exited before it reported its address"
            return 1
        fi
        sleep 0.1
    done
    tail -20 "$1" >&2
    log "edgegate did not report its address within 30 s"
    return 1
}

# `start_inline BIN [RUST_LOG [NAME]]`: edgegate on SERVER_CPU and SERVER_PORT, verifying the
# tokens `make_tokens` wrote to TOK with their keys inline (SUPABASE_JWKS), on a new SQLite file
# in WORK/db, logging JSON at RUST_LOG (info) to WORK/server.log (see open_log); with NAME, in
# WORK/db.NAME and to WORK/server.NAME.log, so that two servers can run at once. Sets SERVER_PID
# once it answers. SERVER_ENV (optional): more VAR=value words for its environment.
# SERVER_PORT=0: a port the kernel picks, read from the server's log; SERVER_PORT is set to it
# (for `drive` and the rest), so no earlier process can hold it. A fixed port must be free.
start_inline() {
    local db=$WORK/db${3:+.$3} log_file=$WORK/server${3:+.$3}.log
    if [ "$SERVER_PORT" != 0 ]; then
        port_free "$SERVER_PORT" || exit 1
    fi
    rm -rf "$db" && mkdir -p "$db"
    open_log "$log_file"
    # shellcheck disable=SC2086 # SERVER_ENV is a list of words
    env -i PATH="$PATH" ${SERVER_ENV:-} \
        HOST=127.0.0.1 PORT="$SERVER_PORT" DATABASE_URL="sqlite://$db/e.db" \
        SUPABASE_JWKS="$(cat "$TOK/jwks.json")" SUPABASE_JWT_SECRET="$TOKEN_SECRET" \
        JWT_ISSUERS="$TOKEN_ISSUER" LOG_FORMAT=json RUST_LOG="${2:-info}" \
        taskset -c "$SERVER_CPU" "$1" serve >&"$LOG_FD" 2>&1 &
    SERVER_PID=$!
    exec {LOG_FD}>&-
    PIDS+=("$SERVER_PID")
    if [ "$SERVER_PORT" = 0 ]; then
        SERVER_PORT=$(bound_port "$log_file" "$SERVER_PID") || exit 1
    fi
    wait_for "http://127.0.0.1:$SERVER_PORT/healthz"
    # What answered must be this server: one that failed to start has exited by now.
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        tail -20 "$log_file" >&2
        log "the edgegate started here exited (port $SERVER_PORT)"
        exit 1
    fi
}

# `target SCENARIO`: what wrk sends for it, as TARGET_FILE (a token set of TOK, without
# `.txt`) and TARGET_PATH: `healthz` is GET /healthz (with a token it does not read), any
# other name is jwt-test with that token set.
target() {
    if [ "$1" = healthz ]; then
        TARGET_FILE=es256_one TARGET_PATH=/healthz
    else
        TARGET_FILE=$1 TARGET_PATH=/functions/v1/jwt-test
    fi
}

# wrk on LOAD_CPU against SERVER_PORT (bench/tokens.lua: jwt-test, or the path given), printing
# its RESULT line. A run goes on in its token set where the last run of that set against
# SERVER_PORT stopped (a cursor in WORK), so that a fresh set sends no token again before it has
# gone round: every wrk starts its script afresh, and a run that began where the one before it
# began would send that run's tokens again, which a run shorter than the verified-token cache is
# long finds there (BENCHMARKS.md, twenty-first pass).
drive() { # seconds connections token_file [delay_ms [path]]
    local cursor start=0 result
    cursor=$WORK/cursor.$SERVER_PORT.$(basename "$3")
    if [ -f "$cursor" ]; then start=$(<"$cursor"); fi
    result=$(taskset -c "$LOAD_CPU" wrk -t1 -c "$2" -d "$1s" --timeout 5s -s "$BENCH/tokens.lua" \
        "http://127.0.0.1:$SERVER_PORT" -- "$3" "${4:-0}" "${5:-/functions/v1/jwt-test}" "$start" |
        grep '^RESULT')
    if [ -n "$result" ]; then
        # Past what wrk counted by one request a connection: sent, perhaps, and not answered.
        echo $((start + $(field "$result" requests) + $2)) >"$cursor"
    fi
    echo "$result"
}

field() { # RESULT-line name
    sed -E "s/.* $2=([0-9]+).*/\1/" <<<"$1"
}

# `all_answered RESULT WHAT`: fails, saying so for WHAT, if the wrk run behind RESULT got any
# answer other than a 2xx or any socket error.
all_answered() {
    if [ "$(field "$1" non2xx)" != 0 ] || [ "$(field "$1" socket_errors)" != 0 ]; then
        log "$2: $(field "$1" non2xx) non-2xx answers, $(field "$1" socket_errors) socket errors"
        return 1
    fi
}

# `cache_hits PORT`: the verified-token cache hits the edgegate on PORT has counted (/metrics).
cache_hits() {
    curl -fsS "http://127.0.0.1:$1/metrics" | awk '$1 == "edgegate_token_cache_hits_total" {print $2}'
}

# `no_cache_answers SET PORT HITS`: a fresh SET measures a signature check a request, so the
# script fails if the edgegate on PORT has counted cache hits since it counted HITS.
no_cache_answers() {
    case $1 in *_fresh) ;; *) return 0 ;; esac
    local now
    now=$(cache_hits "$2")
    if [ "$now" != "$3" ]; then
        log "$1 on port $2: $((now - $3)) answers from the verified-token cache"
        exit 1
    fi
}

# For the perf-sampling scripts (check_share.sh, profile.sh): perf itself, and
# `sample SCENARIO PERF_DATA`: SCENARIO (`healthz`, or a token set of $TOK) driven for DURATION
# seconds at 64 connections after 2 s of warm-up, while `perf record -e cpu-clock` samples the
# server (SERVER_PID) into PERF_DATA (cycles are not counted in these virtual machines). Sets
# SAMPLED_REQUESTS and SAMPLED_CPU_US, the server's CPU µs a request (user + system). A fresh
# set fails it if any of its answers came from the verified-token cache.
server_bin() { # [EDGEGATE_BIN]: sets BIN to it, else to the release build, built here
    if [ $# -gt 0 ]; then
        BIN=$1
    else
        cargo build --release --locked --quiet --bin edgegate
        BIN=$CARGO_TARGET_DIR/release/edgegate
    fi
}
need_perf() {
    if ! command -v perf >/dev/null; then
        log "installing perf"
        apt-get update -qq && apt-get install -y -qq linux-perf >/dev/null
    fi
}
server_cpu_ticks() { echo $(($(cpu_ticks "$SERVER_PID" 14) + $(cpu_ticks "$SERVER_PID" 15))); }
# Their set-up: wrk, perf, the server (`server_bin`), the tokens (TOK) and the server verifying
# them (SERVER_PID), and the report's first line.
start_sampling() {
    need_wrk
    need_perf
    server_bin "$@"
    make_tokens "$WORK/tokens" 1 60000
    TOK=$WORK/tokens
    start_inline "$BIN"
    echo "idle vCPUs: $(halt_poll_setting); server on CPU $SERVER_CPU, wrk on CPU $LOAD_CPU"
}
sample() {
    local out=$2 before after perf_pid result
    target "$1"
    local file=$TARGET_FILE path=$TARGET_PATH
    drive 2 64 "$TOK/$file.txt" 0 "$path" >/dev/null
    local hits
    hits=$(cache_hits "$SERVER_PORT")
    before=$(server_cpu_ticks)
    perf record -q -F 2000 -e cpu-clock -p "$SERVER_PID" -o "$out" -- sleep "$((DURATION + 1))" \
        >/dev/null 2>&1 &
    perf_pid=$!
    result=$(drive "$DURATION" 64 "$TOK/$file.txt" 0 "$path")
    after=$(server_cpu_ticks)
    wait "$perf_pid" || true
    no_cache_answers "$1" "$SERVER_PORT" "$hits"
    SAMPLED_REQUESTS=$(field "$result" requests)
    SAMPLED_CPU_US=$(awk -v a="$before" -v b="$after" -v t="$TICK_US" -v r="$SAMPLED_REQUESTS" \
        'BEGIN {printf "%.2f", (b - a) * t / r}')
}
