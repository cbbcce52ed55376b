#!/usr/bin/env bash
# The profile the container image is built with (profile-guided optimization; BENCHMARKS.md,
# twenty-fourth pass): builds edgegate instrumented (-Cprofile-generate, a target folder of its
# own), serves the request sets of bench/load.sh with it on loopback (jwt-test with cache hits and
# with fresh ES256, RS256, EdDSA and legacy tokens, tokens under an unknown kid, /healthz), stops
# it, and merges the counts it wrote with the toolchain's llvm-profdata (the rustup component
# llvm-tools, added when missing) into OUT, gzip-compressed. The Dockerfile builds with the
# committed pgo/edgegate.profdata.gz; run this again (and commit its output) when the request
# path has changed, or the functions that changed lose their profile, one by one.
#
# usage: bench/pgo.sh [OUT]    (OUT: pgo/edgegate.profdata.gz)
# Prints how much of the new profile the committed one matches; with MIN_OVERLAP (a per cent;
# .ci/run sets it), fails below it, before writing OUT.
# PGO_BUILD_ONLY=1: the instrumented build alone (.ci/run makes it in the background while the
# tests run; the run after it finds the build fresh and goes straight to the load).
# Variables: SECS (3: seconds a set), CONNECTIONS (64), SERVER_PORT (0: any free one),
# SERVER_CPU, LOAD_CPU, HALT_POLL_NS (bench/lib.sh). Also leaves the profile uncompressed in $CARGO_TARGET_DIR/pgo/, for a local
# build like the image's:
#   RUSTFLAGS="-Cprofile-use=$PWD/target/pgo/edgegate.profdata" \
#     CARGO_TARGET_DIR=target/pgo-use cargo build --release --locked --bin edgegate
set -euo pipefail

SECS=${SECS:-3}
CONNECTIONS=${CONNECTIONS:-64}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
# 0: a port the kernel picks (start_inline reads it from the server's log), so a process left
# on a fixed port cannot stand in for the instrumented server; a port set here must be free.
SERVER_PORT=${SERVER_PORT:-0}

# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
OUT=${1:-$ROOT/pgo/edgegate.profdata.gz}
[ -n "${PGO_BUILD_ONLY:-}" ] || need_wrk

tools=$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin
if [ ! -x "$tools/llvm-profdata" ]; then
    log "adding the rustup component llvm-tools (llvm-profdata)"
    rustup component add llvm-tools >&2
fi

raw=$WORK/profraw
mkdir -p "$raw" "$CARGO_TARGET_DIR/pgo"
gen_target=$CARGO_TARGET_DIR/pgo-generate
# A fixed folder in the flags, so that a second run reuses the build; LLVM_PROFILE_FILE says
# where each process's counts go.
gen_flags="-Cprofile-generate=$gen_target/profraw"
log "building edgegate instrumented (target/pgo-generate)"
# The binary alone, as the Dockerfile builds it: built with an example, the dependencies take
# the dev-dependencies' features too and their code changes (measured: a profile made so and
# one of the binary alone overlapped by 25 %).
RUSTFLAGS=$gen_flags CARGO_TARGET_DIR=$gen_target \
    cargo build --release --locked --quiet --bin edgegate
if [ -n "${PGO_BUILD_ONLY:-}" ]; then
    log "PGO_BUILD_ONLY=1: $gen_target/release/edgegate built"
    exit 0
fi
# The tokens from the debug build of bench_tokens (35 s here; in CI the test command has built
# it already): a release one would be a second release build of every dependency.
cargo build --locked --quiet --example bench_tokens
"$CARGO_TARGET_DIR/debug/examples/bench_tokens" "$WORK/tokens" "$TOKEN_ISSUER" "$TOKEN_SECRET" \
    2000 60000 >/dev/null
TOK=$WORK/tokens

SERVER_ENV="LLVM_PROFILE_FILE=$raw/edgegate-%p.profraw" \
    start_inline "$gen_target/release/edgegate" info
sets="es256_one es256 hs256 rs256 es256_fresh rs256_fresh eddsa_fresh hs256_fresh random_kid"
for set in $sets; do
    echo "$set: $(drive "$SECS" "$CONNECTIONS" "$TOK/$set.txt")"
done
echo "healthz: $(drive "$SECS" "$CONNECTIONS" "$TOK/es256_one.txt" 0 /healthz)"
# The counts are written when the process exits: a graceful stop, then the file must be there.
kill -TERM "$SERVER_PID"
wait "$SERVER_PID" || { log "the instrumented server exited with status $?"; exit 1; }
shopt -s nullglob
profiles=("$raw"/*.profraw)
[ ${#profiles[@]} -eq 1 ] || { log "expected one .profraw, found ${#profiles[@]}"; exit 1; }

fresh=$CARGO_TARGET_DIR/pgo/edgegate.profdata
"$tools/llvm-profdata" merge -o "$fresh" "${profiles[@]}"
"$tools/llvm-profdata" show "$fresh" | tail -3

# How much of this profile the committed one still matches: llvm-profdata's edge overlap (the
# share of the counts, each function's weighed by its part of the whole, that both profiles
# give alike; a function whose code changed since the committed one was made counts nothing).
# Profiles of the same code came out at 99.5-99.7 %.
committed=$ROOT/pgo/edgegate.profdata.gz
if [ -f "$committed" ]; then
    gunzip -c "$committed" >"$WORK/committed.profdata"
    overlap=$("$tools/llvm-profdata" overlap "$WORK/committed.profdata" "$fresh" |
        sed -n 's/^ *Edge profile overlap: \([0-9.]*\)%$/\1/p')
    echo "pgo/edgegate.profdata.gz against this code's profile: edge overlap ${overlap:-?} %"
    if [ -n "${MIN_OVERLAP:-}" ] &&
        ! awk -v o="${overlap:-0}" -v m="$MIN_OVERLAP" 'BEGIN { exit !(o >= m) }'; then
        log "FAIL: the committed profile matches ${overlap:-?} % of this code's, under" \
            "MIN_OVERLAP=$MIN_OVERLAP %: run bench/pgo.sh and commit pgo/edgegate.profdata.gz"
        exit 1
    fi
fi

mkdir -p "$(dirname "$OUT")"
gzip -9 -n -c "$fresh" >"$OUT"
echo "wrote $OUT ($(wc -c <"$OUT") bytes)"
