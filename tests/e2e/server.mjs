// Starts a real `deltaserve serve` on a free loopback port and stops it with SIGTERM.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import net from 'node:net';
import path from 'node:path';
import fs from 'node:fs';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));

export const BINARY = process.env.DS_BINARY || path.resolve(HERE, '../../build/deltaserve');
export const DATA = process.env.DS_TEST_DATA_DIR || path.resolve(HERE, '../data');
export const MODEL = process.env.DS_E2E_MODEL || path.join(DATA, 'tiny-moe/tiny-moe-int4');
export const BACKEND = process.env.DS_E2E_BACKEND || 'cpu';

async function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
    s.on('error', reject);
  });
}

export async function startServer(extraArgs = [], { model = MODEL, env = {} } = {}) {
  const port = await freePort();
  const args = ['serve', model, '--host', '127.0.0.1', '--port', String(port), '--backend', BACKEND,
                '--served-model-name', 'tiny', ...extraArgs];
  const proc = spawn(BINARY, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
  let log = '';
  proc.stdout.on('data', (d) => { log += d; });
  proc.stderr.on('data', (d) => { log += d; });
  const exited = new Promise((resolve) => proc.on('exit', (code, signal) => resolve({ code, signal })));
  const base = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + 60000;
  let sawLoading = false, loadingRetryAfter = null;
  for (;;) {
    if (proc.exitCode !== null) throw new Error(`server exited early (${proc.exitCode}):\n${log}`);
    try {
      const r = await fetch(`${base}/health`);
      if (r.status === 200) break;
      if (r.status === 503 && !sawLoading) {
        sawLoading = true;
        loadingRetryAfter = r.headers.get('retry-after');
      }
    } catch { /* not listening yet */ }
    if (Date.now() > deadline) { proc.kill('SIGKILL'); throw new Error(`server did not become healthy:\n${log}`); }
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    base, port, proc, sawLoading, loadingRetryAfter,
    log: () => log,
    async stop() {
      if (proc.exitCode === null) proc.kill('SIGTERM');
      return exited;
    },
  };
}

export async function metrics(base) {
  const text = await (await fetch(`${base}/metrics`)).text();
  const get = (name) => {
    const m = text.match(new RegExp(`^deltaserve:${name}\\{[^}]*\\} ([0-9.e+-]+)$`, 'm'));
    return m ? Number(m[1]) : NaN;
  };
  return { text, get };
}

// Waits until the server at base has no request running or waiting; fails with `why` after `ms`.
export async function waitIdle(base, why, ms = 5000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const m = await metrics(base);
    if (m.get('num_requests_running') + m.get('num_requests_waiting') === 0) return;
    if (Date.now() > deadline) assert.fail(why);
    await new Promise((r) => setTimeout(r, 50));
  }
}

export function goldenJson() {
  return JSON.parse(fs.readFileSync(path.join(DATA, 'tiny-moe/golden.json'), 'utf8'));
}

// Each [content, re] of cases: send(content) must fail with a 400 whose message matches re, and the server at
// base must still answer /health afterwards.
export async function expectBadRequests(base, send, cases) {
  for (const [content, re] of cases) {
    await assert.rejects(send(content), (e) => {
      assert.equal(e.status, 400, `${re}: ${e.status} ${e.message}`);
      assert.match(e.message, re);
      return true;
    });
    assert.equal((await fetch(`${base}/health`)).status, 200);
  }
}
