// The edgegate binary as the Node test suites (tests/interop, tests/browser) run it: a real
// process on a free loopback port, ready once /readyz answers 200, stopped with SIGTERM. Every
// wait is bounded, and a process that did not start is killed, so that a failure fails the run
// rather than leaving the test runner waiting for its child.

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
    } catch (error) {
      if (error.fatal) throw error; // otherwise not up yet
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
  const exited = new Promise((ok) => child.once("exit", (code, signal) => ok(code ?? signal)));
  try {
    await until(async () => {
      if (child.exitCode !== null || child.signalCode !== null) {
        const error = new Error(`edgegate exited (${await exited}) before /readyz answered 200`);
        error.fatal = true;
        throw error;
      }
      const ready = await fetch(`${url}/readyz`, { signal: AbortSignal.timeout(2000) });
      return ready.status === 200;
    }, "edgegate /readyz");
  } catch (error) {
    child.kill("SIGKILL");
    throw error;
  }
  return { child, url };
}

/**
 * SIGTERM, then the exit code (0 when it drained and stopped cleanly); after `limitMs` without
 * an exit, SIGKILL and "SIGKILL", so that the caller's check fails.
 */
export function stopEdgegate(child, limitMs = 20000) {
  if (child.exitCode !== null || child.signalCode !== null) {
    return Promise.resolve(child.exitCode ?? child.signalCode);
  }
  const exited = new Promise((ok) => child.once("exit", (code, signal) => ok(code ?? signal)));
  let timer;
  const late = new Promise((ok) => {
    timer = setTimeout(() => {
      child.kill("SIGKILL");
      ok("SIGKILL");
    }, limitMs);
  });
  child.kill("SIGTERM");
  return Promise.race([exited, late]).finally(() => clearTimeout(timer));
}
