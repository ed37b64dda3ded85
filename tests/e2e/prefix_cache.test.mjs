// Prefix caching through the official openai SDK: a conversation's later turns and a shared system prompt resume
// from checkpoints (usage.prompt_tokens_details.cached_tokens), with the same output as a server without the cache;
// cache_salt keeps requests apart; the counters reach /metrics.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import OpenAI from 'openai';
import { startServer, metrics } from './server.mjs';

let cached, plain, tier, notier, c1, c2;
before(async () => {
  [cached, plain, tier, notier] = await Promise.all([
    startServer(['--max-model-len', '1024']),
    startServer(['--max-model-len', '1024', '--no-enable-prefix-caching']),
    // One device slot for checkpoints: the rest go to host memory (--cache-ram, default 8192 MiB), or nowhere.
    startServer(['--max-model-len', '1024', '--prefix-cache-checkpoints', '1', '--enable-log-requests']),
    startServer(['--max-model-len', '1024', '--prefix-cache-checkpoints', '1', '--cache-ram', '0'])]);
  c1 = new OpenAI({ baseURL: `${cached.base}/v1`, apiKey: 'unused', maxRetries: 0 });
  c2 = new OpenAI({ baseURL: `${plain.base}/v1`, apiKey: 'unused', maxRetries: 0 });
});
after(async () => {
  assert.equal((await cached.stop()).code, 0);
  assert.equal((await plain.stop()).code, 0);
  assert.equal((await tier.stop()).code, 0);
  assert.equal((await notier.stop()).code, 0);
});

const system = { role: 'system', content: 'You are a careful assistant. ' + 'Answer briefly and cite the rules you follow. '.repeat(8) };
const ask = (messages, extra = {}) => ({ model: 'tiny', messages, max_tokens: 10, temperature: 0,
                                         chat_template_kwargs: { enable_thinking: false }, ...extra });

test('a conversation resumes from the previous turn; outputs equal a server without the cache', async () => {
  let messages = [system, { role: 'user', content: 'What is the capital of France?' }];
  const seen = [];
  for (let turn = 0; turn < 3; ++turn) {
    const a = await c1.chat.completions.create(ask(messages));
    const b = await c2.chat.completions.create(ask(messages));
    assert.equal(a.choices[0].message.content, b.choices[0].message.content, `turn ${turn}`);
    assert.equal(a.usage.prompt_tokens, b.usage.prompt_tokens);
    assert.equal(b.usage.prompt_tokens_details.cached_tokens, 0);
    const got = a.usage.prompt_tokens_details.cached_tokens;
    seen.push(got);
    if (turn > 0) {
      assert.ok(got > 0 && got % 16 === 0 && got < a.usage.prompt_tokens, `turn ${turn}: cached ${got} of ${a.usage.prompt_tokens}`);
      assert.ok(got > seen[turn - 1], `turn ${turn} resumes later than turn ${turn - 1}`);
    }
    messages = [...messages, { role: 'assistant', content: a.choices[0].message.content },
                { role: 'user', content: `And number ${turn + 2}?` }];
  }
  assert.equal(seen[0], 0);
});

test('a shared system prompt: later requests resume after it; streamed usage too', async () => {
  const sys = { role: 'system', content: 'Rules of the house: ' + 'be kind, be exact, be brief. '.repeat(12) };
  const r1 = await c1.chat.completions.create(ask([sys, { role: 'user', content: 'Tell me about cats.' }]));
  const r2 = await c1.chat.completions.create(ask([sys, { role: 'user', content: 'Tell me about owls, please.' }]));
  assert.equal(r1.usage.prompt_tokens_details.cached_tokens, 0);
  // The first request left a checkpoint where its user message starts (the server's hint), rounded down to 16.
  assert.ok(r2.usage.prompt_tokens_details.cached_tokens >= 64, `cached ${r2.usage.prompt_tokens_details.cached_tokens}`);
  const req3 = ask([sys, { role: 'user', content: 'Something about rivers.' }]);
  const stream = await c1.chat.completions.create({ ...req3, stream: true, stream_options: { include_usage: true } });
  let usage = null, text = '';
  for await (const chunk of stream) {
    if (chunk.usage) usage = chunk.usage;
    for (const c of chunk.choices) text += c.delta.content ?? '';
  }
  assert.ok(usage.prompt_tokens_details.cached_tokens >= 64, `cached ${usage.prompt_tokens_details.cached_tokens}`);
  const ref = await c2.chat.completions.create(req3);
  assert.equal(text, ref.choices[0].message.content);
  const m = await metrics(cached.base);
  assert.ok(m.get('prefix_cache_hits_total') > 0);
  assert.ok(m.get('prefix_cache_queries_total') >= m.get('prefix_cache_hits_total'));
  assert.ok(m.get('prefix_cache_checkpoints') > 0);
  assert.equal((await metrics(plain.base)).get('prefix_cache_hits_total'), 0);
});

test('cache_salt: only requests with the same salt share; a bad salt is a 400', async () => {
  const msgs = [system, { role: 'user', content: 'Salted question number one.' }];
  const a = await c1.chat.completions.create(ask(msgs, { cache_salt: 'tenant-a' }));
  const b = await c1.chat.completions.create(ask(msgs, { cache_salt: 'tenant-b' }));
  const a2 = await c1.chat.completions.create(ask(msgs, { cache_salt: 'tenant-a' }));
  assert.equal(b.usage.prompt_tokens_details.cached_tokens, 0);
  assert.ok(a2.usage.prompt_tokens_details.cached_tokens > 0);
  assert.equal(a.choices[0].message.content, a2.choices[0].message.content);
  for (const bad of [7, '']) {
    await assert.rejects(c1.chat.completions.create(ask(msgs, { cache_salt: bad })), (e) => {
      assert.equal(e.status, 400);
      assert.match(e.message, /cache_salt/);
      return true;
    });
  }
});

test('parallel requests behind one system prompt prefill it once: the others resume from its checkpoint', async () => {
  const sys = { role: 'system', content: 'Parallel agents share this briefing. ' + 'Check twice, cut once. '.repeat(14) };
  const users = ['alpha task', 'beta task please', 'gamma', 'delta task, quickly'];
  const rs = await Promise.all(users.map((u) => c1.chat.completions.create(ask([sys, { role: 'user', content: u }]))));
  const cached = rs.map((r) => r.usage.prompt_tokens_details.cached_tokens);
  assert.equal(cached.filter((c) => c >= 64).length, 3, `cached ${cached}`);
  const refs = await Promise.all(users.map((u) => c2.chat.completions.create(ask([sys, { role: 'user', content: u }]))));
  for (let i = 0; i < users.length; ++i) assert.equal(rs[i].choices[0].message.content, refs[i].choices[0].message.content);
});

test('a finished answer is kept: the next turn, given back as token ids, resumes after it', async () => {
  // Token-id prompts through /v1/completions, so the next turn holds the answer exactly as it was generated (a chat
  // template re-renders the answer as text, which a random tiny model does not tokenize back the same way).
  const tok = (await (await fetch(`${cached.base}/tokenize`, {
    method: 'POST', headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'tiny', prompt: 'A long story begins here. ' + 'Once upon a time, in a quiet town, '.repeat(6) }),
  })).json()).tokens;
  const first = await c1.completions.create({ model: 'tiny', prompt: tok, max_tokens: 21, temperature: 0,
                                              return_token_ids: true });
  const answer = first.choices[0].token_ids;
  assert.equal(first.choices[0].finish_reason, 'length');
  assert.equal(answer.length, 21);
  const next = [...tok, ...answer, ...tok.slice(3, 12)];
  const req = { model: 'tiny', prompt: next, max_tokens: 8, temperature: 0 };
  const [a, b] = await Promise.all([c1.completions.create(req), c2.completions.create(req)]);
  assert.equal(a.choices[0].text, b.choices[0].text);
  // Every token the first request ran: the prompt and its answer but the last token (sampled, never run).
  assert.equal(a.usage.prompt_tokens_details.cached_tokens, tok.length + 20);
  assert.equal(b.usage.prompt_tokens_details.cached_tokens, 0);
});

test('--cache-ram: answers pushed out of the device slots wait in host memory for their next turns', async () => {
  const tokenize = async (text) => (await (await fetch(`${tier.base}/tokenize`, {
    method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ model: 'tiny', prompt: text }),
  })).json()).tokens;
  const stories = await Promise.all(['A harbour at dawn. ', 'The mountain road. ', 'Letters from a lighthouse. ']
    .map((t) => tokenize(t + 'Boats, gulls and ropes and the smell of tar, '.repeat(4))));
  const servers = [tier, notier].map((s) => new OpenAI({ baseURL: `${s.base}/v1`, apiKey: 'unused', maxRetries: 0 }));
  const answers = [[], []];
  for (const [k, c] of servers.entries()) {  // three conversations, one after another
    for (const tok of stories) {
      const r = await c.completions.create({ model: 'tiny', prompt: tok, max_tokens: 21, temperature: 0, return_token_ids: true });
      assert.equal(r.choices[0].finish_reason, 'length');
      answers[k].push(r.choices[0].token_ids);
    }
  }
  assert.deepEqual(answers[0], answers[1]);
  const m = await metrics(tier.base);
  assert.equal(m.get('prefix_cache_host_checkpoints'), m.get('prefix_cache_checkpoints') - 1);
  assert.ok(m.get('prefix_cache_host_checkpoints') >= 5, `host checkpoints ${m.get('prefix_cache_host_checkpoints')}`);
  assert.equal((await metrics(notier.base)).get('prefix_cache_host_checkpoints'), 0);
  for (const [i, tok] of stories.entries()) {  // each one's next turn
    const req = { model: 'tiny', prompt: [...tok, ...answers[0][i], ...tok.slice(2, 9)], max_tokens: 8, temperature: 0 };
    const [a, b, ref] = await Promise.all([servers[0].completions.create(req), servers[1].completions.create(req),
                                           c2.completions.create(req)]);
    assert.equal(a.choices[0].text, ref.choices[0].text, `conversation ${i}`);
    assert.equal(b.choices[0].text, ref.choices[0].text, `conversation ${i}`);
    // After the answer, from host memory; without it the one device slot holds another conversation's checkpoint.
    assert.equal(a.usage.prompt_tokens_details.cached_tokens, tok.length + 20, `conversation ${i}`);
    assert.equal(b.usage.prompt_tokens_details.cached_tokens, 0, `conversation ${i}`);
    assert.match(tier.log(), new RegExp(`finished ${a.id}: length, prompt \\d+ tokens \\(${tok.length + 20} cached from host memory\\)`));
  }
  const after = await metrics(tier.base);
  assert.equal(after.get('prefix_cache_host_hits_total'), stories.reduce((n, t) => n + t.length + 20, 0));
  assert.equal((await metrics(notier.base)).get('prefix_cache_host_hits_total'), 0);
});
