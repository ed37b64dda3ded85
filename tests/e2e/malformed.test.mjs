// Malformed input: bad JSON, bad UTF-8, huge numbers, wrong types, missing fields, oversized bodies.
// Every one gets a 4xx in OpenAI's error schema and the server stays healthy.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer } from './server.mjs';

let srv;
before(async () => { srv = await startServer(['--max-model-len', '256', '--api-key', 'sekret']); });
after(async () => { const r = await srv.stop(); assert.equal(r.code, 0, `exit ${JSON.stringify(r)}\n${srv.log()}`); });

const auth = { Authorization: 'Bearer sekret', 'Content-Type': 'application/json' };

async function post(path, body, headers = auth) {
  const r = await fetch(`${srv.base}${path}`, { method: 'POST', headers, body });
  let json = null;
  try { json = await r.json(); } catch { /* not json */ }
  return { status: r.status, json };
}

test('every /v1 route needs the API key', async () => {
  const r = await post('/v1/completions', JSON.stringify({ prompt: 'x' }), { 'Content-Type': 'application/json' });
  assert.equal(r.status, 401);
  assert.match(r.json.error.message, /API key/);
  const m = await fetch(`${srv.base}/v1/models`, { headers: { Authorization: 'Bearer wrong' } });
  assert.equal(m.status, 401);
  assert.equal((await fetch(`${srv.base}/health`)).status, 200, '/health needs no key');
});

test('malformed bodies get clear 4xx errors and the server survives', async () => {
  const cases = [
    ['/v1/chat/completions', '{', /not valid JSON/],
    ['/v1/chat/completions', '[]', /must be a JSON object/],
    ['/v1/chat/completions', 'null', /must be a JSON object/],
    ['/v1/chat/completions', Buffer.from([0x7b, 0x22, 0xff, 0xfe, 0x22, 0x3a, 0x31, 0x7d]), /not valid JSON/],
    ['/v1/chat/completions', '{"messages": "hi"}', /'messages' must be a non-empty list/],
    ['/v1/chat/completions', '{"messages": [{"content": "x"}]}', /role/],
    ['/v1/chat/completions', '{"messages": [{"role": "wizard", "content": "x"}]}', /role must be/],
    ['/v1/chat/completions', '{"messages": [{"role": "user", "content": 5}]}', /content/],
    ['/v1/chat/completions', '{"messages": [{"role":"user","content":"x"}], "max_tokens": 1e300}', /max_tokens/],
    ['/v1/chat/completions', '{"messages": [{"role":"user","content":"x"}], "max_tokens": -1}', /max_tokens/],
    ['/v1/chat/completions', '{"messages": [{"role":"user","content":"x"}], "max_tokens": 99999999999999999999999}', /max_tokens/],
    ['/v1/chat/completions', '{"messages": [{"role":"user","content":"x"}], "n": 0}', /'n'/],
    ['/v1/chat/completions', '{"messages": [{"role":"user","content":"x"}], "top_p": 7}', /top_p/],
    ['/v1/chat/completions', '{"messages": [{"role":"user","content":"x"}], "stop": 3}', /stop/],
    ['/v1/chat/completions', '{"messages": [{"role":"user","content":"x"}], "logit_bias": {"abc": 1}}', /logit_bias/],
    ['/v1/chat/completions', '{"messages": [{"role":"user","content":"x"}], "tools": [{"type": "nope"}]}', /tool/],
    ['/v1/chat/completions', '{"messages": [{"role":"user","content":"x"}], "tool_choice": {"type":"function","function":{"name":"ghost"}}}', /ghost/],
    ['/v1/completions', '{}', /'prompt' is required/],
    ['/v1/completions', '{"prompt": [1, -5]}', /token ids/],
    ['/v1/completions', '{"prompt": [1, 99999999]}', /outside the vocabulary/],
    ['/v1/completions', '{"prompt": {"a": 1}}', /prompt/],
    ['/v1/completions', '{"prompt": "x", "stream": "yes"}', /'stream' must be a boolean/],
    ['/v1/completions', '{"prompt": "x", "seed": 1.5}', /'seed' must be an integer/],
    ['/tokenize', '{"prompt": 7}', /prompt/],
    ['/tokenize', '{"prompt": "x", "return_token_strs": 1}', /'return_token_strs' must be a boolean/],
    ['/detokenize', '{"tokens": ["a"]}', /token ids/],
    ['/detokenize', '{"tokens": [4000000000]}', /token ids|vocab/],
  ];
  for (const [path, body, re] of cases) {
    const r = await post(path, body);
    assert.ok(r.status >= 400 && r.status < 500, `${path} ${body} -> ${r.status}`);
    assert.ok(r.json && r.json.error && typeof r.json.error.message === 'string', `${body}: OpenAI error schema`);
    assert.match(r.json.error.message, re, `${body}`);
  }
  // Oversized body: 413, or the connection closed before the client finished sending (the server
  // answers as soon as it sees Content-Length); either way the server stays up.
  let bigStatus;
  try {
    bigStatus = (await post('/v1/completions', JSON.stringify({ prompt: 'x'.repeat(40 << 20) }))).status;
  } catch (e) {
    bigStatus = 'closed';
  }
  assert.ok(bigStatus === 413 || bigStatus === 'closed', `oversized body -> ${bigStatus}`);
  const unknown = await post('/v1/completions', JSON.stringify({ prompt: [1, 2], max_tokens: 2, some_future_field: { x: 1 } }));
  assert.equal(unknown.status, 200, 'unknown fields are ignored');
  const nf = await fetch(`${srv.base}/v1/nothing`, { headers: auth });
  assert.equal(nf.status, 404);
  assert.equal((await fetch(`${srv.base}/health`)).status, 200);
});
