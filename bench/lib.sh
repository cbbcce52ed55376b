# Shared by the bench scripts (sourced): the project's folders (ROOT, BENCH, CARGO_TARGET_DIR), a
# scratch folder and the processes a script started, the last two removed on exit however the
# script ends. A script may define `cleanup_extra` for more.
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
