// End-to-end with the official `openai` npm SDK against a real deltaserve on loopback (tiny int4 model).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import OpenAI from 'openai';
import { startServer, goldenJson, metrics, BACKEND, MODEL } from './server.mjs';

let srv, client;
const golden = goldenJson();
const EOS = new Set([golden.special_tokens['<|im_end|>'], golden.special_tokens['<|endoftext|>']]);

before(async () => {
  srv = await startServer(['--max-model-len', '1024']);
  client = new OpenAI({ baseURL: `${srv.base}/v1`, apiKey: 'unused', maxRetries: 0 });
});
after(async () => {
  const { code } = await srv.stop();
  assert.equal(code, 0, 'graceful shutdown exits 0');
});

test('health answered 503 while loading, 200 when ready; /v1/models lists the served model', async () => {
  // (the tiny model often loads before the first probe; when a probe saw it loading, it was told when to retry)
  if (srv.sawLoading) assert.equal(srv.loadingRetryAfter, '5');
  const models = await client.models.list();
  assert.equal(models.data.length, 1);
  assert.equal(models.data[0].id, 'tiny');
  const m = await client.models.retrieve('tiny');
  assert.equal(m.id, 'tiny');
  assert.equal(m.object, 'model');
  await assert.rejects(client.models.retrieve('gpt-9'), (e) => {
    assert.ok(e instanceof OpenAI.NotFoundError, String(e));
    assert.match(e.message, /The model 'gpt-9' does not exist/);
    return true;
  });
});

test('greedy completions from token ids reproduce the reference continuations', async (t) => {
  // The fp32 CPU backend reproduces the fp32 reference; bf16 CUDA is held to the reference's own bf16 error
  // instead (tests/cuda/test_cuda_golden.cpp), so exact continuations are not expected there.
  if (BACKEND !== 'cpu') return t.skip('exact continuations are a CPU-backend property');
  for (const variant of [MODEL.includes('bf16') ? 'bf16' : 'int4']) {
    for (const p of golden.text[variant]) {
      if (p.min_top2_margin < 1e-3) continue;
      const r = await client.completions.create({
        model: 'tiny', prompt: p.prompt, max_tokens: 24, temperature: 0, return_token_ids: true,
      });
      let expected = [];
      for (const t of p.greedy) { if (EOS.has(t)) break; expected.push(t); }
      assert.deepEqual(r.choices[0].token_ids, expected, `prompt of ${p.prompt.length} tokens`);
      assert.equal(r.choices[0].finish_reason, expected.length < 24 ? 'stop' : 'length');
      assert.equal(r.usage.prompt_tokens, p.prompt.length);
      assert.equal(r.usage.completion_tokens, expected.length + (expected.length < 24 ? 1 : 0));
    }
  }
});

test('chat completion, non-streaming and streaming give the same text', async () => {
  const req = { model: 'tiny', messages: [{ role: 'user', content: 'Hello there' }], max_tokens: 20, temperature: 0,
                chat_template_kwargs: { enable_thinking: false } };
  const r = await client.chat.completions.create(req);
  assert.equal(r.object, 'chat.completion');
  assert.equal(r.choices[0].message.role, 'assistant');
  const stream = await client.chat.completions.create({ ...req, stream: true, stream_options: { include_usage: true } });
  let text = '', finish = null, usage = null, roleSeen = false;
  for await (const chunk of stream) {
    if (chunk.usage) usage = chunk.usage;
    for (const c of chunk.choices) {
      if (c.delta.role) roleSeen = true;
      text += c.delta.content ?? '';
      if (c.finish_reason) finish = c.finish_reason;
    }
  }
  assert.ok(roleSeen);
  assert.equal(text, r.choices[0].message.content ?? '');
  assert.equal(finish, r.choices[0].finish_reason);
  // The streamed request resumes from the checkpoint the first one left (prefix caching): only cached_tokens differs.
  assert.deepEqual({ ...usage, prompt_tokens_details: null }, { ...r.usage, prompt_tokens_details: null });
  assert.equal(r.usage.prompt_tokens_details.cached_tokens, 0);
  assert.ok(usage.prompt_tokens_details.cached_tokens > 0);
});

test('same seed, same output; n returns n choices', async () => {
  const req = { model: 'tiny', prompt: [1255, 1369, 548], max_tokens: 12, temperature: 1.0, top_p: 0.9, seed: 1234,
                return_token_ids: true };
  const a = await client.completions.create(req);
  const b = await client.completions.create(req);
  assert.deepEqual(a.choices[0].token_ids, b.choices[0].token_ids);
  const n = await client.completions.create({ ...req, n: 3 });
  assert.equal(n.choices.length, 3);
  assert.deepEqual(n.choices.map((c) => c.index), [0, 1, 2]);
});

test('stop strings cut the text exactly and finish with stop', async () => {
  const base = await client.completions.create({ model: 'tiny', prompt: [1255, 1369, 548, 434], max_tokens: 24,
                                                 temperature: 0, ignore_eos: true });
  const text = base.choices[0].text;
  if (text.length < 6) return;  // nothing to cut on this model
  const stop = text.slice(3, 5);
  const r = await client.completions.create({ model: 'tiny', prompt: [1255, 1369, 548, 434], max_tokens: 24,
                                              temperature: 0, ignore_eos: true, stop: [stop] });
  assert.equal(r.choices[0].text, text.slice(0, text.indexOf(stop)));
  assert.equal(r.choices[0].finish_reason, 'stop');
});

test('logprobs: chosen token and top alternatives', async () => {
  const r = await client.chat.completions.create({ model: 'tiny', messages: [{ role: 'user', content: 'Hi' }],
                                                   max_tokens: 4, temperature: 0, logprobs: true, top_logprobs: 3,
                                                   chat_template_kwargs: { enable_thinking: false } });
  const lp = r.choices[0].logprobs.content;
  assert.ok(lp.length >= 1);
  for (const t of lp) {
    assert.equal(t.top_logprobs.length, 3);
    assert.ok(t.logprob <= 0);
    assert.ok(Math.abs(t.logprob - t.top_logprobs[0].logprob) < 1e-5, 'greedy token is the most likely');
  }
});

// lm-evaluation-harness' loglikelihood call (its `local-completions` model): the context and continuation as token ids,
// echo, max_tokens 0, logprobs 1; it reads token_logprobs of the continuation and whether each token is the top one.
// The continuation here is the model's own greedy answer to the context, so its echoed logprobs equal the ones the
// generation reported (a prefill against decode steps: within rounding) and every continuation token is the top one.
test('echo with logprobs scores a continuation as lm-evaluation-harness does; prompt_logprobs as vLLM gives them', async () => {
  const ctx = golden.text[MODEL.includes('bf16') ? 'bf16' : 'int4'][2].prompt;
  const gen = await client.completions.create({ model: 'tiny', prompt: ctx, max_tokens: 6, temperature: 0, logprobs: 1,
                                                ignore_eos: true, return_token_ids: true });
  const cont = gen.choices[0].token_ids;
  assert.equal(cont.length, 6);
  const r = await client.completions.create({ model: 'tiny', prompt: [...ctx, ...cont], max_tokens: 0, echo: true,
                                              logprobs: 1, temperature: 0 });
  const c = r.choices[0], lp = c.logprobs;
  assert.equal(lp.tokens.length, ctx.length + cont.length, 'the prompt alone: no generated token');
  assert.equal(lp.token_logprobs[0], null);
  assert.equal(lp.top_logprobs[0], null);
  const detok = await (await fetch(`${srv.base}/detokenize`, { method: 'POST',
                                                              body: JSON.stringify({ tokens: [...ctx, ...cont] }) })).json();
  assert.equal(c.text, detok.prompt, 'token ids are echoed as their text');
  const tol = BACKEND === 'cpu' ? 1e-4 : 2e-2;
  for (let i = 0; i < cont.length; ++i) {
    const at = ctx.length + i, want = gen.choices[0].logprobs.token_logprobs[i];
    assert.ok(Math.abs(lp.token_logprobs[at] - want) < tol, `continuation token ${i}: ${lp.token_logprobs[at]} vs ${want}`);
    const top = Object.entries(lp.top_logprobs[at]).sort((a, b) => b[1] - a[1])[0];
    assert.equal(top[0], lp.tokens[at], 'greedy continuation: each token is the most likely');
  }
  for (let i = 1; i < lp.tokens.length; ++i) assert.ok(lp.token_logprobs[i] <= 0);
  for (let i = 1; i < lp.text_offset.length; ++i)
    assert.equal(lp.text_offset[i], lp.text_offset[i - 1] + [...lp.tokens[i - 1]].length, 'offsets count characters');
  // vLLM's prompt_logprobs (derived from echo + logprobs): null, then the prompt token with its rank and the top one.
  assert.equal(c.prompt_logprobs.length, ctx.length + cont.length);
  assert.equal(c.prompt_logprobs[0], null);
  for (let i = 0; i < cont.length; ++i) {
    const e = c.prompt_logprobs[ctx.length + i][String(cont[i])];
    assert.equal(e.rank, 1, 'the greedy token ranks first');
    assert.ok(Math.abs(e.logprob - lp.token_logprobs[ctx.length + i]) < 1e-6);
  }
  // n = 3 (a fresh prompt, a cache_salt of its own): every choice carries the prompt's logprobs, computed once by
  // the first choice; the other two resume from the checkpoint its prefill left (the prefix-cache hits say so).
  const before = await metrics(srv.base);
  const three = await client.completions.create({ model: 'tiny', prompt: [...ctx, ...cont], max_tokens: 2, echo: true,
                                                  logprobs: 1, temperature: 1, seed: 3, n: 3, cache_salt: 'n3-lps' });
  const after3 = await metrics(srv.base);
  assert.equal(three.choices.length, 3);
  for (const ch of three.choices) {
    assert.deepEqual(ch.prompt_logprobs, c.prompt_logprobs);
    assert.deepEqual(ch.logprobs.token_logprobs.slice(0, ctx.length + cont.length), lp.token_logprobs);
  }
  const hits = after3.get('prefix_cache_hits_total') - before.get('prefix_cache_hits_total');
  assert.ok(hits >= 2 * 16, `the 2nd and 3rd choices resumed from the 1st one's checkpoint (${hits} tokens hit)`);
  // Streaming: the prompt and its logprobs lead the choice, then the generated tokens with offsets after it.
  const stream = await client.completions.create({ model: 'tiny', prompt: [...ctx], max_tokens: 3, echo: true, logprobs: 1,
                                                   temperature: 0, ignore_eos: true, stream: true });
  const chunks = [];
  for await (const ch of stream) if (ch.choices.length && ch.choices[0].logprobs) chunks.push(ch.choices[0]);
  assert.equal(chunks[0].logprobs.tokens.length, ctx.length);
  assert.equal(chunks[0].logprobs.token_logprobs[0], null);
  for (let i = 1; i < ctx.length; ++i)
    assert.ok(Math.abs(chunks[0].logprobs.token_logprobs[i] - lp.token_logprobs[i]) < 1e-6, `prompt token ${i}`);
  const gen_lps = chunks.slice(1).flatMap((ch) => ch.logprobs.token_logprobs);
  assert.equal(gen_lps.length, 3);
  const last = chunks[0].logprobs.text_offset.at(-1) + [...chunks[0].logprobs.tokens.at(-1)].length;
  assert.equal(chunks[1].logprobs.text_offset[0], last);
  // return_tokens_as_token_ids on a request: the echoed prompt and prompt_logprobs' decoded tokens name ids.
  const asIds = await client.completions.create({ model: 'tiny', prompt: [...ctx, ...cont], max_tokens: 0, echo: true,
                                                  logprobs: 1, return_tokens_as_token_ids: true });
  assert.deepEqual(asIds.choices[0].logprobs.tokens, [...ctx, ...cont].map((t) => `token_id:${t}`));
  assert.equal(asIds.choices[0].prompt_logprobs[1][String(ctx[1])].decoded_token, `token_id:${ctx[1]}`);
  // Chat: prompt_logprobs once, at the top of the response; refused when streaming (vLLM's rule); bounded like logprobs.
  const chat = await client.chat.completions.create({ model: 'tiny', messages: [{ role: 'user', content: 'Hi' }],
                                                     max_tokens: 2, prompt_logprobs: 2 });
  assert.equal(chat.prompt_logprobs.length, chat.usage.prompt_tokens);
  assert.ok(Object.keys(chat.prompt_logprobs[1]).length >= 2);
  await assert.rejects(client.chat.completions.create({ model: 'tiny', messages: [{ role: 'user', content: 'Hi' }],
                                                        prompt_logprobs: 1, stream: true }),
                       (e) => e.status === 400 && /prompt_logprobs.*stream/.test(e.message));
  await assert.rejects(client.completions.create({ model: 'tiny', prompt: 'x', prompt_logprobs: 21 }),
                       (e) => e.status === 400 && /prompt_logprobs/.test(e.message));
  await assert.rejects(client.completions.create({ model: 'tiny', prompt: 'x', max_tokens: 0 }),
                       (e) => e.status === 400 && /max_tokens/.test(e.message));
});

// Speculative decoding with logprobs (greedy: the verified rows' logprobs on the backend) gives the tokens and logprobs
// of the plain server; --max-logprobs raises the cap of 20 (more alternatives come from the host path); the stats line
// reports the speculation.
test('logprobs under speculation, --max-logprobs, and the stats line of a speculating server', async () => {
  const req = { model: 'tiny', prompt: golden.text[MODEL.includes('bf16') ? 'bf16' : 'int4'][2].prompt, max_tokens: 16,
                temperature: 0, ignore_eos: true, logprobs: 3, return_tokens_as_token_ids: false };
  const plain = await client.completions.create(req);
  await assert.rejects(client.chat.completions.create({ model: 'tiny', messages: [{ role: 'user', content: 'Hi' }],
                                                        logprobs: true, top_logprobs: 21 }),
                       (e) => e.status === 400 && /'top_logprobs' must be at most 20 \(the server's --max-logprobs\)/.test(e.message));
  const spec = await startServer(['--max-model-len', '1024', '--max-logprobs', '30', '--log-stats-interval', '0.3',
                                  '--return-tokens-as-token-ids',
                                  '--speculative-config', '{"method": "mtp", "num_speculative_tokens": 2}']);
  try {
    const c2 = new OpenAI({ baseURL: `${spec.base}/v1`, apiKey: 'unused', maxRetries: 0 });
    const r = await c2.completions.create(req);
    assert.equal(r.choices[0].text, plain.choices[0].text);
    const a = r.choices[0].logprobs, b = plain.choices[0].logprobs;
    assert.deepEqual(a.tokens, b.tokens);
    const tol = BACKEND === 'cpu' ? 1e-4 : 2e-2;
    for (let i = 0; i < a.tokens.length; ++i) {
      assert.ok(Math.abs(a.token_logprobs[i] - b.token_logprobs[i]) < tol, `token ${i}`);
      assert.deepEqual(Object.keys(a.top_logprobs[i]), Object.keys(b.top_logprobs[i]));
    }
    const wide = await c2.chat.completions.create({ model: 'tiny', messages: [{ role: 'user', content: 'Hi' }],
                                                     max_tokens: 3, logprobs: true, top_logprobs: 25 });
    for (const t of wide.choices[0].logprobs.content) assert.equal(t.top_logprobs.length, 25);
    // --return-tokens-as-token-ids: logprobs name tokens "token_id:N" where the request does not say otherwise.
    const named = await c2.completions.create({ ...req, return_tokens_as_token_ids: undefined, return_token_ids: true });
    assert.deepEqual(named.choices[0].logprobs.tokens, named.choices[0].token_ids.map((t) => `token_id:${t}`));
    for (const top of named.choices[0].logprobs.top_logprobs)
      for (const k of Object.keys(top)) assert.match(k, /^token_id:\d+$/);
    const chat = await c2.chat.completions.create({ model: 'tiny', messages: [{ role: 'user', content: 'Hi' }], max_tokens: 3,
                                                     logprobs: true, top_logprobs: 2, return_token_ids: true });
    assert.deepEqual(chat.choices[0].logprobs.content.map((t) => t.token),
                     chat.choices[0].token_ids.map((t) => `token_id:${t}`));
    // Structured output is speculated too (drafts verified against the grammar's mask): the same greedy answer as the
    // plain server's, and drafts proposed for it (deltaserve:spec_decode_num_draft_tokens_total grows).
    const jreq = { model: 'tiny', prompt: 'JSON:', max_tokens: 60, temperature: 0,
                   structured_outputs: { regex: '[A-Z]{2}-[0-9]{2,6}( [a-z]{1,5}){0,3}' } };
    const before = await metrics(spec.base);
    const jspec = await c2.completions.create(jreq);
    const after = await metrics(spec.base);
    const jplain = await client.completions.create(jreq);
    assert.equal(jspec.choices[0].text, jplain.choices[0].text);
    assert.match(jspec.choices[0].text, /^[A-Z]{2}-[0-9]{2,6}( [a-z]{1,5}){0,3}$/);
    assert.ok(after.get('spec_decode_num_draft_tokens_total') > before.get('spec_decode_num_draft_tokens_total'),
              'the constrained request was speculated');
    // Sampled requests are speculated too (rejection sampling of the drafts on the backend): a seed gives the same
    // text twice, drafts are proposed for them, and a sampled regex answer is text of its pattern.
    const sreq = { model: 'tiny', prompt: 'Once', max_tokens: 24, temperature: 0.8, top_p: 0.95, seed: 11 };
    const sb = await metrics(spec.base);
    const s1 = await c2.completions.create(sreq), s2 = await c2.completions.create(sreq);
    assert.equal(s1.choices[0].text, s2.choices[0].text);
    const sr = await c2.completions.create({ ...jreq, temperature: 0.9, seed: 5 });
    assert.match(sr.choices[0].text, /^[A-Z]{2}-[0-9]{2,6}( [a-z]{1,5}){0,3}$/);
    const sa = await metrics(spec.base);
    assert.ok(sa.get('spec_decode_num_draft_tokens_total') > sb.get('spec_decode_num_draft_tokens_total'),
              'the sampled requests were speculated');
    // A constrained tool call (tool_choice required) on the speculating server: the plain server's call.
    const treq = { model: 'tiny', messages: [{ role: 'user', content: 'Weather?' }], max_tokens: 80, temperature: 0,
                   tool_choice: 'required', chat_template_kwargs: { enable_thinking: false },
                   tools: [{ type: 'function', function: { name: 'get_weather', parameters: { type: 'object',
                     properties: { city: { type: 'string', maxLength: 6 }, days: { type: 'integer' } },
                     required: ['city'] } } }] };
    const tspec = await c2.chat.completions.create(treq);
    const tplain = await client.chat.completions.create(treq);
    assert.equal(tspec.choices[0].finish_reason, 'tool_calls');
    assert.deepEqual(tspec.choices[0].message.tool_calls.map((c) => c.function),
                     tplain.choices[0].message.tool_calls.map((c) => c.function));
    const deadline = Date.now() + 10000;
    while (!/; speculative: mean acceptance length [0-9.]+, accepted \d+ of \d+ drafted/.test(spec.log())) {
      assert.ok(Date.now() < deadline, `no speculative stats line:\n${spec.log()}`);
      await new Promise((res) => setTimeout(res, 50));
    }
  } finally {
    await spec.stop();
  }
});

test('errors come back in OpenAI\'s schema with the right status', async () => {
  await assert.rejects(client.chat.completions.create({ model: 'nope', messages: [{ role: 'user', content: 'x' }] }),
                       (e) => e.status === 404 && /does not exist/.test(e.message));
  await assert.rejects(client.completions.create({ model: 'tiny', prompt: [1, 2, 3], max_tokens: 5000 }),
                       (e) => e.status === 400 && /maximum context length is 1024/.test(e.message));
  await assert.rejects(client.completions.create({ model: 'tiny', prompt: 'x', temperature: 'hot' }),
                       (e) => e.status === 400 && /'temperature' must be a number/.test(e.message));
  await assert.rejects(client.chat.completions.create({ model: 'tiny', messages: [] }),
                       (e) => e.status === 400 && /messages/.test(e.message));
  await assert.rejects(client.chat.completions.create({ model: 'tiny', messages: [{ role: 'user', content: [
    { type: 'image_url', image_url: { url: 'data:image/png;base64,AAAA' } }] }] }),
                       (e) => e.status === 400 && /messages\[0\]\.content\[0\]: image: .*format/.test(e.message));
  const raw = await fetch(`${srv.base}/v1/chat/completions`, { method: 'POST', body: '{"model": "tiny", "messages": [' });
  assert.equal(raw.status, 400);
  const body = await raw.json();
  assert.match(body.error.message, /not valid JSON/);
});

test('tokenize and detokenize round-trip', async () => {
  const t = await (await fetch(`${srv.base}/tokenize`, { method: 'POST', body: JSON.stringify({ prompt: 'Hello world' }) })).json();
  assert.ok(t.count > 0);
  const d = await (await fetch(`${srv.base}/detokenize`, { method: 'POST', body: JSON.stringify({ tokens: t.tokens }) })).json();
  assert.equal(d.prompt, 'Hello world');
  assert.equal(t.token_strs, undefined);
  // vLLM's return_token_strs: each token's tokenizer.json spelling (byte-level: a leading space is 'Ġ').
  const s = await (await fetch(`${srv.base}/tokenize`, { method: 'POST',
    body: JSON.stringify({ prompt: 'Hello world', return_token_strs: true }) })).json();
  assert.deepEqual(s.tokens, t.tokens);
  assert.equal(s.token_strs.length, t.tokens.length);
  assert.equal(s.token_strs.join('').replaceAll('\u0120', ' '), 'Hello world');
});

test('metrics are exposed in Prometheus format', async () => {
  const m = await metrics(srv.base);
  assert.ok(m.get('generation_tokens_total') > 0);
  assert.ok(!Number.isNaN(m.get('num_requests_running')));
  assert.match(m.text, /deltaserve:time_to_first_token_seconds_bucket/);
  assert.match(m.text, /deltaserve:inter_token_latency_seconds_bucket/);
});

test('per-request phases and sizes: one more request moves each histogram by one, with its own numbers', async () => {
  const hist = (text, name) => {
    const num = (suffix) => Number(text.match(new RegExp(`^deltaserve:${name}_${suffix}\\{[^}]*\\} ([0-9.e+-]+)$`, 'm'))?.[1]);
    return { count: num('count'), sum: num('sum') };
  };
  const names = ['request_queue_time_seconds', 'request_prefill_time_seconds', 'request_decode_time_seconds',
                 'request_inference_time_seconds', 'request_prompt_tokens', 'request_generation_tokens'];
  const before = (await metrics(srv.base)).text;
  const r = await client.completions.create({ model: 'tiny', prompt: [5, 6, 7, 8, 9, 10, 11], max_tokens: 9,
                                              temperature: 0, ignore_eos: true });
  assert.equal(r.usage.completion_tokens, 9);
  const after = (await metrics(srv.base)).text;
  const d = {};
  for (const n of names) {
    const a = hist(before, n), b = hist(after, n);
    assert.equal(b.count - a.count, 1, `${n}: count ${a.count} -> ${b.count}`);
    d[n] = b.sum - a.sum;
    assert.ok(d[n] >= 0, `${n}: sum ${a.sum} -> ${b.sum}`);
  }
  assert.ok(Math.abs(d.request_prompt_tokens - 7) < 1e-9, `prompt tokens ${d.request_prompt_tokens}`);
  assert.ok(Math.abs(d.request_generation_tokens - 9) < 1e-9, `generation tokens ${d.request_generation_tokens}`);
  assert.ok(d.request_decode_time_seconds > 0 && d.request_prefill_time_seconds > 0);
  assert.ok(Math.abs(d.request_inference_time_seconds - d.request_prefill_time_seconds - d.request_decode_time_seconds) < 1e-3);
});
