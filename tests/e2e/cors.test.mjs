// CORS (docs/server.md "CORS") over real HTTP: what a browser page on another origin needs from the server — the
// preflight answered before authentication, Access-Control-Allow-Origin on answers, errors and streams — with vLLM's
// defaults (any origin) and with a listed origin, credentials and an API key.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { startServer } from './server.mjs';

// node:http, not fetch: fetch sets Origin itself and refuses to send some of these headers.
function request(base, method, path, headers = {}, body = undefined) {
  return new Promise((resolve, reject) => {
    const u = new URL(path, base);
    const req = http.request({ host: u.hostname, port: u.port, path: u.pathname, method, headers }, (res) => {
      let data = '';
      res.on('data', (d) => { data += d; });
      res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body: data }));
    });
    req.on('error', reject);
    if (body !== undefined) req.end(JSON.stringify(body));
    else req.end();
  });
}

const chat = { model: 'tiny', messages: [{ role: 'user', content: 'Hi' }], max_tokens: 3 };
const json = { 'Content-Type': 'application/json' };
const servers = [];
after(async () => { for (const s of servers) assert.equal((await s.stop()).code, 0); });

test('defaults: any origin may call the API; preflights, answers, streams and errors carry the headers', async () => {
  const srv = await startServer();
  servers.push(srv);
  const origin = { Origin: 'https://app.example' };
  const pre = await request(srv.base, 'OPTIONS', '/v1/chat/completions', {
    ...origin, 'Access-Control-Request-Method': 'POST', 'Access-Control-Request-Headers': 'authorization, content-type' });
  assert.equal(pre.status, 200, pre.body);
  assert.equal(pre.headers['access-control-allow-origin'], '*');
  assert.match(pre.headers['access-control-allow-methods'], /POST/);
  assert.equal(pre.headers['access-control-allow-headers'], 'authorization, content-type');
  assert.equal(pre.headers['access-control-max-age'], '600');
  const r = await request(srv.base, 'POST', '/v1/chat/completions', { ...origin, ...json }, chat);
  assert.equal(r.status, 200, r.body);
  assert.equal(r.headers['access-control-allow-origin'], '*');
  const s = await request(srv.base, 'POST', '/v1/chat/completions', { ...origin, ...json }, { ...chat, stream: true });
  assert.equal(s.status, 200);
  assert.match(s.body, /data: \[DONE\]/);
  assert.equal(s.headers['access-control-allow-origin'], '*', 'a stream carries the header too');
  const bad = await request(srv.base, 'POST', '/v1/chat/completions', { ...origin, ...json }, { model: 'tiny' });
  assert.equal(bad.status, 400);
  assert.equal(bad.headers['access-control-allow-origin'], '*', 'so the page can read the error');
  const missing = await request(srv.base, 'GET', '/v1/nothing', origin);
  assert.equal(missing.status, 404);
  assert.equal(missing.headers['access-control-allow-origin'], '*');
  const plain = await request(srv.base, 'POST', '/v1/chat/completions', json, chat);
  assert.equal(plain.headers['access-control-allow-origin'], undefined, 'no Origin, no CORS headers');
  const cookie = await request(srv.base, 'GET', '/v1/models', { ...origin, Cookie: 'a=b' });
  assert.equal(cookie.headers['access-control-allow-origin'], 'https://app.example');
  assert.equal(cookie.headers.vary, 'Origin');
});

test('listed origins, credentials and an API key: the preflight needs no key, the 401 is readable', async () => {
  const srv = await startServer(['--api-key', 'sk-test', '--allowed-origins', '["http://localhost:3000"]',
                                 '--allowed-methods', '["GET", "POST"]', '--allow-credentials']);
  servers.push(srv);
  const origin = { Origin: 'http://localhost:3000' };
  const pre = await request(srv.base, 'OPTIONS', '/v1/chat/completions', {
    ...origin, 'Access-Control-Request-Method': 'POST', 'Access-Control-Request-Headers': 'authorization' });
  assert.equal(pre.status, 200, pre.body);
  assert.equal(pre.headers['access-control-allow-origin'], 'http://localhost:3000');
  assert.equal(pre.headers['access-control-allow-credentials'], 'true');
  assert.equal(pre.headers['access-control-allow-methods'], 'GET, POST');
  const denied = await request(srv.base, 'OPTIONS', '/v1/chat/completions', {
    Origin: 'https://evil.example', 'Access-Control-Request-Method': 'DELETE' });
  assert.equal(denied.status, 400);
  assert.equal(denied.body, 'Disallowed CORS origin, method');
  const noKey = await request(srv.base, 'POST', '/v1/chat/completions', { ...origin, ...json }, chat);
  assert.equal(noKey.status, 401);
  assert.equal(noKey.headers['access-control-allow-origin'], 'http://localhost:3000');
  assert.equal(noKey.headers['access-control-allow-credentials'], 'true');
  const ok = await request(srv.base, 'POST', '/v1/chat/completions',
                           { ...origin, ...json, Authorization: 'Bearer sk-test' }, chat);
  assert.equal(ok.status, 200, ok.body);
  assert.equal(ok.headers['access-control-allow-origin'], 'http://localhost:3000');
  assert.equal(ok.headers.vary, 'Origin');
  const other = await request(srv.base, 'POST', '/v1/chat/completions',
                              { Origin: 'https://evil.example', ...json, Authorization: 'Bearer sk-test' }, chat);
  assert.equal(other.status, 200, 'the server answers; the browser withholds it from the page');
  assert.equal(other.headers['access-control-allow-origin'], undefined);
});

test('a malformed CORS flag stops the server at start with the flag named', async () => {
  await assert.rejects(startServer(['--allowed-origins', 'http://localhost:3000']),
                       /--allowed-origins: expected a JSON list of strings like '\["\*"\]', got 'http:\/\/localhost:3000'/);
  await assert.rejects(startServer(['--allowed-headers', '[1]']), /--allowed-headers: expected a JSON list of strings/);
});
