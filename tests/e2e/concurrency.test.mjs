// 32 concurrent streaming clients against one server, some disconnecting at random: every completed greedy
// response equals the same request served alone, nothing is lost or duplicated, memory returns to baseline.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import OpenAI from 'openai';
import { startServer, goldenJson, metrics } from './server.mjs';

let srv, client;
const golden = goldenJson();

before(async () => {
  srv = await startServer(['--max-model-len', '512', '--max-num-seqs', '8', '--max-num-batched-tokens', '96']);
  client = new OpenAI({ baseURL: `${srv.base}/v1`, apiKey: 'unused', maxRetries: 0 });
});
after(async () => {
  const { code } = await srv.stop();
  assert.equal(code, 0);
});

// Deterministic pseudo-random numbers so a failure can be replayed.
function rng(seed) {
  let s = seed >>> 0;
  return () => ((s = (s * 1664525 + 1013904223) >>> 0) / 2 ** 32);
}

async function streamTokens(prompt, maxTokens, { abortAfter = -1 } = {}) {
  const ctrl = new AbortController();
  const stream = await client.completions.create(
    { model: 'tiny', prompt, max_tokens: maxTokens, temperature: 0, stream: true, return_token_ids: true, ignore_eos: true },
    { signal: ctrl.signal });
  const ids = [];
  let finish = null, chunks = 0;
  try {
    for await (const chunk of stream) {
      for (const c of chunk.choices) {
        if (c.token_ids) ids.push(...c.token_ids);
        if (c.finish_reason) finish = c.finish_reason;
      }
      if (++chunks === abortAfter) { ctrl.abort(); break; }
    }
  } catch (e) {
    if (!ctrl.signal.aborted) throw e;
  }
  return { ids, finish, aborted: ctrl.signal.aborted };
}

test('32 concurrent streams, random disconnects: outputs equal solo runs; slots and blocks return', async () => {
  const prompts = golden.text.int4.map((p) => p.prompt);
  const rand = rng(42);
  const jobs = [];
  for (let i = 0; i < 32; ++i) {
    const prompt = prompts[i % prompts.length].slice(0, 20 + (i * 7) % 100);
    const maxTokens = 8 + (i * 5) % 17;
    const abortAfter = rand() < 0.3 ? 1 + Math.floor(rand() * 5) : -1;
    jobs.push({ prompt, maxTokens, abortAfter });
  }
  const results = await Promise.all(jobs.map((j) => streamTokens(j.prompt, j.maxTokens, { abortAfter: j.abortAfter })));
  // Solo runs afterwards, one at a time.
  let completed = 0;
  for (let i = 0; i < jobs.length; ++i) {
    const r = results[i];
    if (r.aborted) continue;
    completed++;
    const solo = await client.completions.create({ model: 'tiny', prompt: jobs[i].prompt, max_tokens: jobs[i].maxTokens,
                                                   temperature: 0, return_token_ids: true, ignore_eos: true });
    assert.equal(r.finish, 'length', `request ${i} finished`);
    assert.equal(r.ids.length, jobs[i].maxTokens, `request ${i}: no token lost or duplicated`);
    assert.deepEqual(r.ids, solo.choices[0].token_ids, `request ${i} equals its solo run`);
  }
  assert.ok(completed >= 16, `most requests completed (${completed})`);
  // Memory back to baseline within a few steps of the last disconnect.
  const deadline = Date.now() + 10000;
  for (;;) {
    const m = await metrics(srv.base);
    const busy = m.get('num_requests_running') + m.get('num_requests_waiting') + m.get('kv_blocks_used') + m.get('state_slots_used');
    if (busy === 0) break;
    if (Date.now() > deadline) assert.fail(`resources not released: ${m.text.split('\n').filter((l) => /running|waiting|used/.test(l)).join(' | ')}`);
    await new Promise((r) => setTimeout(r, 100));
  }
});

test('admission control answers 429 (Retry-After: 1) beyond the queue bound, and the server stays healthy', async () => {
  const small = await startServer(['--max-model-len', '512', '--max-num-seqs', '1', '--max-queued-requests', '1']);
  try {
    const c = new OpenAI({ baseURL: `${small.base}/v1`, apiKey: 'x', maxRetries: 0 });
    const reqs = [];
    for (let i = 0; i < 6; ++i)
      reqs.push(c.completions.create({ model: 'tiny', prompt: [1, 2, 3], max_tokens: 40, temperature: 0, ignore_eos: true })
        .then(() => 200, (e) => {
          if (e.status === 429) assert.equal(e.headers.get('retry-after'), '1');
          return e.status;
        }));
    const statuses = await Promise.all(reqs);
    assert.ok(statuses.includes(429), `some requests were refused: ${statuses}`);
    assert.ok(statuses.includes(200), `some requests were served: ${statuses}`);
    assert.equal((await fetch(`${small.base}/health`)).status, 200);
  } finally {
    assert.equal((await small.stop()).code, 0);
  }
});
