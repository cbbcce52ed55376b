// The `jwt-test` Edge Function as it runs on Supabase today: Deno.serve with jose, verifying
// signing-key tokens against the project's JWKS and legacy HS256 tokens with the shared secret.
// It answers with edgegate's JSON shape, so bench/load.sh can drive both the same way.
import { createRemoteJWKSet, decodeProtectedHeader, jwtVerify } from "jose";

const env = (name: string): string => {
  const value = Deno.env.get(name);
  if (!value) throw new Error(`${name} is not set`);
  return value;
};

const issuer = env("JWT_ISSUER");
const audience = "authenticated";
const legacySecret = new TextEncoder().encode(env("SUPABASE_JWT_SECRET"));
// As edgegate: keys cached 10 minutes; an unknown kid refetches at most once per
// JWKS_MIN_REFRESH_SECONDS (jose's cool-down, 30 s by default like edgegate's).
const jwks = createRemoteJWKSet(new URL(env("SUPABASE_JWKS_URL")), {
  cacheMaxAge: 600_000,
  cooldownDuration: 1000 * Number(Deno.env.get("JWKS_MIN_REFRESH_SECONDS") ?? "30"),
});

const json = (status: number, body: unknown) =>
  new Response(JSON.stringify(body), {
    status,
    headers: { "content-type": "application/json" },
  });

const unauthorized = (code: string, message: string) =>
  json(401, { code, message });

async function handler(req: Request): Promise<Response> {
  // Read the body, as a function invoked through supabase-js would.
  await req.arrayBuffer();
  const authorization = req.headers.get("authorization") ?? "";
  const match = /^bearer\s+(\S+)$/i.exec(authorization);
  if (!match) {
    return unauthorized("UNAUTHORIZED_NO_AUTH_HEADER", "missing bearer token");
  }
  const token = match[1];
  try {
    const header = decodeProtectedHeader(token);
    const legacy = header.alg === "HS256";
    const { payload, protectedHeader } = legacy
      ? await jwtVerify(token, legacySecret, {
        algorithms: ["HS256"],
        issuer,
        audience,
      })
      : await jwtVerify(token, jwks, {
        algorithms: ["ES256", "RS256", "EdDSA"],
        issuer,
        audience,
      });
    return json(200, {
      valid: true,
      role: payload.role ?? null,
      sub: payload.sub ?? null,
      key: {
        source: legacy ? "legacy_secret" : "signing_key",
        kid: protectedHeader.kid ?? null,
        alg: protectedHeader.alg,
      },
      claims: payload,
    });
  } catch (error) {
    return unauthorized(
      "UNAUTHORIZED_INVALID_JWT",
      error instanceof Error ? error.message : "invalid token",
    );
  }
}

Deno.serve({
  hostname: "127.0.0.1",
  port: Number(env("PORT")),
  onListen: ({ hostname, port }) => console.error(`peer listening on ${hostname}:${port}`),
}, handler);
