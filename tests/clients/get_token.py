#!/usr/bin/env python3
"""Get a token with a real Azure SDK credential (azure-identity), as an application would.

Usage: python get_token.py MODE RESOURCE [--client-id ID] [--twice]

  MODE       mi            ManagedIdentityCredential()
             mi-client-id  ManagedIdentityCredential(client_id=ID)      (--client-id required)
             default       DefaultAzureCredential()  (with --client-id: managed_identity_client_id=ID)
  RESOURCE   e.g. https://storage.azure.com or https://management.core.windows.net/
             The scope requested is RESOURCE + "/.default" verbatim; azure-identity turns it back
             into the resource by stripping "/.default".
  --twice    call get_token a second time and report whether both tokens are equal.

Nothing is read from any configuration: the environment decides the route
(IDENTITY_ENDPOINT + IDENTITY_HEADER, or AZURE_POD_IDENTITY_AUTHORITY_HOST for IMDS).

Prints exactly one line of JSON to stdout and exits 0:
  {"ok": true, "token": "...", "expires_on": 123, "second_equal": true|false|null}
  {"ok": false, "error_type": "ClassName", "error": "..."}
Exits non-zero only on usage errors.
"""

import argparse
import json
import sys

MODES = ("mi", "mi-client-id", "default")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="get_token.py", description="Get a token with azure-identity.")
    parser.add_argument("mode", metavar="MODE", choices=MODES, help="one of: " + ", ".join(MODES))
    parser.add_argument("resource", metavar="RESOURCE", help="resource URI; the scope is RESOURCE + '/.default'")
    parser.add_argument("--client-id", dest="client_id", help="user-assigned identity client id")
    parser.add_argument("--twice", action="store_true", help="call get_token twice and compare the tokens")
    args = parser.parse_args(argv)
    if args.mode == "mi-client-id" and not args.client_id:
        parser.error("MODE mi-client-id requires --client-id")
    if args.mode == "mi" and args.client_id:
        parser.error("MODE mi takes no --client-id (use mi-client-id)")
    return args


def make_credential(mode, client_id):
    # Imported here so that an import problem is reported as an ok=false line, not a traceback.
    from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

    if mode == "mi":
        return ManagedIdentityCredential()
    if mode == "mi-client-id":
        return ManagedIdentityCredential(client_id=client_id)
    if client_id:
        return DefaultAzureCredential(managed_identity_client_id=client_id)
    return DefaultAzureCredential()


def run(args):
    scope = args.resource + "/.default"
    credential = make_credential(args.mode, args.client_id)
    try:
        first = credential.get_token(scope)
        second_equal = None
        if args.twice:
            second = credential.get_token(scope)
            second_equal = second.token == first.token
        return {"ok": True, "token": first.token, "expires_on": int(first.expires_on), "second_equal": second_equal}
    finally:
        close = getattr(credential, "close", None)
        if close is not None:
            close()


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = run(args)
    except Exception as e:  # noqa: BLE001 - every failure is reported as data
        result = {"ok": False, "error_type": type(e).__name__, "error": str(e)}
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
