// edgegate against independent issuers and the real client:
// - signing keys made by the official Supabase CLI (`supabase gen signing-key`), tokens made by the
//   CLI (`supabase gen bearer-jwt`) and by jose, all verified by a real edgegate process;
// - supabase-js `functions.invoke('jwt-test')` with a legacy anon key, an ES256 user token and an
//   `sb_publishable_` key alone, and a refused call surfacing as FunctionsHttpError with our JSON.
//
// Run by .ci/run after `cargo test` has built the binary: `npm ci && node --test` in tests/interop.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createServer } from "node:http";
import { mkdtempSync, mkdirSync, writeFileSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { createClient, FunctionsHttpError } from "@supabase/supabase-js";
import { SignJWT, importJWK, generateKeyPair, exportJWK } from "jose";
import WebSocket from "ws";
import { startEdgegate, stopEdgegate } from "../common/edgegate.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, "..", "..");
const bin = process.env.EDGEGATE_BIN ?? join(root, "target", "debug", "edgegate");
const supabaseCli = join(here, "node_modules", ".bin", "supabase");

const LEGACY_SECRET = "super-secret-jwt-token-with-at-least-32-characters-long";
const REF = "abcdefghijklmnopqrst";
const ISSUER = `https://${REF}.supabase.co/auth/v1`;
const PUBLISHABLE = "sb_publishable_interop0123456789abcdef";
const SECRET_KEY = "sb_secret_interop0123456789abcdefghij";

const work = mkdtempSync(join(tmpdir(), "edgegate-interop-"));
let jwks = { keys: [] };
let jwksServer;
let edgegate;
let edgegateUrl;
let cliKeys = {};
let eddsa;

function publicPart(jwk) {
  const { d, p, q, dp, dq, qi, ...rest } = jwk;
  return { ...rest, key_ops: ["verify"] };
}

function cli(args, input = "") {
  return execFileSync(supabaseCli, args, { input, cwd: work, encoding: "utf8", stdio: ["pipe", "pipe", "pipe"] });
}

/** A private JWK printed by `supabase gen signing-key` (its first line). */
function cliSigningKey(alg) {
  const out = cli(["gen", "signing-key", "--algorithm", alg]);
  return JSON.parse(out.split("\n").find((line) => line.startsWith("{")));
}

/** A token from `supabase gen bearer-jwt`, signed with the project's first signing key. */
function cliBearer(privateJwk, claims) {
  const project = join(work, `cli-${privateJwk.kid}`);
  mkdirSync(join(project, "supabase"), { recursive: true });
  writeFileSync(join(project, "supabase", "signing_keys.json"), JSON.stringify([privateJwk]));
  writeFileSync(
    join(project, "supabase", "config.toml"),
    `project_id = "interop"\n[auth]\nsigning_keys_path = "./signing_keys.json"\n`,
  );
  const out = cli(
    ["gen", "bearer-jwt", "--workdir", project, "--role", claims.role, "--sub", claims.sub,
      "--valid-for", "1h", "--payload", JSON.stringify({ iss: ISSUER, aud: "authenticated" })],
    "\n",
  );
  return out.trim().split("\n").pop().trim();
}

before(async () => {
  assert.ok(existsSync(bin), `edgegate binary not found at ${bin}; run cargo build first`);
  assert.ok(existsSync(supabaseCli), "the Supabase CLI is not installed: run npm ci in tests/interop");

  cliKeys.ES256 = cliSigningKey("ES256");
  cliKeys.RS256 = cliSigningKey("RS256");
  const pair = await generateKeyPair("EdDSA", { crv: "Ed25519", extractable: true });
  eddsa = { privateKey: pair.privateKey, jwk: { ...(await exportJWK(pair.publicKey)), kid: "jose-ed25519", alg: "EdDSA", use: "sig" } };
  jwks = { keys: [publicPart(cliKeys.ES256), publicPart(cliKeys.RS256), eddsa.jwk] };

  jwksServer = createServer((req, res) => {
    if (req.url === "/auth/v1/.well-known/jwks.json") {
      res.writeHead(200, { "content-type": "application/json", "cache-control": "public, max-age=600" });
      res.end(JSON.stringify(jwks));
    } else {
      res.writeHead(404).end();
    }
  });
  await new Promise((ok) => jwksServer.listen(0, "127.0.0.1", ok));
  const jwksUrl = `http://127.0.0.1:${jwksServer.address().port}/auth/v1/.well-known/jwks.json`;

  ({ child: edgegate, url: edgegateUrl } = await startEdgegate(bin, work, {
    SUPABASE_JWKS_URL: jwksUrl,
    SUPABASE_JWT_SECRET: LEGACY_SECRET,
    JWT_ISSUERS: `${ISSUER},supabase`,
    SUPABASE_PUBLISHABLE_KEYS: JSON.stringify({ web: PUBLISHABLE }),
    SUPABASE_SECRET_KEYS: JSON.stringify({ backend: SECRET_KEY }),
  }));
});

after(async () => {
  if (edgegate) assert.equal(await stopEdgegate(edgegate), 0, "edgegate exits 0 on SIGTERM");
  jwksServer?.close();
});

async function jwtTest(headers) {
  const res = await fetch(`${edgegateUrl}/functions/v1/jwt-test`, { headers });
  return { status: res.status, body: await res.json() };
}

test("keys from the Supabase CLI verify tokens the CLI mints", async () => {
  for (const alg of ["ES256", "RS256"]) {
    const token = cliBearer(cliKeys[alg], { role: "authenticated", sub: `cli-${alg}` });
    const { status, body } = await jwtTest({ authorization: `Bearer ${token}` });
    assert.equal(status, 200, JSON.stringify(body));
    assert.deepEqual(body.key, { source: "signing_key", kid: cliKeys[alg].kid, alg });
    assert.equal(body.sub, `cli-${alg}`);
  }
});

test("tokens signed by jose verify: ES256 and RS256 with the CLI's keys, EdDSA, legacy HS256", async () => {
  const now = Math.floor(Date.now() / 1000);
  const sign = (key, alg, kid, claims) =>
    new SignJWT(claims).setProtectedHeader({ alg, kid, typ: "JWT" }).sign(key);
  const user = { iss: ISSUER, aud: "authenticated", sub: "jose-user", role: "authenticated", iat: now, exp: now + 600, session_id: "s", aal: "aal1", is_anonymous: false };

  for (const alg of ["ES256", "RS256"]) {
    // WebCrypto refuses a private key whose key_ops include "verify"; jose needs just the key.
    const { key_ops, ...privateJwk } = cliKeys[alg];
    const key = await importJWK(privateJwk, alg);
    const { status, body } = await jwtTest({ authorization: `Bearer ${await sign(key, alg, cliKeys[alg].kid, user)}` });
    assert.equal(status, 200, JSON.stringify(body));
    assert.equal(body.key.kid, cliKeys[alg].kid);
  }
  const ed = await jwtTest({ authorization: `Bearer ${await sign(eddsa.privateKey, "EdDSA", "jose-ed25519", user)}` });
  assert.equal(ed.status, 200, JSON.stringify(ed.body));
  assert.equal(ed.body.key.alg, "EdDSA");

  const hs = new TextEncoder().encode(LEGACY_SECRET);
  const legacy = await new SignJWT(user).setProtectedHeader({ alg: "HS256", typ: "JWT" }).sign(hs);
  const res = await jwtTest({ authorization: `Bearer ${legacy}` });
  assert.equal(res.status, 200, JSON.stringify(res.body));
  assert.equal(res.body.key.source, "legacy_secret");

  const forged = await new SignJWT(user).setProtectedHeader({ alg: "HS256", kid: cliKeys.ES256.kid }).sign(new TextEncoder().encode("not-the-legacy-secret-but-32-bytes-long"));
  const refused = await jwtTest({ authorization: `Bearer ${forged}` });
  assert.equal(refused.status, 401);
  assert.equal(refused.body.code, "UNAUTHORIZED_LEGACY_JWT");
});

test("supabase-js functions.invoke works unchanged against edgegate", async () => {
  const now = Math.floor(Date.now() / 1000);
  const hs = new TextEncoder().encode(LEGACY_SECRET);
  const anonKey = await new SignJWT({ iss: "supabase", ref: REF, role: "anon", iat: now, exp: now + 3600 })
    .setProtectedHeader({ alg: "HS256", typ: "JWT" })
    .sign(hs);

  // Node 20 has no global WebSocket; supabase-js's realtime client wants one even if unused.
  const options = { auth: { persistSession: false }, realtime: { transport: WebSocket } };
  const legacy = createClient(edgegateUrl, anonKey, options);
  const a = await legacy.functions.invoke("jwt-test");
  assert.equal(a.error, null, String(a.error));
  assert.equal(a.data.key.source, "legacy_secret");
  assert.equal(a.data.role, "anon");

  const esToken = cliBearer(cliKeys.ES256, { role: "authenticated", sub: "js-user" });
  const user = createClient(edgegateUrl, PUBLISHABLE, {
    ...options,
    global: { headers: { Authorization: `Bearer ${esToken}` } },
  });
  const b = await user.functions.invoke("jwt-test", { body: { hello: "world" } });
  assert.equal(b.error, null, String(b.error));
  assert.equal(b.data.key.source, "signing_key");
  assert.equal(b.data.sub, "js-user");

  const publishable = createClient(edgegateUrl, PUBLISHABLE, options);
  const c = await publishable.functions.invoke("jwt-test");
  assert.equal(c.error, null, String(c.error));
  assert.equal(c.data.key.source, "api_key");
  assert.equal(c.data.role, "anon");

  const wrong = createClient(edgegateUrl, "sb_publishable_not_a_configured_key", options);
  const d = await wrong.functions.invoke("jwt-test");
  assert.ok(d.error instanceof FunctionsHttpError, `expected FunctionsHttpError, got ${d.error}`);
  assert.equal(d.error.context.status, 401);
  const body = await d.error.context.json();
  assert.equal(body.code, "UNAUTHORIZED_INVALID_API_KEY");
  assert.equal(typeof body.message, "string");
});
