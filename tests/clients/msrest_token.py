#!/usr/bin/env python3
"""Get a token with msrestazure's MSIAuthentication (what Azure ML's v1 SDK, azureml-core, authenticates
with), as a training script would.

Usage: python msrest_token.py msi RESOURCE [--client-id ID]

Nothing is read from any configuration: the environment decides the route. With MSI_ENDPOINT set,
msrestazure POSTs a form to it (Metadata: true); with APPSETTING_WEBSITE_SITE_NAME set too, it GETs
MSI_ENDPOINT/?resource=...&api-version=2017-09-01[&clientid=ID] with header `secret: $MSI_SECRET`.

Prints exactly one line of JSON to stdout and exits 0 (the contract of get_token.py):
  {"ok": true, "token": "...", "expires_on": 123, "second_equal": null}
  {"ok": false, "error_type": "ClassName", "error": "..."}
"""

import argparse
import json
import sys


def main():
    parser = argparse.ArgumentParser(prog="msrest_token.py")
    parser.add_argument("mode", choices=("msi",))
    parser.add_argument("resource")
    parser.add_argument("--client-id", dest="client_id")
    args = parser.parse_args()
    try:
        from msrestazure.azure_active_directory import MSIAuthentication

        kwargs = {"resource": args.resource}
        if args.client_id:
            kwargs["client_id"] = args.client_id
        credentials = MSIAuthentication(**kwargs)
        token = credentials.token
        result = {
            "ok": True,
            "token": token["access_token"],
            "expires_on": int(token["expires_on"]),
            "second_equal": None,
        }
    except Exception as e:  # noqa: BLE001 - every failure is reported as data
        result = {"ok": False, "error_type": type(e).__name__, "error": str(e)}
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
