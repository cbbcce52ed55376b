#!/usr/bin/env bash
# Where a fresh-token request's time goes inside the server: the signature check's own time
# (perf samples in the crypto code x the server's CPU time a request), beside /healthz's CPU
# time, so that a fresh request's cost splits into floor, check, and the rest.
#
# usage: bench/check_share.sh [EDGEGATE_BIN]    (default: target/release/edgegate, built here)
#
# The server runs on SERVER_CPU with the tokens' keys inline, wrk on LOAD_CPU (64 connections,
# DURATION seconds a scenario after 2 s of warm-up, loopback only); `perf record -e cpu-clock`
# samples the server during each run (cycles are not counted in these virtual machines).
# Samples count as the check when their symbol is aws-lc's or s2n-bignum's arithmetic for
# P-256, RSA or Ed25519 (SHA-512 included, which Ed25519 uses); SHA-256 is left out, as the
# cache key's hash would be counted with the signing input's. Set HALT_POLL_NS (bench/lib.sh)
# as for load.sh.
# Output: a line a scenario: requests, CPU µs a request (user + system), the check's share of
# the samples, and the check's µs a request.
# Variables: DURATION (5), SERVER_PORT, SERVER_CPU, LOAD_CPU, HALT_POLL_NS.
set -euo pipefail

DURATION=${DURATION:-5}
SERVER_PORT=${SERVER_PORT:-18841}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}

# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
start_sampling "$@"
for scenario in healthz es256_fresh rs256_fresh eddsa_fresh; do
    sample "$scenario" "$WORK/perf.data"
    requests=$SAMPLED_REQUESTS cpu_us=$SAMPLED_CPU_US
    share=$(perf report -q -i "$WORK/perf.data" --sort symbol --stdio 2>/dev/null | python3 -c '
import re
import sys

CHECK = re.compile(r"edwards25519|bignum|aws_lc|ecp_nistz|bn_|rsaz|x25519|ed25519|ED25519|sha512|SHA512|p256|ecdsa|ECDSA|RSA|EVP")
total = 0.0
for line in sys.stdin:
    match = re.match(r"\s*([\d.]+)%\s+\[\S+\]\s+(\S+)", line)
    if match and CHECK.search(match.group(2)) and not re.search(r"sha256|SHA256", match.group(2)):
        total += float(match.group(1))
print(f"{total:.1f}")')
    printf '%s\trequests=%s\tcpu_us=%s\tcheck_share=%s%%\tcheck_us=%s\n' "$scenario" "$requests" \
        "$cpu_us" "$share" "$(awk -v c="$cpu_us" -v s="$share" 'BEGIN {printf "%.1f", c * s / 100}')"
done
