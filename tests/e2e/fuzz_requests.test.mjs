// Request fuzzing (serving.md 4.4: what vLLM does with schemathesis): valid bodies of every JSON route, each mutated
// at a random place (a value replaced by one of another type or size, a key dropped, a key added, a list emptied),
// seeded so a failure replays. Every answer must be a success or a 4xx in the route's error shape (never a 5xx, never
// a dropped connection), and the server must stay healthy and idle afterwards.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, waitIdle } from './server.mjs';

let srv;
// A short context keeps every generation a mutation lets through short.
before(async () => { srv = await startServer(['--max-model-len', '384', '--max-num-seqs', '4']); });
after(async () => { const r = await srv.stop(); assert.equal(r.code, 0, `exit ${JSON.stringify(r)}\n${srv.log()}`); });

// mulberry32: a small seeded PRNG.
function rng(seed) {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const tool = { type: 'function', function: { name: 'f', parameters: { type: 'object', properties: { a: { type: 'integer' } } } } };
const routes = {
  '/v1/chat/completions': { model: 'tiny', messages: [{ role: 'system', content: 'be brief' }, { role: 'user', content: 'hi' }],
    max_tokens: 4, temperature: 0.5, top_p: 0.9, top_k: 5, stop: ['x'], logprobs: true, top_logprobs: 2, n: 2, seed: 1,
    tools: [tool], tool_choice: 'auto', response_format: { type: 'json_object' }, stream: false,
    chat_template_kwargs: { enable_thinking: false }, logit_bias: { 5: 1 } },
  '/v1/completions': { model: 'tiny', prompt: 'The answer', max_tokens: 4, echo: true, logprobs: 2, n: 1,
    stop_token_ids: [3], min_tokens: 1, repetition_penalty: 1.1, stream: false, prompt_logprobs: 1 },
  '/v1/responses': { model: 'tiny', input: [{ role: 'user', content: [{ type: 'input_text', text: 'hi' }] }],
    instructions: 'brief', max_output_tokens: 4, reasoning: { effort: 'none' }, text: { format: { type: 'text' } },
    tools: [{ type: 'function', name: 'f', parameters: { type: 'object' } }], store: true },
  '/v1/responses/input_tokens': { model: 'tiny', input: 'hi', instructions: 'brief' },
  '/v1/messages': { model: 'tiny', max_tokens: 4, system: 'brief', messages: [{ role: 'user', content: [{ type: 'text', text: 'hi' }] }],
    thinking: { type: 'disabled' }, stop_sequences: ['x'], temperature: 0.5 },
  '/v1/messages/count_tokens': { model: 'tiny', messages: [{ role: 'user', content: 'hi' }] },
  '/tokenize': { messages: [{ role: 'user', content: 'hi' }], add_generation_prompt: true, return_token_strs: true },
  '/detokenize': { tokens: [1, 2, 3] },
};

const junk = [null, true, false, 0, -1, 1, 0.5, -0.5, 1e308, -1e308, 2 ** 53, 4294967297, '', 'x', 'tiny', '\u0000',
              '\ud83d\ude00', 'a'.repeat(3000), [], [1, 2], ['x'], [{}], {}, { a: 1 }, { type: 'text' }, [[[]]]];

// Every [parent, key] in v.
function places(v, out = [], depth = 0) {
  if (depth > 6 || v === null || typeof v !== 'object') return out;
  for (const k of Object.keys(v)) {
    out.push([v, Array.isArray(v) ? Number(k) : k]);
    places(v[k], out, depth + 1);
  }
  return out;
}

function mutate(body, r) {
  const b = structuredClone(body);
  const ps = places(b);
  const [parent, key] = ps[Math.floor(r() * ps.length)];
  const what = r();
  if (what < 0.6) parent[key] = structuredClone(junk[Math.floor(r() * junk.length)]);
  else if (what < 0.8 && !Array.isArray(parent)) delete parent[key];
  else if (what < 0.9 && Array.isArray(parent[key])) parent[key] = [];
  else parent[`unknown_${Math.floor(r() * 100)}`] = junk[Math.floor(r() * junk.length)];
  return b;
}

test('mutated bodies on every JSON route get 2xx or a 4xx error body, never a 5xx; the server stays up', async () => {
  const r = rng(47);
  let n4 = 0, n2 = 0;
  for (const [route, body] of Object.entries(routes)) {
    // the body itself is valid
    const ok = await fetch(`${srv.base}${route}`, { method: 'POST', headers: { 'Content-Type': 'application/json' },
                                                   body: JSON.stringify(body) });
    assert.equal(ok.status, 200, `${route}: ${await ok.text()}`);
    for (let i = 0; i < 60; ++i) {
      const m = mutate(body, r);
      const text = JSON.stringify(m);
      const res = await fetch(`${srv.base}${route}`, { method: 'POST', headers: { 'Content-Type': 'application/json' },
                                                      body: text });
      const out = await res.text();
      assert.ok(res.status < 500, `${route} ${res.status} for ${text.slice(0, 400)}\n-> ${out.slice(0, 400)}`);
      if (res.status >= 400) {
        ++n4;
        const j = JSON.parse(out);
        const message = j.error?.message;  // OpenAI's and Anthropic's error shapes both carry error.message
        assert.ok(typeof message === 'string' && message.length > 0, `${route}: ${out.slice(0, 300)}`);
      } else {
        ++n2;
        assert.ok(out.length > 0, `${route}: an empty ${res.status}`);
      }
    }
  }
  assert.ok(n4 > 50 && n2 > 50, `both kinds of answers seen: ${n2} successes, ${n4} errors`);
  assert.equal((await fetch(`${srv.base}/health`)).status, 200);
  await waitIdle(srv.base, 'requests left running after the fuzzing', 30000);
});
