// The edgegate binary as the Node test suites (tests/interop, tests/browser) run it: a real
// process on a free loopback port, ready once /readyz answers 200, stopped with SIGTERM.

import { spawn } from "node:child_process";
import { createServer } from "node:net";
import { join } from "node:path";

export function freePort() {
  return new Promise((ok) => {
    const probe = createServer();
    probe.listen(0, "127.0.0.1", () => {
      const { port } = probe.address();
      probe.close(() => ok(port));
    });
  });
}

export async function until(check, what) {
  for (let i = 0; i < 300; i++) {
    try {
      if (await check()) return;
    } catch {
      // not up yet
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error(`timed out waiting for ${what}`);
}

/**
 * Serves `bin` in `dir` with a SQLite file there and only `env` beyond PATH, HOST and PORT.
 * Resolves once /readyz answers 200, to the process and its base URL.
 */
export async function startEdgegate(bin, dir, env) {
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  const child = spawn(bin, ["serve"], {
    cwd: dir,
    env: {
      PATH: process.env.PATH,
      HOST: "127.0.0.1",
      PORT: String(port),
      DATABASE_URL: `sqlite://${join(dir, "edgegate.db")}`,
      RUST_LOG: "warn",
      ...env,
    },
    stdio: ["ignore", "inherit", "inherit"],
  });
  await until(async () => (await fetch(`${url}/readyz`)).status === 200, "edgegate /readyz");
  return { child, url };
}

/** SIGTERM, then the exit code (0 when it drained and stopped cleanly). */
export function stopEdgegate(child) {
  const exited = new Promise((ok) => child.once("exit", (code) => ok(code)));
  child.kill("SIGTERM");
  return exited;
}
