#!/usr/bin/env node
// Get a token with a real Azure SDK credential (@azure/identity for JavaScript), as an application would.
//
// Usage: node get_token.mjs MODE RESOURCE [--client-id ID] [--twice]
//
//   MODE       mi            new ManagedIdentityCredential()
//              mi-client-id  new ManagedIdentityCredential({ clientId: ID })   (--client-id required)
//              default       new DefaultAzureCredential()  (with --client-id: { managedIdentityClientId: ID })
//   RESOURCE   e.g. https://storage.azure.com or https://management.core.windows.net/
//              The scope requested is RESOURCE + "/.default" verbatim; @azure/identity turns it back
//              into the resource by stripping "/.default".
//   --twice    call getToken a second time and report whether both tokens are equal.
//
// Nothing is read from any configuration: the environment decides the route
// (IDENTITY_ENDPOINT + IDENTITY_HEADER, or AZURE_POD_IDENTITY_AUTHORITY_HOST for IMDS).
//
// Same contract as tests/clients/get_token.py. Prints exactly one line of JSON to stdout and exits 0:
//   {"ok": true, "token": "...", "expires_on": 123, "second_equal": true|false|null}
//   {"ok": false, "error_type": "ClassName", "error": "..."}
// Exits non-zero (2) only on usage errors.

const MODES = ["mi", "mi-client-id", "default"];
const USAGE = "usage: get_token.mjs MODE RESOURCE [--client-id ID] [--twice]\n" + `  MODE is one of: ${MODES.join(", ")}\n`;

function usageError(message) {
    process.stderr.write(USAGE + `get_token.mjs: error: ${message}\n`);
    process.exit(2);
}

function parseArgs(argv) {
    const positional = [];
    let clientId;
    let twice = false;
    for (let i = 0; i < argv.length; i++) {
        const arg = argv[i];
        if (arg === "--twice") {
            twice = true;
        } else if (arg === "--client-id") {
            if (i + 1 >= argv.length) usageError("argument --client-id: expected one argument");
            clientId = argv[++i];
        } else if (arg.startsWith("--client-id=")) {
            clientId = arg.slice("--client-id=".length);
        } else if (arg === "-h" || arg === "--help") {
            process.stdout.write(USAGE);
            process.exit(0);
        } else if (arg.startsWith("-") && arg.length > 1) {
            usageError(`unrecognized argument: ${arg}`);
        } else {
            positional.push(arg);
        }
    }
    if (positional.length !== 2) usageError("expected exactly two arguments: MODE RESOURCE");
    const [mode, resource] = positional;
    if (!MODES.includes(mode)) usageError(`argument MODE: invalid choice: '${mode}' (choose from ${MODES.join(", ")})`);
    if (mode === "mi-client-id" && !clientId) usageError("MODE mi-client-id requires --client-id");
    if (mode === "mi" && clientId) usageError("MODE mi takes no --client-id (use mi-client-id)");
    return { mode, resource, clientId, twice };
}

async function makeCredential(mode, clientId) {
    // Imported here so that an import problem is reported as an ok=false line, not a stack trace.
    const { DefaultAzureCredential, ManagedIdentityCredential } = await import("@azure/identity");
    if (mode === "mi") return new ManagedIdentityCredential();
    if (mode === "mi-client-id") return new ManagedIdentityCredential({ clientId });
    if (clientId) return new DefaultAzureCredential({ managedIdentityClientId: clientId });
    return new DefaultAzureCredential();
}

async function run(args) {
    const scope = args.resource + "/.default";
    const credential = await makeCredential(args.mode, args.clientId);
    const first = await credential.getToken(scope);
    if (!first) throw new Error("getToken returned null");
    let secondEqual = null;
    if (args.twice) {
        const second = await credential.getToken(scope);
        secondEqual = second !== null && second.token === first.token;
    }
    return {
        ok: true,
        token: first.token,
        expires_on: Math.floor(first.expiresOnTimestamp / 1000),
        second_equal: secondEqual,
    };
}

function errorType(e) {
    if (e && typeof e === "object") {
        if (typeof e.name === "string" && e.name && e.name !== "Error") return e.name;
        if (e.constructor && e.constructor.name) return e.constructor.name;
    }
    return typeof e;
}

async function main() {
    const args = parseArgs(process.argv.slice(2));
    let result;
    try {
        result = await run(args);
    } catch (e) {
        // every failure is reported as data
        result = { ok: false, error_type: errorType(e), error: e && e.message !== undefined ? String(e.message) : String(e) };
    }
    // Exit explicitly once the line is flushed: keep-alive sockets must not keep the process alive.
    process.stdout.write(JSON.stringify(result) + "\n", () => process.exit(0));
}

main();
