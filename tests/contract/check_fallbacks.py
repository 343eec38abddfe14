"""The responses schemathesis does not validate, checked against docs/openapi.yaml.

schemathesis checks every response of the documented GET operations. It also sends other methods, but
checks only their status and `Allow` header, and it never asks for an unknown path, sends HEAD or a
foreign `Host`. This script does, and validates each answer against the spec's own components:

- another method on every path: 405 `*MethodNotAllowed` (with `Allow`; POST is served under `/msi/`);
- unknown paths: 404 `*NotFound`;
- a `Host` that is not loopback on the token paths: 400 `*BadRequest`;
- a request target over 8 KiB, headers over 16 KiB, on every path: 414 `*UriTooLong`, 431 `*HeadersTooLarge`;
- HEAD on every path: the status of GET, an empty body.

Usage: TOKEND_IDENTITY_HEADER=<secret> check_fallbacks.py SPEC HOST:PORT. Prints each mismatch and a
count; exits 1 on a mismatch. Needs PyYAML and jsonschema_rs (both come with schemathesis, pinned in
tests/contract/requirements.lock).
"""

import http.client
import json
import os
import socket
import sys

import jsonschema_rs
import yaml

OTHER_METHODS = ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"]
UNKNOWN_PATHS = [
    "/",
    "/nope",
    "/metadata/identity/oauth2",
    "/metadata/identity/oauth2/token//",
    "/healthz/",
    "/msi/",
    "/msi/nope",
    "/msi/token///",
]


def main() -> int:
    spec_path, address = sys.argv[1:3]
    identity_header = os.environ["TOKEND_IDENTITY_HEADER"]
    with open(spec_path, encoding="utf-8") as f:
        spec = yaml.safe_load(f)
    components = spec["components"]
    failures = []
    checked = 0

    def request(method, path, headers=None):
        conn = http.client.HTTPConnection(address, timeout=10)
        # skip_host: the Host header is ours to choose (127.0.0.1:PORT unless a test overrides it).
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        headers = {"Host": address, **(headers or {})}
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        return resp, body

    def head(path, headers):
        """HEAD over a bare socket (http.client would not read a body a HEAD answer must not have):
        the status and whatever follows the response head."""
        host, port = address.rsplit(":", 1)
        lines = [f"HEAD {path} HTTP/1.1", f"Host: {address}", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        status_line, _, rest = answer.partition(b"\r\n")
        _, _, after_head = rest.partition(b"\r\n\r\n")
        return int(status_line.split()[1]), after_head

    def fail(what, why):
        failures.append(f"{what}: {why}")
        print(f"FAIL {what}: {why}")

    def check(what, resp, body, status, component):
        """The response is `status` and conforms to components.responses[component]."""
        nonlocal checked
        checked += 1
        definition = components["responses"][component]
        if resp.status != status:
            return fail(what, f"status {resp.status}, documented {status} ({component}); body {body[:300]!r}")
        for name, header in definition.get("headers", {}).items():
            if "$ref" in header:
                header = components["headers"][header["$ref"].rsplit("/", 1)[1]]
            value = resp.getheader(name)
            if value is None:
                if header.get("required"):
                    fail(what, f"header {name} is missing")
                continue
            if header["schema"].get("type") == "integer":
                try:
                    value = int(value)
                except ValueError:
                    fail(what, f"header {name}: {value!r} is not an integer")
                    continue
            for error in jsonschema_rs.validator_for(header["schema"]).iter_errors(value):
                fail(what, f"header {name}: {error.message}")
        for media_type in definition.get("content", {}):
            if not (resp.getheader("Content-Type") or "").startswith(media_type):
                fail(what, f"Content-Type {resp.getheader('Content-Type')!r}, documented {media_type}")
                continue
            try:
                instance = json.loads(body)
            except ValueError as e:
                fail(what, f"body is not JSON ({e}): {body[:300]!r}")
                continue
            pointer = f"#/components/responses/{component}/content/{media_type.replace('/', '~1')}/schema"
            validator = jsonschema_rs.validator_for({"$ref": pointer, "components": components})
            for error in validator.iter_errors(instance):
                fail(what, f"body {instance}: {error.message} at {list(error.instance_path)}")

    def dialect(path):
        return "AppService" if path.startswith("/msi/") else "Imds"

    for path in spec["paths"]:
        for method in OTHER_METHODS:
            if method.lower() in spec["paths"][path]:
                continue
            resp, body = request(method, path)
            check(f"{method} {path}", resp, body, 405, f"{dialect(path)}MethodNotAllowed")

    for path in UNKNOWN_PATHS:
        for method in ["GET", "POST"]:
            resp, body = request(method, path)
            check(f"{method} {path}", resp, body, 404, f"{dialect(path)}NotFound")

    resource = "resource=https://management.azure.com/"
    good = {
        "/metadata/identity/oauth2/token": (f"?api-version=2018-02-01&{resource}", {"Metadata": "true"}),
        "/msi/token": (f"?api-version=2019-08-01&{resource}", {"X-IDENTITY-HEADER": identity_header}),
    }
    for path in spec["paths"]:
        query, headers = good.get(path.rstrip("/"), ("", {}))
        if query:
            # IP literals are answered (a rebinding request always carries a DNS name); see docs/security.md.
            for host in ["evil.example", "evil.example:80", "127.0.0.1.nip.io", "10.0.0.1.nip.io"]:
                resp, body = request("GET", path + query, {**headers, "Host": host})
                check(f"GET {path} (Host: {host})", resp, body, 400, f"{dialect(path)}BadRequest")
        long_query = (query or "?") + "&x=" + "a" * 9000
        resp, body = request("GET", path + long_query, headers)
        check(f"GET {path}?...(9 KiB)", resp, body, 414, f"{dialect(path)}UriTooLong")
        resp, body = request("GET", path + query, {**headers, "X-Junk": "b" * 17000})
        check(f"GET {path} (17 KiB of headers)", resp, body, 431, f"{dialect(path)}HeadersTooLarge")
        get, _ = request("GET", path + query, headers)
        head_status, head_body = head(path + query, headers)
        checked += 1
        if head_status != get.status or head_body:
            fail(f"HEAD {path}", f"{head_status} with {len(head_body)} body bytes; GET answered {get.status}")

    print(f"{checked} responses checked, {len(failures)} problems")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
