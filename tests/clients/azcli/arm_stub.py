#!/usr/bin/env python3
"""A minimal stand-in for Azure Resource Manager, so that `az login --identity` works offline.

Usage: python3 arm_stub.py --port PORT --cert tls.crt --key tls.key [--host 127.0.0.1]

After `az login --identity` has its token (from tokend), the Azure CLI lists the subscriptions and
tenants of the identity at the cloud's resource-manager endpoint. Registered as that endpoint of a
custom cloud (see az_token.sh), this server answers:

  GET /subscriptions[?...]   200 {"value": []}
  GET /tenants[?...]         200 {"value": []}
  anything else              404

over HTTPS with the given certificate (python stdlib only). It never checks the bearer token. One
line per request goes to stderr. When it listens, it prints exactly one line `ready` to stdout.
"""

import argparse
import json
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

EMPTY_LIST = json.dumps({"value": []}).encode()
NOT_FOUND = json.dumps(
    {"error": {"code": "NotFound", "message": "arm_stub.py serves only GET /subscriptions and /tenants"}}
).encode()
LISTS = ("/subscriptions", "/tenants")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "arm-stub"

    def do_GET(self):  # noqa: N802 - http.server's naming
        path = "/" + urlsplit(self.path).path.strip("/")
        if path in LISTS:
            self.reply(200, EMPTY_LIST, "application/json")
        else:
            self.reply(404, NOT_FOUND, "application/json")

    def reply(self, status, body, content_type):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class TlsServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr, context):
        self.context = context
        super().__init__(addr, Handler)

    def get_request(self):
        sock, addr = self.socket.accept()
        # The TLS handshake runs in the request's thread (finish_request), not in the accept loop.
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def finish_request(self, request, client_address):
        try:
            request.settimeout(30)
            request.do_handshake()
        except (ssl.SSLError, OSError) as e:
            sys.stderr.write(f"TLS handshake with {client_address[0]} failed: {e}\n")
            return
        super().finish_request(request, client_address)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="arm_stub.py", description="Serve empty ARM lists over HTTPS.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True, help="PEM server certificate (chain)")
    parser.add_argument("--key", required=True, help="PEM private key")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    server = TlsServer((args.host, args.port), context)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
