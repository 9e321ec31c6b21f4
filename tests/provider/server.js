// A real OpenID provider (node oidc-provider, OpenID Certified) on 127.0.0.1,
// standing in for Compozy Cloud in the tests and the README's demo.
//
// Usage: node server.js [--port 0] [--access-token-ttl 3600] [--refresh-token-ttl 1209600]
//                       [--device-code-ttl 600] [--device-interval 1] [--exit-with-stdin]
//                       [--issuer http://127.0.0.1:PORT] [--dpop-require-nonce]
//                       [--dpop-algs ES256,EdDSA]
//
// --issuer: the issuer to advertise, when clients reach this provider through something
// else (the tests' fault-injecting proxy, tests/support/fault_proxy.py); the default is
// this server's own address. Endpoint URLs follow the Host header each request carries.
//
// --dpop-require-nonce: the token endpoint demands a server-provided DPoP nonce (RFC 9449
// section 8): every first proof without one is answered use_dpop_nonce with a DPoP-Nonce header.
// --dpop-algs: the DPoP proof algorithms the provider accepts and lists in its discovery
// (dpop_signing_alg_values_supported); oidc-provider's default is ES256, Ed25519, EdDSA.
//
// --exit-with-stdin: stop when stdin closes, so a provider whose test process died
// (and with it the pipe's write end) does not live on.
//
// stdout carries one JSON object per line, numbered by "seq", and never a token value:
//   {"event":"ready","issuer":"http://127.0.0.1:PORT","url":"http://127.0.0.1:PORT",
//    "api":"https://api.compozy.dev","seq":1}   ("url" is where this server listens)
//   {"event":"token","grant_type":"refresh_token","status":200,"client_id":"compozy-cli",...}
//   {"event":"revocation",...} {"event":"device_authorization",...} {"event":"introspection",...}
//   {"event":"userinfo",...}
// A failed call also carries the OAuth error code ("error":"invalid_grant"), never its token.
// GET /__test__/seq answers {"seq": N}, the number of the last line written, so a reader
// can wait until it has seen every line written before it asked (tests/support/provider.py).
// oidc-provider's own warnings go to stderr.
//
// What this configures on top of oidc-provider's defaults, and why:
// * one public native client, compozy-cli, with loopback redirects on any port
//   (RFC 8252 section 7.3; oidc-provider compares native loopback URIs without the port);
// * PKCE with S256 required for every authorization request (RFC 7636; RFC 9700 2.1.1);
// * refresh tokens rotate on every use, and a reused one revokes the grant (RFC 9700 4.14.2);
// * offline_access always yields a refresh token: oidc-provider drops offline_access from an
//   authorization request whose prompt lacks "consent" (OIDC Core 11), so such a request gets
//   "consent" added here, and issueRefreshToken is spelled out;
// * a second public client, compozy-cli-dpop, whose access tokens must be DPoP-bound
//   (RFC 9449 section 5.2, dpop_bound_access_tokens); its refresh tokens are bound to the key
//   too (section 5, public clients). DPoP itself is on for every client (oidc-provider's
//   default), so compozy-cli still gets Bearer tokens unless it sends a proof;
// * an API resource (RFC 8707) whose access tokens are JWTs with "aud" set to it;
// * login and consent pages of our own: plain HTML forms, no script, nothing fetched from
//   elsewhere, so that a plain HTTP client and headless Chromium can both complete them.

import http from 'node:http';
import { parseArgs } from 'node:util';

import Provider, { errors } from 'oidc-provider';

const { values: options } = parseArgs({
  options: {
    port: { type: 'string', default: '0' },
    'access-token-ttl': { type: 'string', default: '3600' },
    'refresh-token-ttl': { type: 'string', default: '1209600' },
    'device-code-ttl': { type: 'string', default: '600' },
    'device-interval': { type: 'string', default: '1' },
    'exit-with-stdin': { type: 'boolean', default: false },
    issuer: { type: 'string', default: '' },
    'dpop-require-nonce': { type: 'boolean', default: false },
    'dpop-algs': { type: 'string', default: 'ES256,Ed25519,EdDSA' },
  },
});

function seconds(name) {
  const value = Number(options[name]);
  if (!Number.isInteger(value) || value < 0) {
    process.stderr.write(`--${name} wants a whole number of seconds, not ${options[name]}\n`);
    process.exit(2);
  }
  return value;
}

const accessTokenTTL = seconds('access-token-ttl');
const refreshTokenTTL = seconds('refresh-token-ttl');
const deviceCodeTTL = seconds('device-code-ttl');
const deviceInterval = seconds('device-interval');

const CLIENT_ID = 'compozy-cli';
// The client whose tokens must be DPoP-bound (RFC 9449 section 5.2).
const DPOP_CLIENT_ID = 'compozy-cli-dpop';
// The API the CLI's tokens are for (RFC 8707 resource indicator).
const API = 'https://api.compozy.dev';
const API_SCOPES = ['compozy:read', 'compozy:write', 'compozy:deploy'];
const OIDC_SCOPES = ['openid', 'profile', 'email', 'offline_access'];
// Every account takes this password; a wrong one shows the login form again.
const PASSWORD = 'test';

const ACCOUNTS = {
  alice: { email: 'alice@example.test', name: 'Alice Example' },
  bob: { email: 'bob@example.test', name: 'Bob Example' },
};

let seq = 0;
function emit(event) {
  seq += 1;
  // Writes to a pipe are synchronous in node on Linux and macOS: the line is out
  // before the response it describes is sent.
  process.stdout.write(`${JSON.stringify({ ...event, seq })}\n`);
}

// ---------------------------------------------------------------------------
// Pages. Each final page says how things ended in <meta name="outcome">, for the helpers.

function esc(value) {
  return String(value).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function page(title, body, outcome) {
  const meta = outcome ? `<meta name="outcome" content="${esc(outcome)}">` : '';
  return `<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
${meta}
<title>${esc(title)}</title>
<style>
body{font-family:sans-serif;max-width:26em;margin:3em auto;padding:0 1em}
input,button{display:block;width:100%;margin:.4em 0;padding:.5em;font-size:1em;box-sizing:border-box}
.error{color:#b00020}
</style>
</head>
<body>
<h1>${esc(title)}</h1>
${body}
</body>
</html>`;
}

function loginPage(uid, params, message) {
  const hint = params.login_hint ? ` value="${esc(params.login_hint)}"` : '';
  return page('Sign in to Compozy Test', `
${message ? `<p class="error">${esc(message)}</p>` : ''}
<form method="post" action="/interaction/${esc(uid)}/login" autocomplete="off">
<label>Login <input type="text" name="login" required autofocus${hint}></label>
<label>Password <input type="password" name="password" required></label>
<button type="submit">Sign in</button>
</form>
<p><a href="/interaction/${esc(uid)}/abort">Cancel</a></p>`);
}

function consentPage(uid, client, details) {
  const items = [];
  for (const scope of details.missingOIDCScope ?? []) items.push(scope);
  for (const [resource, scopes] of Object.entries(details.missingResourceScopes ?? {})) {
    items.push(`${resource}: ${scopes.join(' ')}`);
  }
  const list = items.map((item) => `<li>${esc(item)}</li>`).join('');
  return page('Authorize', `
<p><strong>${esc(client.clientName ?? client.clientId)}</strong> asks for:</p>
<ul>${list || '<li>the access you granted before</li>'}</ul>
<form method="post" action="/interaction/${esc(uid)}/confirm">
<button type="submit" name="confirm" value="yes" autofocus>Allow</button>
<button type="submit" name="abort" value="yes">Deny</button>
</form>`);
}

// The device flow's pages (RFC 8628 section 3.3): oidc-provider hands over its forms
// (with their CSRF fields) and we only dress them.
async function userCodeInputSource(ctx, form, _out, err) {
  let message = '<p>Enter the code shown on your device.</p>';
  let outcome;
  if (err && err.name === 'AbortedError') {
    message = '<p class="error">The sign-in request was cancelled.</p>';
    outcome = 'denied';
  } else if (err && (err.userCode || err.name === 'NoCodeError')) {
    message = '<p class="error">That code is not valid. Try again.</p>';
  } else if (err) {
    message = '<p class="error">There was an error processing your request.</p>';
    outcome = 'error';
  }
  ctx.type = 'html';
  ctx.body = page('Connect a device', `${message}
${form}
<button type="submit" form="op.deviceInputForm">Continue</button>`, outcome);
}

async function userCodeConfirmSource(ctx, form, client, _deviceInfo, userCode) {
  ctx.type = 'html';
  ctx.body = page('Confirm device', `
<p><strong>${esc(client.clientName ?? client.clientId)}</strong> wants to sign in.
Check that your device shows this code:</p>
<p><code>${esc(userCode)}</code></p>
${form}
<button type="submit" form="op.deviceConfirmForm" autofocus>Continue</button>
<button type="submit" form="op.deviceConfirmForm" name="abort" value="yes">Cancel</button>`);
}

async function successSource(ctx) {
  ctx.type = 'html';
  ctx.body = page('Device connected', '<p>You can close this page and go back to your device.</p>', 'approved');
}

// ---------------------------------------------------------------------------
// The provider.

const server = http.createServer();
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(Number(options.port), '127.0.0.1', resolve);
});
const { port } = server.address();
const url = `http://127.0.0.1:${port}`;
const issuer = options.issuer || url;

const provider = new Provider(issuer, {
  clients: [{
    client_id: CLIENT_ID,
    client_name: 'Compozy CLI',
    application_type: 'native',
    token_endpoint_auth_method: 'none',
    // RFC 8252 section 7.3: any port on the loopback address is accepted for native clients.
    redirect_uris: ['http://127.0.0.1/callback'],
    grant_types: ['authorization_code', 'refresh_token', 'urn:ietf:params:oauth:grant-type:device_code'],
    response_types: ['code'],
  }, {
    client_id: DPOP_CLIENT_ID,
    client_name: 'Compozy CLI (DPoP)',
    application_type: 'native',
    token_endpoint_auth_method: 'none',
    redirect_uris: ['http://127.0.0.1/callback'],
    grant_types: ['authorization_code', 'refresh_token', 'urn:ietf:params:oauth:grant-type:device_code'],
    response_types: ['code'],
    dpop_bound_access_tokens: true,
  }],
  enabledJWA: { dPoPSigningAlgValues: options['dpop-algs'].split(',').filter(Boolean) },
  scopes: [...OIDC_SCOPES, ...API_SCOPES],
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name', 'preferred_username'],
  },
  // The id token carries the scopes' claims, so the agent can name the person without userinfo.
  conformIdTokenClaims: false,
  findAccount: async (_ctx, id) => ({
    accountId: id,
    async claims() {
      const known = ACCOUNTS[id] ?? { email: `${id}@example.test`, name: id };
      return {
        sub: id, email: known.email, email_verified: true, name: known.name, preferred_username: id,
      };
    },
  }),
  pkce: { required: () => true }, // S256 is the only method oidc-provider offers
  rotateRefreshToken: true,
  issueRefreshToken: async (_ctx, client, code) => (
    client.grantTypeAllowed('refresh_token') && code.scopes.has('offline_access')
  ),
  interactions: { url: (_ctx, interaction) => `/interaction/${interaction.uid}` },
  features: {
    devInteractions: { enabled: false },
    deviceFlow: {
      enabled: true, userCodeInputSource, userCodeConfirmSource, successSource,
    },
    // RFC 9449; the nonce secret lets the provider hand out nonces (section 8), which it
    // demands only with --dpop-require-nonce.
    dPoP: {
      enabled: true,
      nonceSecret: Buffer.alloc(32, 'compozy-test-provider-dpop-nonce'),
      requireNonce: () => options['dpop-require-nonce'],
    },
    revocation: { enabled: true },
    introspection: { enabled: true },
    userinfo: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: async () => undefined,
      useGrantedResource: async () => false,
      getResourceServerInfo: async (_ctx, resource) => {
        if (resource !== API) throw new errors.InvalidTarget();
        return {
          scope: API_SCOPES.join(' '), audience: API, accessTokenTTL, accessTokenFormat: 'jwt',
        };
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

// ---------------------------------------------------------------------------
// Middleware, in order: the test barrier, the offline_access rule, the event log, the pages.

provider.use(async (ctx, next) => {
  if (ctx.path === '/__test__/seq' && ctx.method === 'GET') {
    ctx.set('Cache-Control', 'no-store');
    ctx.body = { seq };
    return;
  }
  await next();
});

provider.use(async (ctx, next) => {
  // OIDC Core 11 lets a provider ignore offline_access unless prompt has consent; a real
  // provider may not. Asking for consent keeps the scope, so the refresh token comes.
  if (ctx.path === '/auth' && ctx.method === 'GET') {
    const query = new URLSearchParams(ctx.querystring);
    const scopes = (query.get('scope') ?? '').split(' ');
    const prompts = (query.get('prompt') ?? '').split(' ').filter(Boolean);
    if (scopes.includes('offline_access') && prompts.length && !prompts.includes('consent')
        && !prompts.includes('none')) {
      query.set('prompt', [...prompts, 'consent'].join(' '));
      ctx.querystring = query.toString();
    }
  }
  await next();
});

// One log line per call to the endpoints tests count, after the call is handled.
const COUNTED = new Map([
  ['/token', 'token'],
  ['/token/revocation', 'revocation'],
  ['/token/introspection', 'introspection'],
  ['/device/auth', 'device_authorization'],
  ['/me', 'userinfo'],
]);
provider.use(async (ctx, next) => {
  await next();
  const event = COUNTED.get(ctx.path);
  if (!event || (ctx.method !== 'POST' && event !== 'userinfo') || ctx.method === 'OPTIONS') return;
  if (event === 'device_authorization' && ctx.status === 200 && ctx.body && deviceInterval) {
    ctx.body.interval = deviceInterval; // RFC 8628 section 3.2; clients default to 5 s without it
  }
  const line = {
    event,
    status: ctx.status,
    client_id: ctx.oidc?.client?.clientId ?? ctx.oidc?.params?.client_id ?? null,
  };
  if (event === 'token') line.grant_type = ctx.oidc?.params?.grant_type ?? null;
  if (event === 'token' && ctx.oidc?.params?.resource) line.resource = ctx.oidc.params.resource;
  // RFC 9449: whether the call carried a DPoP proof, and the type of the token it got.
  if (event === 'token') line.dpop = Boolean(ctx.get('DPoP'));
  if (event === 'token' && ctx.status === 200 && typeof ctx.body?.token_type === 'string') {
    line.token_type = ctx.body.token_type;
  }
  if (event === 'revocation' && ctx.oidc?.params?.token_type_hint) {
    line.token_type_hint = ctx.oidc.params.token_type_hint;
  }
  if (ctx.status >= 400 && typeof ctx.body?.error === 'string') line.error = ctx.body.error;
  // Every secret that crossed this call, for the tests' canary check (tests/support/canary.py):
  // what the client sent (codes, verifiers, refresh tokens, tokens to revoke) and what it got.
  const secrets = [];
  for (const name of ['code', 'code_verifier', 'refresh_token', 'device_code', 'token']) {
    const value = ctx.oidc?.params?.[name];
    if (typeof value === 'string' && value) secrets.push(value);
  }
  if (ctx.status === 200 && ctx.body && typeof ctx.body === 'object') {
    for (const name of ['access_token', 'refresh_token', 'id_token', 'device_code']) {
      if (typeof ctx.body[name] === 'string') secrets.push(ctx.body[name]);
    }
  }
  if (secrets.length) line.secrets = secrets;
  emit(line);
});

async function readForm(req) {
  let text = '';
  for await (const chunk of req) {
    text += chunk;
    if (text.length > 64 * 1024) throw new Error('form too large');
  }
  return Object.fromEntries(new URLSearchParams(text));
}

const INTERACTION = /^\/interaction\/([\w-]+)(?:\/(login|confirm|abort))?$/;
provider.use(async (ctx, next) => {
  const match = INTERACTION.exec(ctx.path);
  if (!match) {
    await next();
    return;
  }
  const [, uid, action] = match;
  ctx.set('Cache-Control', 'no-store');
  let details;
  try {
    details = await provider.interactionDetails(ctx.req, ctx.res);
    if (details.uid !== uid) throw new errors.SessionNotFound('interaction mismatch');
  } catch (err) {
    ctx.status = 400;
    ctx.type = 'html';
    ctx.body = page('Sign-in expired', `<p class="error">${esc(err.message)}. Start again from your device.</p>`, 'error');
    return;
  }
  const { prompt, params } = details;
  const finish = async (result, merge) => {
    const to = await provider.interactionResult(ctx.req, ctx.res, result, { mergeWithLastSubmission: merge });
    ctx.status = 303;
    ctx.redirect(to);
  };
  const deny = () => finish({ error: 'access_denied', error_description: 'End-User aborted interaction' }, false);

  if (action === 'abort' && (ctx.method === 'GET' || ctx.method === 'POST')) {
    await deny();
  } else if (!action && ctx.method === 'GET') {
    ctx.type = 'html';
    if (prompt.name === 'login') {
      ctx.body = loginPage(uid, params);
    } else if (prompt.name === 'consent') {
      const client = await provider.Client.find(params.client_id);
      ctx.body = consentPage(uid, client, prompt.details);
    } else {
      ctx.status = 501;
      ctx.body = page('Not implemented', `<p>prompt ${esc(prompt.name)}</p>`, 'error');
    }
  } else if (action === 'login' && ctx.method === 'POST' && prompt.name === 'login') {
    const form = await readForm(ctx.req);
    const login = (form.login ?? '').trim();
    if (!login || form.password !== PASSWORD) {
      ctx.type = 'html';
      ctx.body = loginPage(uid, params, 'Wrong login or password.');
      return;
    }
    await finish({ login: { accountId: login } }, false);
  } else if (action === 'confirm' && ctx.method === 'POST' && prompt.name === 'consent') {
    const form = await readForm(ctx.req);
    if (form.abort) {
      await deny();
      return;
    }
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: details.session.accountId, clientId: params.client_id });
    const missing = prompt.details;
    if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
    if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
    for (const [resource, scopes] of Object.entries(missing.missingResourceScopes ?? {})) {
      grant.addResourceScope(resource, scopes.join(' '));
    }
    await finish({ consent: { grantId: await grant.save() } }, true);
  } else {
    ctx.status = 405;
    ctx.type = 'html';
    ctx.body = page('Not allowed', '<p>That step does not fit this sign-in.</p>', 'error');
  }
});

server.on('request', provider.callback());
emit({ event: 'ready', issuer, url, api: API });

function stop() {
  server.close();
  server.closeAllConnections();
  process.exit(0);
}
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, stop);
if (options['exit-with-stdin']) {
  process.stdin.on('end', stop);
  process.stdin.on('error', stop);
  process.stdin.resume();
}
