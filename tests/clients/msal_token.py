#!/usr/bin/env python3
"""Get a token with msal-python's ManagedIdentityClient directly (no azure-identity), as an application would.

Usage: python msal_token.py MODE RESOURCE [--client-id ID] [--twice]

  MODE       mi            ManagedIdentityClient(SystemAssignedManagedIdentity())
             mi-client-id  ManagedIdentityClient(UserAssignedManagedIdentity(client_id=ID))  (--client-id required)
  RESOURCE   e.g. https://storage.azure.com or https://management.core.windows.net/
             Passed verbatim as acquire_token_for_client(resource=RESOURCE) (msal takes a resource, not a scope).
  --twice    call acquire_token_for_client a second time (msal answers from its in-memory token cache)
             and report whether both tokens are equal.

Nothing is read from any configuration: the environment decides the route
(IDENTITY_ENDPOINT + IDENTITY_HEADER, or AZURE_POD_IDENTITY_AUTHORITY_HOST for IMDS).

Same contract as get_token.py. Prints exactly one line of JSON to stdout and exits 0:
  {"ok": true, "token": "...", "expires_on": 123, "second_equal": true|false|null}
  {"ok": false, "error_type": "...", "error": "..."}
expires_on is result["expires_on"] when msal gives it, else now + result["expires_in"].
On an msal error result, error_type is result["error"] (e.g. "invalid_request") and error is
result["error_description"]; on an exception, error_type is the exception's class name.
Exits non-zero only on usage errors.
"""

import argparse
import json
import sys
import time

MODES = ("mi", "mi-client-id")


class MsalError(Exception):
    """An msal result dict without an access token."""

    def __init__(self, result):
        self.error = str(result.get("error") or "unknown_error")
        super().__init__(str(result.get("error_description") or json.dumps(result)))


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="msal_token.py", description="Get a token with msal ManagedIdentityClient.")
    parser.add_argument("mode", metavar="MODE", choices=MODES, help="one of: " + ", ".join(MODES))
    parser.add_argument("resource", metavar="RESOURCE", help="resource URI, passed verbatim to msal")
    parser.add_argument("--client-id", dest="client_id", help="user-assigned identity client id")
    parser.add_argument("--twice", action="store_true", help="acquire twice and compare the tokens")
    args = parser.parse_args(argv)
    if args.mode == "mi-client-id" and not args.client_id:
        parser.error("MODE mi-client-id requires --client-id")
    if args.mode == "mi" and args.client_id:
        parser.error("MODE mi takes no --client-id (use mi-client-id)")
    return args


def make_client(mode, client_id, session):
    # Imported here so that an import problem is reported as an ok=false line, not a traceback.
    import msal

    if mode == "mi":
        identity = msal.SystemAssignedManagedIdentity()
    else:
        identity = msal.UserAssignedManagedIdentity(client_id=client_id)
    return msal.ManagedIdentityClient(identity, http_client=session)


def acquire(client, resource):
    result = client.acquire_token_for_client(resource=resource)
    if not result or "access_token" not in result:
        raise MsalError(result or {})
    return result


def run(args):
    import requests

    with requests.Session() as session:
        client = make_client(args.mode, args.client_id, session)
        first = acquire(client, args.resource)
        if "expires_on" in first:
            expires_on = int(first["expires_on"])
        else:
            expires_on = int(time.time() + int(first["expires_in"]))
        second_equal = None
        if args.twice:
            second = acquire(client, args.resource)
            second_equal = second["access_token"] == first["access_token"]
        return {"ok": True, "token": first["access_token"], "expires_on": expires_on, "second_equal": second_equal}


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = run(args)
    except MsalError as e:
        result = {"ok": False, "error_type": e.error, "error": str(e)}
    except Exception as e:  # noqa: BLE001 - every failure is reported as data
        result = {"ok": False, "error_type": type(e).__name__, "error": str(e)}
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
