"""The JWKS host for bench/load.sh: serves one file at /jwks.json with
`Cache-Control: public, max-age=600` and appends one line per fetch to a log, so the load
script can count how often each server fetched the keys."""

import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, jwks_path, fetch_log = int(sys.argv[1]), sys.argv[2], sys.argv[3]
with open(jwks_path, "rb") as f:
    body = f.read()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.split("?")[0] != "/jwks.json":
            self.send_error(404)
            return
        with open(fetch_log, "a") as log:
            log.write(f"{time.time():.3f} {self.headers.get('user-agent', '')}\n")
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("cache-control", "public, max-age=600")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
