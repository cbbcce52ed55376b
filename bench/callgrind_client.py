"""Sends exactly COUNT GET requests to 127.0.0.1:PORT/PATH on one keep-alive connection, each
with a bearer token taken in turn from TOKEN_FILE starting at line SKIP, and fails unless every
answer is 200. With --wait, first waits (bounded) for the server to answer. CLIENT_INFO, when
set, is sent as `x-client-info` with every request.

usage: callgrind_client.py PORT PATH TOKEN_FILE COUNT SKIP [--wait]
"""

import http.client
import os
import sys
import time

port, path, token_file, count, skip = sys.argv[1:6]
count, skip = int(count), int(skip)
tokens = [line.strip() for line in open(token_file) if line.strip()]

if "--wait" in sys.argv:
    # valgrind starts the server slowly; two minutes at most.
    deadline = time.monotonic() + 120
    while True:
        try:
            probe = http.client.HTTPConnection("127.0.0.1", int(port), timeout=10)
            probe.request("GET", "/healthz")
            probe.getresponse().read()
            probe.close()
            break
        except OSError:
            if time.monotonic() > deadline:
                sys.exit("the server did not answer within two minutes")
            time.sleep(0.2)

conn = http.client.HTTPConnection("127.0.0.1", int(port), timeout=60)
for i in range(count):
    token = tokens[(skip + i) % len(tokens)]
    headers = {"Authorization": f"Bearer {token}"}
    if os.environ.get("CLIENT_INFO"):
        headers["x-client-info"] = os.environ["CLIENT_INFO"]
    conn.request("GET", path, headers=headers)
    response = conn.getresponse()
    body = response.read()
    if response.status != 200:
        sys.exit(f"request {i}: {response.status} {body[:200]!r}")
conn.close()
