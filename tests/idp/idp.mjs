// Test identity provider: panva/oidc-provider behind a tiny node:http wrapper that
//  * mounts it under an Entra-shaped prefix  /{tenant}/...
//      token:     POST /{tenant}/oauth2/v2.0/token
//      jwks:      GET  /{tenant}/discovery/v2.0/keys
//      discovery: GET  /{tenant}/v2.0/.well-known/openid-configuration  (and /{tenant}/.well-known/...)
//  * injects faults on demand (POST /__admin/fault) and logs every request (GET /__admin/requests)
//  * counts token requests (GET /__admin/stats -> {"token_requests": N}, reset by POST /__admin/reset)
// Env: IDP_PORT (default 9400), IDP_HOST (default 127.0.0.1), IDP_TENANT (default test-tenant),
//      CLIENT_CERT (PEM path; default ./keys/client.crt; if neither exists the certificate clients
//      broker-cert / broker-fed are not registered), TOKEN_TTL (s),
//      IDP_TLS_CERT + IDP_TLS_KEY (serve HTTPS instead of HTTP; MSAL refuses http:// authorities)
import http from 'node:http';
import https from 'node:https';
import fs from 'node:fs';
import crypto from 'node:crypto';
import Provider, { errors } from 'oidc-provider';

const PORT = Number(process.env.IDP_PORT || 9400);
const HOST = process.env.IDP_HOST || '127.0.0.1';
const TENANT = process.env.IDP_TENANT || 'test-tenant';
const TTL = Number(process.env.TOKEN_TTL || 3600);
const TLS = process.env.IDP_TLS_CERT ? { cert: fs.readFileSync(process.env.IDP_TLS_CERT), key: fs.readFileSync(process.env.IDP_TLS_KEY) } : null;
const BASE = `${TLS ? 'https' : 'http'}://${HOST.includes(':') ? `[${HOST}]` : HOST}:${PORT}`;
const ISSUER = `${BASE}/${TENANT}/v2.0`;

// Public key of the certificate client, as a JWK with x5c/x5t (what Entra stores for a cert credential).
// Optional: without CLIENT_CERT and without ./keys/client.crt only the secret clients are registered.
const defaultCert = new URL('./keys/client.crt', import.meta.url);
const certPath = process.env.CLIENT_CERT || (fs.existsSync(defaultCert) ? defaultCert : null);
let certJwk = null;
if (certPath) {
  const x509 = new crypto.X509Certificate(fs.readFileSync(certPath));
  certJwk = {
    ...x509.publicKey.export({ format: 'jwk' }),
    use: 'sig',
    x5c: [x509.raw.toString('base64')],
    x5t: crypto.createHash('sha1').update(x509.raw).digest('base64url'),
    'x5t#S256': crypto.createHash('sha256').update(x509.raw).digest('base64url'),
  };
}

// Accept Entra v2 style `scope=<resource>/.default` as well as RFC 8707 `resource=<resource>` (v1 style).
function resourceFromScope(scope) {
  const s = (scope || '').split(' ').find((x) => x.endsWith('/.default'));
  return s ? s.slice(0, -'/.default'.length) : undefined;
}

const provider = new Provider(ISSUER, {
  clients: [
    { client_id: 'broker-secret', client_secret: 'Sup3r~Secret.Value_1', token_endpoint_auth_method: 'client_secret_post',
      grant_types: ['client_credentials'], response_types: [], redirect_uris: [] },
    { client_id: 'broker-secret-2', client_secret: 'Second~Secret.Value_2', token_endpoint_auth_method: 'client_secret_post',
      grant_types: ['client_credentials'], response_types: [], redirect_uris: [] },
    ...(certJwk ? [
      { client_id: 'broker-fed', token_endpoint_auth_method: 'private_key_jwt',
        jwks: { keys: [certJwk] },
        grant_types: ['client_credentials'], response_types: [], redirect_uris: [] },
      { client_id: 'broker-cert', token_endpoint_auth_method: 'private_key_jwt',
        jwks: { keys: [certJwk] },
        grant_types: ['client_credentials'], response_types: [], redirect_uris: [] },
    ] : []),
  ],
  ttl: { ClientCredentials: TTL },
  clientAuthSigningAlgValues: ['RS256', 'PS256', 'ES256'],
  // Entra-like strictness (oidc-provider itself ignores x5t): the assertion header must name the registered
  // certificate by x5t (SHA-1) or x5t#S256 (SHA-256); base64url or padded base64 (MSAL Python sends the latter).
  assertJwtClientAuthClaimsAndHeader: async (ctx, claims, header, client) => {
    if (process.env.IDP_REQUIRE_X5T === '0' || client.tokenEndpointAuthMethod !== 'private_key_jwt') return;
    const norm = (v) => (typeof v === 'string' ? v.replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '') : v);
    if (norm(header.x5t) !== certJwk.x5t && norm(header['x5t#S256']) !== certJwk['x5t#S256']) {
      throw new errors.InvalidClientAuth('client_assertion header x5t / x5t#S256 does not match the registered certificate');
    }
  },
  routes: { token: '/oauth2/v2.0/token', jwks: '/discovery/v2.0/keys' },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: { enabled: true },
    resourceIndicators: {
      enabled: true,
      // Like Entra: client_credentials needs `scope=<resource>/.default` (or a v1-style `resource=`).
      defaultResource: (ctx) => {
        const { scope } = ctx.oidc.params;
        if (!scope) throw new errors.InvalidRequest("The request body must contain the following parameter: 'scope'.");
        const r = resourceFromScope(scope);
        if (!r) throw new errors.InvalidScope('scope must be <resource>/.default for the client credentials flow', scope);
        return r;
      },
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, resourceIndicator) => {
        if (resourceIndicator.includes('forbidden')) {
          throw new errors.InvalidTarget('resource not allowed for this client');
        }
        return {
          scope: `${resourceIndicator.replace(/\/$/, '')}/.default`,
          audience: resourceIndicator,
          accessTokenTTL: TTL,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'RS256' } },
        };
      },
    },
  },
  extraTokenClaims: (ctx, token) => ({ tid: TENANT, appid: token.clientId, azp: token.clientId }),
});
provider.on('server_error', (ctx, err) => console.error('server_error', err));
provider.on('grant.error', (ctx, err) => console.error('grant.error', err.error, err.error_description, err.error_detail || ''));
const app = provider.callback();

// ---- fault injection + request log ----
let faults = []; // FIFO applied to token requests only: {status, body, headers, delay_ms, drop, count}
let log = [];
let tokenRequests = 0; // POSTs to the token endpoint since the last reset, faulted ones included
function readBody(req) {
  return new Promise((resolve) => { const c = []; req.on('data', (d) => c.push(d)); req.on('end', () => resolve(Buffer.concat(c))); });
}

const handler = async (req, res) => {
  const url = new URL(req.url, BASE);
  if (url.pathname.startsWith('/__admin/')) {
    const body = await readBody(req);
    if (url.pathname === '/__admin/fault' && req.method === 'POST') {
      const f = JSON.parse(body.toString() || '{}');
      for (let i = 0; i < (f.count ?? 1); i++) faults.push(f);
      res.writeHead(204).end(); return;
    }
    if (url.pathname === '/__admin/reset') { faults = []; log = []; tokenRequests = 0; res.writeHead(204).end(); return; }
    if (url.pathname === '/__admin/stats') { res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ token_requests: tokenRequests })); return; }
    if (url.pathname === '/__admin/requests') { res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(log)); return; }
    res.writeHead(404).end(); return;
  }
  // Log every non-admin request; the consumed body is handed to oidc-provider as req.body below.
  const body = await readBody(req);
  log.push({ t: Date.now(), method: req.method, path: req.url, headers: req.headers, body: body.toString() });
  const isToken = url.pathname === `/${TENANT}/oauth2/v2.0/token`;
  if (isToken && req.method === 'POST') tokenRequests++;
  const f = isToken ? faults.shift() : undefined;
  if (f) {
    if (f.delay_ms) await new Promise((r) => setTimeout(r, f.delay_ms));
    if (f.drop) { req.socket.destroy(); return; }
    if (f.status) {
      const headers = { 'content-type': 'application/json', ...(f.headers || {}) };
      res.writeHead(f.status, headers).end(typeof f.body === 'string' ? f.body : JSON.stringify(f.body ?? { error: 'temporarily_unavailable', error_description: `injected ${f.status}` }));
      return;
    }
  }
  // Mount: strip /{tenant}; map the v2.0 discovery path onto oidc-provider's fixed discovery route.
  let inner;
  if (url.pathname === `/${TENANT}/v2.0/.well-known/openid-configuration`) inner = '/.well-known/openid-configuration';
  else if (url.pathname.startsWith(`/${TENANT}/`)) inner = url.pathname.slice(TENANT.length + 1);
  else { res.writeHead(404, { 'content-type': 'application/json' }).end('{"error":"not_found"}'); return; }
  req.originalUrl = `/${TENANT}${inner}${url.search}`; // oidc-provider derives its mount path from this
  req.url = `${inner}${url.search}`;
  req.body = body; // already consumed: oidc-provider falls back to req.body when req is no longer readable
  app(req, res);
};
const server = TLS ? https.createServer(TLS, handler) : http.createServer(handler);
server.listen(PORT, HOST, () => console.log(`IdP ready issuer=${ISSUER} token=${BASE}/${TENANT}/oauth2/v2.0/token cert_clients=${certJwk ? 'yes' : 'no'} pid=${process.pid}`));
