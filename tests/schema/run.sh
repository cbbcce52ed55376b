#!/usr/bin/env bash
# Schema-driven testing: starts the debug binary on a free loopback port and runs schemathesis
# against its own /openapi.json, every route, bounded examples. Stripe and Twilio send nothing
# out: Stripe's API key stays unset (sync answers its documented 503 NOT_CONFIGURED) and Twilio's
# API base is a closed loopback port (send-sms answers 502 UPSTREAM_UNAVAILABLE once a body passes
# validation).
# Usage: tests/schema/run.sh [extra schemathesis options]; EDGEGATE_BIN overrides the binary.
set -euo pipefail
cd "$(dirname "$0")/../.."
# `bounded`: schemathesis's bound, which a TERM to this script (.ci/run's bound) also stops.
source .ci/bounded.sh

# The interpreter .ci/run installed schemathesis into (pinned there: schemathesis==4.32.5).
if ! python3 -c 'import schemathesis, stripe, twilio, openapi_spec_validator' 2>/dev/null; then
    echo "schemathesis, openapi-spec-validator and the providers' libraries (which sign the" \
        "callbacks) are not all installed: python3 -m pip install schemathesis==4.32.5" \
        "openapi-spec-validator==0.9.0 stripe==16.1.0 twilio==9.13.0" >&2
    exit 1
fi

# The committed document (which tests/it/openapi.rs keeps equal to the served one) against the
# OpenAPI 3.1 specification first: schemathesis tolerates some invalid documents (a shared
# operationId) that client generators refuse.
python3 -m openapi_spec_validator docs/openapi.json

if [ -z "${EDGEGATE_BIN:-}" ]; then
    cargo build --locked --quiet
fi
BIN=$(realpath "${EDGEGATE_BIN:-target/debug/edgegate}")
WORK=$(mktemp -d)
SERVER_PID=
cleanup() {
    if [ -n "$SERVER_PID" ]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

random_hex() { head -c "$1" /dev/urandom | od -An -tx1 | tr -d ' \n'; }
# Read by schemathesis.toml's [auth.openapi.*]: the secret API key and a legacy service_role JWT.
export EDGEGATE_SECRET_KEY="sb_secret_schemathesis_$(random_hex 12)"
LEGACY_SECRET="schemathesis-legacy-secret-$(random_hex 16)"
EDGEGATE_LEGACY_TOKEN=$(cd "$WORK" && env -i PATH="$PATH" SUPABASE_JWT_SECRET="$LEGACY_SECRET" \
    "$BIN" token mint --role service_role --ttl 1h --legacy)
export EDGEGATE_LEGACY_TOKEN
# Read by hooks.py, which signs the provider callbacks.
export EDGEGATE_STRIPE_WEBHOOK_SECRET="whsec_schemathesis_$(random_hex 12)"
export EDGEGATE_TWILIO_AUTH_TOKEN="schemathesis_twilio_$(random_hex 12)"
export EDGEGATE_PUBLIC_URL="https://edgegate.invalid"
# Only what the run needs: a legacy secret and a secret API key, so the credential layer is
# exercised; the two signature secrets, so the callback routes check signatures; Twilio pointed
# at nothing. It runs in the scratch folder so no `.env` of the checkout is read.
(cd "$WORK" && exec env -i PATH="$PATH" HOME="${HOME:-/tmp}" \
    HOST=127.0.0.1 PORT=0 LOG_FORMAT=json RUST_LOG=info \
    DATABASE_URL="sqlite://$WORK/edgegate.db" \
    SUPABASE_JWT_SECRET="$LEGACY_SECRET" \
    SUPABASE_SECRET_KEYS="{\"default\":\"$EDGEGATE_SECRET_KEY\"}" \
    STRIPE_WEBHOOK_SECRET="$EDGEGATE_STRIPE_WEBHOOK_SECRET" \
    TWILIO_ACCOUNT_SID="AC0123456789abcdef0123456789abcdef" \
    TWILIO_AUTH_TOKEN="$EDGEGATE_TWILIO_AUTH_TOKEN" \
    TWILIO_FROM_NUMBER="+15005550006" \
    TWILIO_API_BASE="http://127.0.0.1:9" \
    PUBLIC_URL="$EDGEGATE_PUBLIC_URL" \
    "$BIN" serve) >"$WORK/server.log" 2>&1 &
SERVER_PID=$!

# The binary logs its bound address; wait for it (bounded: 30 s).
URL=
for _ in $(seq 1 300); do
    URL=$(python3 - "$WORK/server.log" <<'PY'
import json, sys
for line in open(sys.argv[1], errors="replace"):
    try:
        entry = json.loads(line)
    except ValueError:
        continue
    address = entry.get("fields", {}).get("address") or entry.get("address")
    if address:
        print(f"http://{address}")
        break
PY
)
    [ -n "$URL" ] && break
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log" >&2; echo "edgegate exited early" >&2; exit 1; }
    sleep 0.1
done
[ -n "$URL" ] || { cat "$WORK/server.log" >&2; echo "edgegate did not report its address within 30 s" >&2; exit 1; }
echo "edgegate under test at $URL"

status=0
# One worker: with two, CPython 3.11's ast module (used by Hypothesis to describe strategies)
# sometimes fails with "AST constructor recursion depth mismatch" when two threads parse at once.
# Every check runs (schemathesis's default; `--checks all` would override schemathesis.toml's
# per-route exceptions).
PYTHONPATH="tests/schema${PYTHONPATH:+:$PYTHONPATH}" SCHEMATHESIS_HOOKS=hooks \
    bounded 600 python3 -m schemathesis.cli --config-file tests/schema/schemathesis.toml run "$URL/openapi.json" \
    --max-examples "${SCHEMATHESIS_MAX_EXAMPLES:-25}" \
    --request-timeout 10 \
    --workers 1 \
    --suppress-health-check all \
    "$@" || status=$?
# What the run exercised: answers per route and status, from edgegate's own counters.
python3 - "$URL/metrics" <<'PY' || true
import sys, urllib.request
text = urllib.request.urlopen(sys.argv[1], timeout=10).read().decode()
print("answers by route and status (edgegate_http_requests):")
for line in text.splitlines():
    if line.startswith("edgegate_http_requests_total{"):
        print("  " + line)
PY
if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "edgegate died during the run" >&2
    status=1
fi
# A 5xx the document allows (503, 502) is logged by the trace layer as a failed response; an
# internal error or a panic is a finding whatever the status.
if grep -E '"message":"internal error"|panicked at' "$WORK/server.log" >&2; then
    echo "edgegate logged an internal error or a panic during the run (above)" >&2
    status=1
fi
exit "$status"
