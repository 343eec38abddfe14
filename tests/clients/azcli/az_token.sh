#!/usr/bin/env bash
# Get a token with the real Azure CLI (`az login --identity`), as a script on an Azure VM would.
#
# Usage: az_token.sh MODE RESOURCE [--client-id ID]
#
#   MODE       mi            az login --identity
#              mi-client-id  az login --identity --client-id ID        (--client-id required)
#   RESOURCE   e.g. https://management.azure.com/ (az account get-access-token --resource RESOURCE)
#
# Environment (required):
#   TOKEND_AZ          the az executable (scripts/test.sh: .venv-azcli/bin/az)
#   ARM_URL            the resource-manager endpoint, e.g. https://127.0.0.1:PORT/ (arm_stub.py)
#   AZURE_CONFIG_DIR   a fresh, private Azure CLI configuration directory
# plus the route variables the managed-identity client reads (IDENTITY_ENDPOINT + IDENTITY_HEADER, or
# AZURE_POD_IDENTITY_AUTHORITY_HOST for IMDS) and REQUESTS_CA_BUNDLE for ARM_URL's certificate.
#
# After the token, `az login` lists subscriptions and tenants at the cloud's resource manager. To keep
# that offline, a custom cloud whose resource manager is ARM_URL is registered and selected, only
# inside AZURE_CONFIG_DIR. Its Entra ID endpoints stay the public ones; they are never contacted for a
# managed identity.
#
# Prints exactly one line of JSON to stdout and exits 0 (the contract of tests/clients/get_token.py):
#   {"ok": true, "token": "...", "expires_on": 123, "second_equal": null}
#   {"ok": false, "error_type": "az", "error": "<failed command and the tail of its stderr>"}
# Exits 2 only on usage errors.
set -uo pipefail

usage() {
    printf 'usage: %s mi|mi-client-id RESOURCE [--client-id ID]\n%s\n' "${0##*/}" "$*" >&2
    exit 2
}

# ---- arguments and environment --------------------------------------------------------------------
[[ $# -ge 2 ]] || usage "MODE and RESOURCE are required"
MODE=$1
RESOURCE=$2
shift 2
CLIENT_ID=
while [[ $# -gt 0 ]]; do
    case $1 in
        --client-id)
            [[ $# -ge 2 && -n $2 ]] || usage "--client-id needs a value"
            CLIENT_ID=$2
            shift 2
            ;;
        *) usage "unknown argument: $1" ;;
    esac
done
case $MODE in
    mi) [[ -z $CLIENT_ID ]] || usage "MODE mi takes no --client-id (use mi-client-id)" ;;
    mi-client-id) [[ -n $CLIENT_ID ]] || usage "MODE mi-client-id requires --client-id" ;;
    *) usage "unknown MODE: $MODE" ;;
esac
[[ -n ${TOKEND_AZ:-} ]] || usage "TOKEND_AZ (the az executable) is not set"
[[ -n ${ARM_URL:-} ]] || usage "ARM_URL (the resource-manager endpoint) is not set"
# Never register the test cloud in the user's own ~/.azure.
[[ -n ${AZURE_CONFIG_DIR:-} ]] || usage "AZURE_CONFIG_DIR (a fresh directory) is not set"

export AZURE_CORE_COLLECT_TELEMETRY=false
export AZURE_CORE_SURVEY_MESSAGE=false
export AZURE_CORE_NO_COLOR=true
export AZURE_CORE_ONLY_SHOW_ERRORS=true

# ---- JSON output -------------------------------------------------------------------------------------
# A JSON string literal: backslash, quote, newline, CR and tab escaped, other control characters dropped.
json_str() {
    local s=$1
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\n'/\\n}
    s=${s//$'\r'/\\r}
    s=${s//$'\t'/\\t}
    s=$(printf '%s' "$s" | tr -d '\000-\010\013\014\016-\037')
    printf '"%s"' "$s"
}

# The one output line goes to fd 3, the script's stdout, whatever a step's stdout is redirected to.
exec 3>&1
fail() {
    printf '{"ok": false, "error_type": "az", "error": %s}\n' "$(json_str "$*")" >&3
    exit 0
}

TMP=$(mktemp -d) || fail "mktemp -d failed"
trap 'rm -rf "$TMP"' EXIT
ERR=$TMP/stderr

# Runs az with the given arguments; its stdout is the function's stdout. On failure: the ok=false line.
az_run() {
    local out rc
    out=$("$TOKEND_AZ" "$@" --only-show-errors 2>"$ERR")
    rc=$?
    if [[ $rc -ne 0 ]]; then
        fail "az $* (exit $rc): $(tail -n 20 "$ERR")"
    fi
    printf '%s' "$out"
}

# ---- the Azure CLI ----------------------------------------------------------------------------------
# Each step runs in this shell (not a command substitution) where `fail` must end the script.
az_run cloud register -n LocalArm --skip-endpoint-discovery \
    --endpoint-resource-manager "$ARM_URL" \
    --endpoint-active-directory https://login.microsoftonline.com \
    --endpoint-active-directory-resource-id https://management.core.windows.net/ >/dev/null
az_run cloud set -n LocalArm >/dev/null

LOGIN=(login --identity --allow-no-subscriptions)
[[ -n $CLIENT_ID ]] && LOGIN+=(--client-id "$CLIENT_ID")
az_run "${LOGIN[@]}" >/dev/null

az_run account get-access-token --resource "$RESOURCE" --query '[accessToken, expires_on]' -o tsv >"$TMP/token"
TOKEN= EXPIRES_ON=
{ read -r TOKEN && read -r EXPIRES_ON; } <"$TMP/token"
[[ $TOKEN =~ ^[A-Za-z0-9._~+/=-]+$ ]] || fail "az account get-access-token printed no token"
[[ $EXPIRES_ON =~ ^[0-9]+$ ]] || fail "az account get-access-token printed no integer expires_on: $EXPIRES_ON"
printf '{"ok": true, "token": "%s", "expires_on": %s, "second_equal": null}\n' "$TOKEN" "$EXPIRES_ON" >&3
