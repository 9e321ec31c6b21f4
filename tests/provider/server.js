// A real OpenID provider (node oidc-provider, OpenID Certified) on 127.0.0.1,
// standing in for Compozy Cloud in the tests and the README's demo.
//
// Usage: node server.js [--port 0] [--access-token-ttl 3600] [--refresh-token-ttl 1209600]
//                       [--device-code-ttl 600]
//
// stdout carries one JSON object per line and never a token value:
//   {"event":"ready","issuer":"http://127.0.0.1:PORT"}
//   {"event":"token","grant_type":"refresh_token","status":200}    one per token-endpoint call
//   {"event":"revocation","status":200} / {"event":"device_authorization","status":200}
// oidc-provider's development warnings go to stderr.

import http from 'node:http';
import { parseArgs } from 'node:util';

import Provider, { errors } from 'oidc-provider';

const { values: options } = parseArgs({
  options: {
    port: { type: 'string', default: '0' },
    'access-token-ttl': { type: 'string', default: '3600' },
    'refresh-token-ttl': { type: 'string', default: '1209600' },
    'device-code-ttl': { type: 'string', default: '600' },
  },
});
const accessTokenTTL = Number(options['access-token-ttl']);
const refreshTokenTTL = Number(options['refresh-token-ttl']);
const deviceCodeTTL = Number(options['device-code-ttl']);

// The API the CLI's tokens are for (RFC 8707 resource indicator).
const API = 'https://api.compozy.dev';
const API_SCOPES = 'compozy:read compozy:write compozy:deploy';

const ACCOUNTS = {
  alice: { email: 'alice@example.test', name: 'Alice Example' },
  bob: { email: 'bob@example.test', name: 'Bob Example' },
};

function emit(event) {
  process.stdout.write(`${JSON.stringify(event)}\n`);
}

const server = http.createServer();
await new Promise((resolve) => { server.listen(Number(options.port), '127.0.0.1', resolve); });
const { port } = server.address();
const issuer = `http://127.0.0.1:${port}`;

const provider = new Provider(issuer, {
  clients: [{
    client_id: 'compozy-cli',
    application_type: 'native',
    token_endpoint_auth_method: 'none',
    // RFC 8252 section 7.3: any port on the loopback address is accepted for native clients.
    redirect_uris: ['http://127.0.0.1/callback'],
    grant_types: ['authorization_code', 'refresh_token', 'urn:ietf:params:oauth:grant-type:device_code'],
    response_types: ['code'],
  }],
  scopes: ['openid', 'offline_access', ...API_SCOPES.split(' ')],
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name', 'preferred_username'],
  },
  conformIdTokenClaims: false,
  findAccount: async (_ctx, id) => ({
    accountId: id,
    async claims() {
      const known = ACCOUNTS[id] ?? { email: `${id}@example.test`, name: id };
      return { sub: id, email: known.email, email_verified: true, name: known.name, preferred_username: id };
    },
  }),
  features: {
    devInteractions: { enabled: true },
    deviceFlow: { enabled: true },
    revocation: { enabled: true },
    introspection: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: async () => undefined,
      useGrantedResource: async () => false,
      getResourceServerInfo: async (_ctx, resource) => {
        if (resource !== API) throw new errors.InvalidTarget();
        return { scope: API_SCOPES, audience: API, accessTokenTTL, accessTokenFormat: 'jwt' };
      },
    },
  },
  ttl: {
    AccessToken: accessTokenTTL,
    RefreshToken: refreshTokenTTL,
    DeviceCode: deviceCodeTTL,
    Grant: refreshTokenTTL,
    Session: refreshTokenTTL,
    Interaction: 600,
    IdToken: 3600,
    AuthorizationCode: 60,
  },
  cookies: { keys: ['compozy-test-provider-cookie-key'] },
});

// One log line per call to the endpoints tests count, after the call is handled.
const COUNTED = new Map([
  ['/token', 'token'],
  ['/token/revocation', 'revocation'],
  ['/device/auth', 'device_authorization'],
]);
provider.use(async (ctx, next) => {
  await next();
  const event = COUNTED.get(ctx.path);
  if (event && ctx.method === 'POST') {
    const line = { event, status: ctx.status };
    if (event === 'token') line.grant_type = ctx.oidc?.params?.grant_type ?? null;
    emit(line);
  }
});

server.on('request', provider.callback());
emit({ event: 'ready', issuer, api: API });

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => { server.close(); process.exit(0); });
}
