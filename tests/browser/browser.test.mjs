// supabase-js's browser build in a real Chromium page, calling edgegate on another origin: CORS
// as a browser enforces it (preflights for x-region and the trace headers included), and errors
// the page can read. Debian's chromium driven by playwright-core (no browser download).
//
// Run by .ci/run after `cargo test` has built the binary: `npm ci && node --test` in tests/browser.
// Without chromium the test skips loudly, and fails under CI=true.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createServer } from "node:http";
import { mkdtempSync, mkdirSync, writeFileSync, readFileSync, existsSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { startEdgegate, stopEdgegate } from "../common/edgegate.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, "..", "..");
const bin = process.env.EDGEGATE_BIN ?? join(root, "target", "debug", "edgegate");
const chromiumPath = process.env.CHROMIUM_PATH ?? "/usr/bin/chromium";
const screenshot = join(root, "target", "browser", "supabase-js-page.png");
const inCi = process.env.CI === "true";

// The machine's network is closed: these flags keep Chromium from reaching out on its own.
const CHROMIUM_ARGS = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
];

const LEGACY_SECRET = "super-secret-jwt-token-with-at-least-32-characters-long";
const PUBLISHABLE = "sb_publishable_browser0123456789abcdef";
const SECRET_KEY = "sb_secret_browser0123456789abcdefghij";

const CASES = [
  "legacy anon key",
  "publishable key + ES256 session",
  "region set (x-region)",
  "trace propagation on",
  "401 body readable",
  "secret key refused",
  "send-sms as a user",
];

const work = mkdtempSync(join(tmpdir(), "edgegate-browser-"));
let edgegate;
let pageServer;
let browser;
let run; // { results, traceContext, requests, kid, pageOrigin, edgegateUrl }

/** The edgegate CLI with only `env` set (plus PATH), in the scratch folder. */
function edgegateCli(args, env = {}) {
  return execFileSync(bin, args, { cwd: work, env: { PATH: process.env.PATH, ...env }, encoding: "utf8" });
}

/** A new ES256 key from `edgegate keys generate`: its private JWK file, kid and public JWKS. */
function generateKey(name) {
  const [privateJwk, publicJwks] = edgegateCli(["keys", "generate", "--alg", "ES256"]).trim().split("\n");
  const file = join(work, `${name}.jwk.json`);
  writeFileSync(file, privateJwk);
  return { file, kid: JSON.parse(privateJwk).kid, jwks: publicJwks };
}

const mint = (args) => edgegateCli(["token", "mint", ...args], { SUPABASE_JWT_SECRET: LEGACY_SECRET, JWT_ISSUERS: "supabase" }).trim();

/** The page's origin: index.html, its script, and supabase-js's browser build from node_modules. */
async function startPageServer() {
  const files = {
    "/": ["text/html", join(here, "page", "index.html")],
    "/page.js": ["text/javascript", join(here, "page", "page.js")],
    "/supabase.js": ["text/javascript", join(here, "node_modules", "@supabase", "supabase-js", "dist", "umd", "supabase.js")],
  };
  const server = createServer((req, res) => {
    const file = files[new URL(req.url, "http://page").pathname];
    if (!file) return res.writeHead(404).end();
    res.writeHead(200, { "content-type": file[0] }).end(readFileSync(file[1]));
  });
  await new Promise((ok) => server.listen(0, "127.0.0.1", ok));
  return server;
}

before(async () => {
  if (!existsSync(chromiumPath)) {
    const message = `chromium not found at ${chromiumPath} (apt-get install -y chromium)`;
    if (inCi) throw new Error(`CI=true and ${message}`);
    console.error(`\nSKIPPED: the real-browser test: ${message}\n`);
    return;
  }
  assert.ok(existsSync(bin), `edgegate binary not found at ${bin}; run cargo build first`);
  assert.ok(
    existsSync(join(here, "node_modules", "playwright-core")),
    "playwright-core is not installed: run npm ci in tests/browser",
  );

  const key = generateKey("signing");
  const foreign = generateKey("foreign");
  const config = {
    anonKey: mint(["--role", "anon", "--legacy"]),
    userToken: mint(["--role", "authenticated", "--sub", "browser-user", "--jwk", key.file]),
    foreignToken: mint(["--role", "authenticated", "--sub", "browser-user", "--jwk", foreign.file]),
    publishableKey: PUBLISHABLE,
    secretKey: SECRET_KEY,
  };

  ({ child: edgegate, url: config.url } = await startEdgegate(bin, work, {
    SUPABASE_JWT_SECRET: LEGACY_SECRET,
    SUPABASE_JWKS: key.jwks,
    JWT_ISSUERS: "supabase",
    SUPABASE_PUBLISHABLE_KEYS: JSON.stringify({ web: PUBLISHABLE }),
    SUPABASE_SECRET_KEYS: JSON.stringify({ backend: SECRET_KEY }),
  }));

  pageServer = await startPageServer();
  const pageOrigin = `http://127.0.0.1:${pageServer.address().port}`;
  assert.notEqual(pageOrigin, new URL(config.url).origin, "the page must be on another origin");

  const profile = join(work, "chromium-profile");
  browser = await chromium.launchPersistentContext(profile, {
    executablePath: chromiumPath,
    headless: true,
    args: CHROMIUM_ARGS,
    viewport: { width: 1100, height: 420 },
  });
  const page = browser.pages()[0] ?? (await browser.newPage());
  const requests = [];
  page.on("request", (request) => {
    if (request.url().startsWith(config.url)) requests.push({ url: request.url(), headers: request.headers() });
  });
  const consoleLines = [];
  page.on("console", (line) => consoleLines.push(line.text()));
  await page.goto(`${pageOrigin}/`);
  const { results, traceContext } = await page.evaluate((cfg) => window.runCases(cfg), config);
  mkdirSync(dirname(screenshot), { recursive: true });
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(`screenshot of the page's results: ${screenshot}`);
  run = { results, traceContext, requests, consoleLines, kid: key.kid };
});

after(async () => {
  await browser?.close();
  pageServer?.close();
  if (edgegate) assert.equal(await stopEdgegate(edgegate), 0, "edgegate exits 0 on SIGTERM");
  rmSync(work, { recursive: true, force: true });
});

/** The page's outcome for one case, after checking the page judged it a pass. */
function outcome(t, name) {
  if (!run) {
    t.skip("chromium is not installed");
    return null;
  }
  const result = run.results.find((r) => r.name === name);
  assert.ok(result, `the page ran no case "${name}"`);
  assert.ok(result.pass, `${name}: ${JSON.stringify(result)}\nconsole: ${run.consoleLines.join("\n")}`);
  return result;
}

/** The requests the browser sent to edgegate whose URL and headers satisfy `match`. */
const sent = (match) => run.requests.filter(match);

test("legacy anon key: jwt-test from the page", (t) => {
  const r = outcome(t, CASES[0]);
  if (!r) return;
  assert.equal(r.data.role, "anon");
  assert.equal(r.data.key.source, "legacy_secret");
});

test("publishable key plus an ES256 session token", (t) => {
  const r = outcome(t, CASES[1]);
  if (!r) return;
  assert.deepEqual(r.data.key, { source: "signing_key", kid: run.kid, alg: "ES256" });
  assert.equal(r.data.role, "authenticated");
  assert.equal(r.data.sub, "browser-user");
});

test("region set: supabase-js's x-region passes the preflight", (t) => {
  if (!outcome(t, CASES[2])) return;
  const withRegion = sent((r) => r.headers["x-region"] === "us-east-1");
  assert.equal(withRegion.length, 1, JSON.stringify(run.requests));
  assert.match(withRegion[0].url, /forceFunctionRegion=us-east-1/);
});

test("trace propagation on: traceparent, tracestate and baggage pass the preflight", (t) => {
  if (!outcome(t, CASES[3])) return;
  const { traceparent, tracestate, baggage } = run.traceContext;
  const traced = sent((r) => r.headers.traceparent === traceparent);
  assert.equal(traced.length, 1, JSON.stringify(run.requests));
  assert.equal(traced[0].headers.tracestate, tracestate);
  assert.equal(traced[0].headers.baggage, baggage);
});

test("a 401 is a FunctionsHttpError whose JSON body and headers the page reads", (t) => {
  const r = outcome(t, CASES[4]);
  if (!r) return;
  assert.equal(r.sbErrorCode, r.body.code, "sb-error-code is exposed to the page");
  assert.ok(r.requestId, "x-request-id is exposed to the page");
  assert.equal(typeof r.body.message, "string");
});

test("a secret key used from a page is refused", (t) => {
  const r = outcome(t, CASES[5]);
  if (!r) return;
  assert.equal(r.sbErrorCode, "UNAUTHORIZED_INVALID_API_KEY");
});

test("send-sms from the page with a user token is 403 FORBIDDEN_ROLE, readable", (t) => {
  const r = outcome(t, CASES[6]);
  if (!r) return;
  assert.match(r.body.message, /service_role/);
});

test("the page ran every case and no other", (t) => {
  if (!run) return t.skip("chromium is not installed");
  assert.deepEqual(run.results.map((r) => r.name), CASES);
});
