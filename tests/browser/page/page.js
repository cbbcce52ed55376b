// Runs in the browser: every call a web app makes to edgegate with supabase-js's browser build,
// each outcome as a row of the results table (and returned to the test).

// What `import '@supabase/supabase-js/tracing'` registers with OpenTelemetry in an app: the
// extractor supabase-js asks for the active trace context. Here a fixed W3C context stands in
// for a tracing SDK, through the same global registry.
const TRACE_CONTEXT = {
  traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
  tracestate: "edgegate=browser-test",
  baggage: "page=browser-test",
};

/** What a call gave: the data, or the status and JSON body of an error the page could read. */
async function outcome(call) {
  try {
    const { data, error } = await call();
    if (!error) return { status: 200, data };
    if (error instanceof supabase.FunctionsHttpError) {
      const response = error.context;
      return {
        status: response.status,
        body: await response.json(),
        sbErrorCode: response.headers.get("sb-error-code"),
        requestId: response.headers.get("x-request-id"),
      };
    }
    return { status: 0, error: `${error.name}: ${error.message}` };
  } catch (thrown) {
    return { status: 0, error: String(thrown) };
  }
}

function row(result) {
  const tr = document.createElement("tr");
  const key = result.data?.key;
  const got = result.error
    ?? `${result.status} ${result.body?.code ?? `${key?.source}${key?.kid ? ` kid=${key.kid}` : ""} role=${result.data?.role}`}`;
  for (const [text, cls] of [
    [result.name], [result.expected], [got], [result.pass ? "PASS" : "FAIL", result.pass ? "pass" : "fail"],
  ]) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    tr.append(td);
  }
  document.querySelector("#results tbody").append(tr);
}

window.runCases = async (cfg) => {
  document.getElementById("origin").textContent = location.origin;
  document.getElementById("target").textContent = cfg.url;
  const options = { auth: { persistSession: false, autoRefreshToken: false } };
  const client = (key, extra = {}) => supabase.createClient(cfg.url, key, { ...options, ...extra });
  const asUser = (key) => client(key, { accessToken: async () => cfg.userToken });
  const sms = { body: { to: "+12025550123", body: "hello from the page" } };

  const cases = [
    ["legacy anon key", 200, "legacy_secret", () => client(cfg.anonKey).functions.invoke("jwt-test")],
    ["publishable key + ES256 session", 200, "signing_key", () => asUser(cfg.publishableKey).functions.invoke("jwt-test")],
    ["region set (x-region)", 200, "legacy_secret", () => client(cfg.anonKey).functions.invoke("jwt-test", { region: "us-east-1" })],
    ["trace propagation on", 200, "legacy_secret", () => {
      globalThis[Symbol.for("@supabase/supabase-js.traceContextExtractor")] = () => TRACE_CONTEXT;
      return client(cfg.anonKey, { tracePropagation: true }).functions.invoke("jwt-test");
    }],
    ["401 body readable", 401, "UNAUTHORIZED_ASYMMETRIC_JWT", () => client(cfg.anonKey, { accessToken: async () => cfg.foreignToken }).functions.invoke("jwt-test")],
    ["secret key refused", 401, "UNAUTHORIZED_INVALID_API_KEY", () => client(cfg.secretKey).functions.invoke("jwt-test")],
    ["send-sms as a user", 403, "FORBIDDEN_ROLE", () => asUser(cfg.publishableKey).functions.invoke("send-sms", sms)],
  ];
  const results = [];
  for (const [name, status, expected, call] of cases) {
    const result = { name, expected: `${status} ${expected}`, ...(await outcome(call)) };
    const seen = result.status === 200 ? result.data?.key?.source : result.body?.code;
    result.pass = result.status === status && seen === expected;
    results.push(result);
    row(result);
  }
  return { results, traceContext: TRACE_CONTEXT };
};
