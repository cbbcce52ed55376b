"""A local OTLP/HTTP collector for bench/otel.sh: answers 200 (an empty protobuf
ExportTraceServiceResponse) to every POST and counts requests and bytes, printed on SIGTERM.
Loopback only.

usage: python3 bench/otlp_sink.py PORT COUNT_FILE
"""

import http.server
import signal
import sys

port, count_file = int(sys.argv[1]), sys.argv[2]
posts = 0
received = 0


class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        global posts, received
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        posts += 1
        received += len(body)
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def stop(*_):
    with open(count_file, "w") as out:
        out.write(f"posts={posts} bytes={received}\n")
    sys.exit(0)


signal.signal(signal.SIGTERM, stop)
http.server.ThreadingHTTPServer(("127.0.0.1", port), Sink).serve_forever()
