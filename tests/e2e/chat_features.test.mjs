// Reasoning, tools, logit_bias and the dense model, through the official openai SDK.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import OpenAI from 'openai';
import { startServer, metrics, DATA } from './server.mjs';

let srv, client;
before(async () => {
  srv = await startServer(['--max-model-len', '1024']);
  client = new OpenAI({ baseURL: `${srv.base}/v1`, apiKey: 'unused', maxRetries: 0 });
});
after(async () => { assert.equal((await srv.stop()).code, 0); });

const weather = {
  type: 'function',
  function: { name: 'get_weather', description: 'Weather in a city',
              parameters: { type: 'object', properties: { city: { type: 'string' }, days: { type: 'integer' } },
                            required: ['city'] } },
};

test('thinking on: output is reasoning (reasoning_content and reasoning), streamed and not', async () => {
  const req = { model: 'tiny', messages: [{ role: 'user', content: 'Think about it' }], max_tokens: 12, temperature: 0,
                logit_bias: { 2009: -100 } };  // never close </think>: everything stays reasoning
  const r = await client.chat.completions.create(req);
  const m = r.choices[0].message;
  assert.ok(m.reasoning_content.length > 0, 'reasoning_content');
  assert.equal(m.reasoning, m.reasoning_content);
  assert.equal(m.content, '');
  let streamed = '';
  for await (const chunk of await client.chat.completions.create({ ...req, stream: true })) {
    for (const c of chunk.choices) {
      streamed += c.delta.reasoning_content ?? '';
      assert.ok(!c.delta.content, 'no content while thinking');
    }
  }
  assert.equal(streamed, m.reasoning_content);
});

test('</think> ends the reasoning; the rest is content', async () => {
  // Bias </think> (2009 in the tiny vocab) to come first: the reasoning is empty and the tag itself
  // appears in neither field; later tokens (again </think>, a non-special added token) are content.
  const r = await client.chat.completions.create({ model: 'tiny', messages: [{ role: 'user', content: 'Hi' }],
                                                   max_tokens: 3, temperature: 0, logit_bias: { 2009: 100 } });
  const m = r.choices[0].message;
  assert.equal(m.reasoning_content ?? '', '');
  assert.equal(m.content, '</think></think>');
});

test('thinking off via chat_template_kwargs: everything is content', async () => {
  const r = await client.chat.completions.create({ model: 'tiny', messages: [{ role: 'user', content: 'Hi' }],
                                                   max_tokens: 8, temperature: 0,
                                                   chat_template_kwargs: { enable_thinking: false } });
  assert.equal(r.choices[0].message.reasoning_content, undefined);
  assert.ok(typeof r.choices[0].message.content === 'string');
});

test('logit_bias forces a token', async () => {
  const r = await client.completions.create({ model: 'tiny', prompt: [1, 2, 3], max_tokens: 5, temperature: 0,
                                              logit_bias: { 300: 100 }, return_token_ids: true });
  assert.deepEqual(r.choices[0].token_ids, [300, 300, 300, 300, 300]);
});

test('tool_choice named: a call to that function with JSON arguments, streamed as tool_calls deltas', async () => {
  const req = { model: 'tiny', messages: [{ role: 'user', content: 'Weather in Paris?' }], tools: [weather],
                tool_choice: { type: 'function', function: { name: 'get_weather' } }, max_tokens: 24, temperature: 0,
                // the random model would ramble: make it close the parameter-less call at once
                logit_bias: {} };
  const r = await client.chat.completions.create(req);
  const calls = r.choices[0].message.tool_calls;
  assert.ok(calls && calls.length >= 1, JSON.stringify(r.choices[0].message));
  assert.equal(calls[0].type, 'function');
  assert.equal(calls[0].function.name, 'get_weather');
  assert.match(calls[0].id, /^call_/);
  JSON.parse(calls[0].function.arguments);  // valid JSON object text
  assert.ok(!(r.choices[0].message.content ?? '').includes('<tool_call>'));
  assert.ok(['tool_calls', 'length'].includes(r.choices[0].finish_reason));
  // Streaming: the first tool-call delta carries id and name; concatenated arguments are the same JSON.
  let name = null, id = null, args = '';
  for await (const chunk of await client.chat.completions.create({ ...req, stream: true })) {
    for (const c of chunk.choices)
      for (const t of c.delta.tool_calls ?? []) {
        if (t.id) { id = t.id; name = t.function.name; }
        if (t.index === 0) args += t.function.arguments ?? '';
        assert.ok(!(c.delta.content ?? '').includes('<tool_call>'));
      }
  }
  assert.equal(name, 'get_weather');
  assert.match(id, /^call_/);
  assert.deepEqual(JSON.parse(args), JSON.parse(calls[0].function.arguments));
});

test('tool results and assistant tool calls in history render (arguments as JSON strings)', async () => {
  const messages = [
    { role: 'user', content: 'Weather in Paris?' },
    { role: 'assistant', content: '', tool_calls: [{ id: 'call_1', type: 'function',
      function: { name: 'get_weather', arguments: '{"city": "Paris", "days": 2}' } }] },
    { role: 'tool', tool_call_id: 'call_1', content: 'sunny' },
  ];
  const tok = await (await fetch(`${srv.base}/tokenize`, { method: 'POST',
    body: JSON.stringify({ messages, tools: [weather] }) })).json();
  assert.ok(tok.count > 50);
  const r = await client.chat.completions.create({ model: 'tiny', messages, tools: [weather], max_tokens: 4 });
  assert.equal(r.choices.length, 1);
});

test('a template error (system message not first) is a 400 with the template\'s message', async () => {
  await assert.rejects(client.chat.completions.create({ model: 'tiny', max_tokens: 2, messages: [
    { role: 'user', content: 'a' }, { role: 'system', content: 'late' }] }),
  (e) => e.status === 400 && /system message/i.test(e.message));
});

test('the dense sibling serves too', async () => {
  const dense = await startServer(['--max-model-len', '512'], { model: path.join(DATA, 'tiny-dense/tiny-dense-int4') });
  try {
    const c = new OpenAI({ baseURL: `${dense.base}/v1`, apiKey: 'x', maxRetries: 0 });
    const r = await c.chat.completions.create({ model: 'tiny', messages: [{ role: 'user', content: 'Hi' }], max_tokens: 6 });
    assert.equal(r.object, 'chat.completion');
    assert.ok(r.usage.completion_tokens >= 1);
  } finally {
    assert.equal((await dense.stop()).code, 0);
  }
});

test('a bf16 DeltaNet state (--mamba-ssm-cache-dtype bfloat16) serves', async () => {
  const half = await startServer(['--max-model-len', '512', '--mamba-ssm-cache-dtype', 'bfloat16']);
  try {
    const c = new OpenAI({ baseURL: `${half.base}/v1`, apiKey: 'x', maxRetries: 0 });
    // Several at once: batched decode steps and a prefill beside them on bf16 state slots.
    const rs = await Promise.all(['Hi', 'Tell me a story about a cat', 'What is 2 + 2?'].map((content) =>
      c.chat.completions.create({ model: 'tiny', messages: [{ role: 'user', content }], max_tokens: 8, temperature: 0,
                                  ignore_eos: true })));
    for (const r of rs) {
      assert.equal(r.object, 'chat.completion');
      assert.equal(r.usage.completion_tokens, 8);
    }
  } finally {
    assert.equal((await half.stop()).code, 0);
  }
});

test('thinking_token_budget: N reasoning tokens, then </think> is forced and the rest is content', async () => {
  for (const budget of [0, 1, 6]) {
    const r = await client.chat.completions.create({
      model: 'tiny', messages: [{ role: 'user', content: 'Think briefly' }], max_tokens: 12, temperature: 1, seed: 2,
      logit_bias: { 2009: -100 },  // the model never closes the block itself
      thinking_token_budget: budget, return_token_ids: true, ignore_eos: true,
    });
    const c = r.choices[0];
    assert.equal(c.token_ids.indexOf(2009), budget, `budget ${budget}: ${JSON.stringify(c.token_ids)}`);
    assert.equal(c.token_ids.length, 12);
    assert.equal((c.message.reasoning_content ?? '').length > 0, budget > 0, `budget ${budget} reasoning`);
    assert.ok(c.message.content.length > 0, `budget ${budget}: content after the forced </think>`);
  }
  // without a budget the block stays open
  const r = await client.chat.completions.create({ model: 'tiny', messages: [{ role: 'user', content: 'Think' }],
    max_tokens: 8, temperature: 1, seed: 2, logit_bias: { 2009: -100 }, return_token_ids: true, ignore_eos: true });
  assert.ok(!r.choices[0].token_ids.includes(2009));
});

test('min_tokens holds back EOS; reasoning_effort none and top-level enable_thinking turn thinking off', async () => {
  const eos = 1986;  // <|im_end|> in the tiny vocabulary
  const r = await client.completions.create({ model: 'tiny', prompt: [5, 6, 7], max_tokens: 20, temperature: 0,
                                              logit_bias: { [eos]: 100 }, min_tokens: 5, return_token_ids: true });
  assert.equal(r.choices[0].finish_reason, 'stop');
  assert.equal(r.usage.completion_tokens, 6, 'five tokens, then the EOS the bias wants');
  assert.ok(!r.choices[0].token_ids.includes(eos));
  await assert.rejects(client.completions.create({ model: 'tiny', prompt: 'x', max_tokens: 3, min_tokens: 4 }),
                       (e) => e.status === 400 && /min_tokens/.test(e.message));
  const off = { model: 'tiny', messages: [{ role: 'user', content: 'Hi' }], max_tokens: 6, temperature: 0 };
  const ref = await client.chat.completions.create({ ...off, chat_template_kwargs: { enable_thinking: false } });
  for (const extra of [{ reasoning_effort: 'none' }, { enable_thinking: false }]) {
    const m = (await client.chat.completions.create({ ...off, ...extra })).choices[0].message;
    assert.equal(m.reasoning_content, undefined, JSON.stringify(extra));
    assert.equal(m.content, ref.choices[0].message.content, JSON.stringify(extra));
  }
  // chat_template_kwargs wins over the top-level switch; any other effort leaves thinking on
  const on = (await client.chat.completions.create({ ...off, reasoning_effort: 'none', logit_bias: { 2009: -100 },
                                                     chat_template_kwargs: { enable_thinking: true } })).choices[0];
  assert.ok(on.message.reasoning_content.length > 0);
  const high = (await client.chat.completions.create({ ...off, reasoning_effort: 'high', logit_bias: { 2009: -100 } }));
  assert.ok(high.choices[0].message.reasoning_content.length > 0);
  await assert.rejects(client.chat.completions.create({ ...off, reasoning_effort: 'extreme' }),
                       (e) => e.status === 400 && /reasoning_effort/.test(e.message));
});

test('allowed_token_ids restricts every token; bad_words keeps a word out', async () => {
  const allowed = [300, 301, 302, 777];
  const r = await client.completions.create({ model: 'tiny', prompt: [1, 2, 3], max_tokens: 16, temperature: 1, seed: 4,
                                              allowed_token_ids: allowed, return_token_ids: true, ignore_eos: true });
  for (const t of r.choices[0].token_ids) assert.ok(allowed.includes(t), `token ${t}`);
  // A word of the greedy continuation that is one token on its own becomes the bad word: the continuation is the
  // same up to its first place and differs there.
  const base = { model: 'tiny', prompt: 'The capital of France is', max_tokens: 16, temperature: 0, ignore_eos: true,
                 return_token_ids: true };
  const post = async (route, body) => (await fetch(`${srv.base}${route}`, {
    method: 'POST', body: JSON.stringify(body), headers: { 'Content-Type': 'application/json' } })).json();
  const ref = (await client.completions.create(base)).choices[0].token_ids;
  let k = -1, word = '';
  for (let i = 0; i < ref.length && k < 0; ++i) {
    const text = (await post('/detokenize', { tokens: [ref[i]] })).prompt;
    const w = text.trim();
    if (!/^[A-Za-z]{2,}$/.test(w) || ref.slice(0, i).includes(ref[i])) continue;
    const alone = (await post('/tokenize', { prompt: w, add_special_tokens: false })).tokens;
    const spaced = (await post('/tokenize', { prompt: ' ' + w, add_special_tokens: false })).tokens;
    if ((alone.length === 1 && alone[0] === ref[i]) || (spaced.length === 1 && spaced[0] === ref[i])) { k = i; word = w; }
  }
  assert.ok(k >= 0, `no one-token word in ${JSON.stringify(ref)}`);
  const got = (await client.completions.create({ ...base, bad_words: [word] })).choices[0].token_ids;
  assert.deepEqual(got.slice(0, k), ref.slice(0, k));
  assert.notEqual(got[k], ref[k], `bad word ${JSON.stringify(word)} at ${k}`);
  await assert.rejects(client.completions.create({ ...base, allowed_token_ids: [999999] }),
                       (e) => e.status === 400 && /allowed_token_ids/.test(e.message));
  await assert.rejects(client.completions.create({ ...base, bad_words: [3] }),
                       (e) => e.status === 400 && /bad_words/.test(e.message));
});

test('repetition_detection ends a loop: finish_reason repetition, stop_reason repetition_detected; 400s', async () => {
  const req = { model: 'tiny', messages: [{ role: 'user', content: 'Loop' }], max_tokens: 40, temperature: 0,
                logit_bias: { 300: 100 }, repetition_detection: { max_pattern_size: 4, min_count: 6 },
                chat_template_kwargs: { enable_thinking: false } };
  const r = await client.chat.completions.create(req);
  assert.equal(r.choices[0].finish_reason, 'repetition');
  assert.equal(r.choices[0].stop_reason, 'repetition_detected');
  assert.equal(r.usage.completion_tokens, 6);
  let finish = null, stopReason = null;
  for await (const chunk of await client.chat.completions.create({ ...req, stream: true }))
    for (const c of chunk.choices) if (c.finish_reason) { finish = c.finish_reason; stopReason = c.stop_reason; }
  assert.equal(finish, 'repetition');
  assert.equal(stopReason, 'repetition_detected');
  const plain = await client.chat.completions.create({ ...req, repetition_detection: undefined, max_tokens: 10 });
  assert.equal(plain.choices[0].finish_reason, 'length');
  assert.equal(plain.choices[0].stop_reason, null);
  for (const [bad, re] of [[{ max_pattern_size: 2, min_count: 1 }, /min_count/], [7, /object/],
                           [{ max_pattern_size: 1, min_pattern_size: 3, min_count: 2 }, /min_pattern_size/],
                           [{ max_pattern: 4 }, /unknown key 'max_pattern'/]])
    await assert.rejects(client.chat.completions.create({ ...req, repetition_detection: bad }),
                         (e) => e.status === 400 && /repetition_detection/.test(e.message) && re.test(e.message));
});

test('stop_reason names the stop string or stop_token_ids id that ended a choice', async () => {
  const base = { model: 'tiny', prompt: [1, 2, 3], max_tokens: 8, temperature: 0, ignore_eos: true, return_token_ids: true };
  const ref = (await client.completions.create(base)).choices[0];
  const byId = (await client.completions.create({ ...base, stop_token_ids: [ref.token_ids[3]] })).choices[0];
  assert.equal(byId.finish_reason, 'stop');
  assert.equal(byId.stop_reason, ref.token_ids[3]);
  const m = ref.text.match(/[A-Za-z]{2}/);  // plain letters: no byte of a character split across tokens
  assert.ok(m, `no two letters in ${JSON.stringify(ref.text)}`);
  const cut = m[0];
  const byText = (await client.completions.create({ ...base, stop: [cut] })).choices[0];
  assert.equal(byText.finish_reason, 'stop');
  assert.equal(byText.stop_reason, cut);
  assert.equal(ref.stop_reason, null);
});

test('include_stop_str_in_output keeps the stop string, streamed and not; truncate_prompt_tokens keeps the prompt\'s tail', async () => {
  const base = { model: 'tiny', prompt: [1, 2, 3], max_tokens: 8, temperature: 0, ignore_eos: true };
  const ref = (await client.completions.create(base)).choices[0];
  const m = ref.text.match(/[A-Za-z]{2}/);
  assert.ok(m, `no two letters in ${JSON.stringify(ref.text)}`);
  const upTo = ref.text.slice(0, m.index + 2);
  const kept = (await client.completions.create({ ...base, stop: [m[0]], include_stop_str_in_output: true })).choices[0];
  assert.equal(kept.text, upTo);
  assert.equal(kept.stop_reason, m[0]);
  const cut = (await client.completions.create({ ...base, stop: [m[0]] })).choices[0];
  assert.equal(cut.text, ref.text.slice(0, m.index));
  let streamed = '';
  for await (const c of await client.completions.create({ ...base, stop: [m[0]], include_stop_str_in_output: true, stream: true }))
    streamed += c.choices[0]?.text ?? '';
  assert.equal(streamed, upTo);

  // truncate_prompt_tokens: the answer is the one to the prompt's last N tokens; usage counts what was kept.
  const long = { model: 'tiny', max_tokens: 6, temperature: 0, ignore_eos: true, return_token_ids: true };
  const tail = (await client.completions.create({ ...long, prompt: [40, 41, 42, 43] })).choices[0];
  const t = await client.completions.create({ ...long, prompt: [7, 8, 9, 10, 11, 40, 41, 42, 43], truncate_prompt_tokens: 4,
                                             echo: true });
  assert.equal(t.usage.prompt_tokens, 4);
  assert.deepEqual(t.choices[0].prompt_token_ids, [40, 41, 42, 43]);
  assert.deepEqual(t.choices[0].token_ids, tail.token_ids);
  const whole = await client.completions.create({ ...long, prompt: [7, 8, 9], truncate_prompt_tokens: -1 });
  assert.equal(whole.usage.prompt_tokens, 3, '-1 keeps up to --max-model-len tokens');
  const chat = await client.chat.completions.create({ model: 'tiny', messages: [{ role: 'user', content: 'a b c d e f g' }],
                                                      max_tokens: 2, truncate_prompt_tokens: 5 });
  assert.equal(chat.usage.prompt_tokens, 5);
  for (const [extra, re] of [[{ truncate_prompt_tokens: 0 }, /truncate_prompt_tokens' must be -1 .* or at least 1, got 0/],
                             [{ truncate_prompt_tokens: -2 }, /truncate_prompt_tokens' must be in \[-1/],
                             [{ include_stop_str_in_output: 'yes' }, /include_stop_str_in_output/]])
    await assert.rejects(client.completions.create({ ...base, ...extra }), (e) => e.status === 400 && re.test(e.message));
});

test('priority is taken (an integer; other values are a 400)', async () => {
  const base = { model: 'tiny', prompt: [1, 2, 3], max_tokens: 4, temperature: 0, return_token_ids: true };
  const a = await client.completions.create(base);
  const b = await client.completions.create({ ...base, priority: -7 });
  assert.deepEqual(b.choices[0].token_ids, a.choices[0].token_ids);
  for (const bad of ['high', 1.5])
    await assert.rejects(client.completions.create({ ...base, priority: bad }),
                         (e) => e.status === 400 && /priority/.test(e.message));
});

test('an urgent request preempts a less urgent one that holds the only slot; both outputs stay exact', async () => {
  const one = await startServer(['--max-model-len', '1024', '--max-num-seqs', '1']);
  try {
    const c = new OpenAI({ baseURL: `${one.base}/v1`, apiKey: 'unused', maxRetries: 0 });
    const long = { model: 'tiny', prompt: [5, 6, 7, 8, 9], max_tokens: 400, temperature: 0, ignore_eos: true,
                   return_token_ids: true };
    const urgent = { model: 'tiny', prompt: [11, 12, 13], max_tokens: 4, temperature: 0, return_token_ids: true };
    const refLong = await client.completions.create(long);
    const refUrgent = await client.completions.create(urgent);
    const events = [];
    const stream = await c.completions.create({ ...long, priority: 5, stream: true });
    let ids = [], urgentDone = null;
    for await (const chunk of stream) {
      for (const ch of chunk.choices) ids = ids.concat(ch.token_ids ?? []);
      if (ids.length >= 5 && !urgentDone)  // the long one is decoding in the only slot
        urgentDone = c.completions.create({ ...urgent, priority: 0 }).then((r) => { events.push('urgent'); return r; });
    }
    events.push('long');
    const u = await urgentDone;
    assert.deepEqual(events, ['urgent', 'long']);
    assert.deepEqual(u.choices[0].token_ids, refUrgent.choices[0].token_ids);
    assert.deepEqual(ids, refLong.choices[0].token_ids);  // preempted and recomputed: the same tokens
    const m = await metrics(one.base);
    assert.ok(m.get('num_preemptions_total') >= 1, `preemptions ${m.get('num_preemptions_total')}`);
  } finally {
    assert.equal((await one.stop()).code, 0);
  }
});

test('continue_final_message: the reply continues the final assistant message; errors name the field', async () => {
  const messages = [{ role: 'user', content: 'Write a haiku.' }, { role: 'assistant', content: 'Autumn moonlight' }];
  const req = { model: 'tiny', messages, max_tokens: 6, temperature: 0, continue_final_message: true,
                add_generation_prompt: false, logit_bias: { 1984: -100, 1986: -100 } };
  const r = await client.chat.completions.create(req);
  const tok = await (await fetch(`${srv.base}/tokenize`, {
    method: 'POST', headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ messages, continue_final_message: true }),
  })).json();
  assert.ok(tok.prompt.endsWith('<think>\n\n</think>\n\nAutumn moonlight'), JSON.stringify(tok.prompt));
  assert.equal(r.usage.prompt_tokens, tok.count);
  const c = await client.completions.create({ model: 'tiny', prompt: tok.tokens, max_tokens: 6, temperature: 0,
                                              logit_bias: { 1984: -100, 1986: -100 } });
  assert.equal(r.choices[0].message.content, c.choices[0].text);
  // Without it, the same messages open a new assistant turn after the closed one.
  const plain = await (await fetch(`${srv.base}/tokenize`, {
    method: 'POST', headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ messages }),
  })).json();
  assert.ok(plain.prompt.endsWith('Autumn moonlight<|im_end|>\n<|im_start|>assistant\n<think>\n'), JSON.stringify(plain.prompt));
  await assert.rejects(client.chat.completions.create({ ...req, messages: [messages[0], { role: 'assistant', content: [{ type: 'image_url', image_url: { url: 'data:,' } }] }] }),
                       (e) => e.status === 400 && /continue_final_message/.test(e.message));
});

test('chat echo (vLLM): the final assistant message leads the content, streamed as a chunk of its own', async () => {
  const messages = [{ role: 'user', content: 'Write a haiku.' }, { role: 'assistant', content: 'Autumn moonlight' }];
  const req = { model: 'tiny', messages, max_tokens: 6, temperature: 0, continue_final_message: true,
                add_generation_prompt: false, logit_bias: { 1984: -100, 1986: -100 } };
  const plain = await client.chat.completions.create(req);
  const echoed = await client.chat.completions.create({ ...req, echo: true });
  assert.equal(echoed.choices[0].message.content, 'Autumn moonlight' + plain.choices[0].message.content);
  assert.equal(echoed.usage.completion_tokens, plain.usage.completion_tokens, 'the echo is not generated');
  const deltas = [];
  for await (const chunk of await client.chat.completions.create({ ...req, echo: true, stream: true }))
    for (const c of chunk.choices) if (c.delta.content) deltas.push(c.delta.content);
  assert.equal(deltas[0], 'Autumn moonlight');
  assert.equal(deltas.join(''), echoed.choices[0].message.content);
  // Text parts are joined; a final user message (the reply is the assistant's) is not echoed.
  const parts = await client.chat.completions.create({ ...req, echo: true, messages: [messages[0],
    { role: 'assistant', content: [{ type: 'text', text: 'Autumn ' }, { type: 'text', text: 'moonlight' }] }] });
  assert.equal(parts.choices[0].message.content, echoed.choices[0].message.content);
  const user = await client.chat.completions.create({ model: 'tiny', messages: [messages[0]], max_tokens: 4,
                                                      temperature: 0, echo: true });
  const userPlain = await client.chat.completions.create({ model: 'tiny', messages: [messages[0]], max_tokens: 4,
                                                           temperature: 0 });
  assert.equal(user.choices[0].message.content, userPlain.choices[0].message.content);
});

test('include_reasoning false: the reasoning stays out of the message and the stream', async () => {
  const req = { model: 'tiny', messages: [{ role: 'user', content: 'Think about it' }], max_tokens: 12, temperature: 0,
                logit_bias: { 2009: -100 } };
  const withIt = await client.chat.completions.create(req);
  assert.ok(withIt.choices[0].message.reasoning_content.length > 0);
  const r = await client.chat.completions.create({ ...req, include_reasoning: false });
  assert.equal(r.choices[0].message.reasoning_content, undefined);
  assert.equal(r.choices[0].message.reasoning, undefined);
  assert.equal(r.usage.completion_tokens, withIt.usage.completion_tokens);
  for await (const chunk of await client.chat.completions.create({ ...req, include_reasoning: false, stream: true }))
    for (const c of chunk.choices) {
      assert.equal(c.delta.reasoning_content, undefined);
      assert.equal(c.delta.reasoning, undefined);
    }
});
