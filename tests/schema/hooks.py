"""schemathesis hooks for tests/schema/run.sh: sign the Stripe and Twilio callbacks with the
providers' own libraries, so generated events and status callbacks get past the signature check
and reach the code that reads them. Secrets come from the environment run.sh sets."""

import hashlib
import hmac
import json
import os
import time

import schemathesis
import stripe
from twilio.request_validator import RequestValidator

STRIPE_PATH = "/functions/v1/stripe-webhook"
TWILIO_PATH = "/functions/v1/twilio-status"


@schemathesis.hook
def before_call(context, case, kwargs):
    path = case.operation.path
    # A case without the header tests its absence: leave it unsigned.
    headers = {name.lower() for name in (case.headers or {})}
    if path == STRIPE_PATH and "stripe-signature" in headers:
        sign_stripe(case)
    elif path == TWILIO_PATH and "x-twilio-signature" in headers:
        sign_twilio(case)


def sign_stripe(case):
    secret = os.environ["EDGEGATE_STRIPE_WEBHOOK_SECRET"]
    body = case.body
    if not isinstance(body, bytes):
        # JSON Schema counts 1.0 as an integer; Stripe never sends one, and edgegate (like
        # Stripe's own libraries) reads `created` as an integer only. Integers past IEEE-754
        # doubles are not interoperable (RFC 8259, section 6): edgegate refuses them 400.
        body = stripe_like_numbers(body)
        case.body = body
        # The bytes requests sends for `json=body`.
        try:
            body = json.dumps(body, allow_nan=False).encode()
        except (TypeError, ValueError):
            return  # no body, or one requests cannot send as JSON: left unsigned
    timestamp = int(time.time())
    try:
        header = stripe.WebhookSignature.generate_signature_header(
            body.decode("utf-8"), secret, timestamp=timestamp
        )
    except UnicodeDecodeError:
        # Stripe's library signs text only; bytes that are not UTF-8 (which Stripe never sends,
        # and edgegate must refuse 400 all the same) are signed by Stripe's documented scheme:
        # HMAC-SHA256 of "<timestamp>." and the raw body, under the endpoint's secret.
        mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
        header = f"t={timestamp},v1={mac.hexdigest()}"
    case.headers = {**case.headers, "Stripe-Signature": header}


I64_MAX = 2**63 - 1


def stripe_like_numbers(value):
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > I64_MAX:
        return I64_MAX if value > 0 else -I64_MAX
    if isinstance(value, dict):
        return {key: stripe_like_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [stripe_like_numbers(item) for item in value]
    return value


def sign_twilio(case):
    token = os.environ["EDGEGATE_TWILIO_AUTH_TOKEN"]
    public_url = os.environ["EDGEGATE_PUBLIC_URL"]
    body = case.body
    # Only a flat form of text values is sent as the same pairs that are signed.
    if not isinstance(body, dict) or not all(isinstance(v, str) for v in body.values()):
        return
    signature = RequestValidator(token).compute_signature(public_url + TWILIO_PATH, body)
    case.headers = {**case.headers, "X-Twilio-Signature": signature}
