// Anthropic's Messages API (POST /v1/messages, /v1/messages/count_tokens; docs/server.md "Anthropic Messages API")
// through the official @anthropic-ai/sdk, on the tiny model (random weights, Qwen3.5 template: <tool_call> 1998,
// </think> 2009, <|im_end|> 1986, EOS 1984 / 1986).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import Anthropic from '@anthropic-ai/sdk';
import { startServer, waitIdle, DATA } from './server.mjs';

let srv, client;
before(async () => {
  srv = await startServer(['--max-model-len', '2048']);
  client = new Anthropic({ baseURL: srv.base, apiKey: 'unused', maxRetries: 0 });
});
after(async () => { assert.equal((await srv.stop()).code, 0); });

const NO_END = { 1984: -100, 1986: -100 };  // the model's EOS set: the output runs to max_tokens
const user = (content) => [{ role: 'user', content }];
const setTimer = {
  name: 'set_timer', description: 'Starts a timer',
  input_schema: {
    type: 'object',
    properties: { unit: { type: 'string', enum: ['seconds', 'minutes'] }, amount: { type: 'integer' },
                  loud: { type: 'boolean' } },
    required: ['unit', 'amount', 'loud'],
  },
};

// The three ways to get a message: create, create({stream: true}) folded by hand (checking the event order: one
// block open at a time), and messages.stream().finalMessage().
async function threeWays(req) {
  const plain = await client.messages.create(req);
  const events = [];
  for await (const e of await client.messages.create({ ...req, stream: true })) events.push(e);
  assert.equal(events[0].type, 'message_start');
  assert.deepEqual(events[0].message.content, []);
  assert.equal(events.at(-1).type, 'message_stop');
  assert.equal(events.at(-2).type, 'message_delta');
  const content = [];
  const json = [];
  let open = -1;
  for (const e of events.slice(1, -2)) {
    if (e.type === 'content_block_start') {
      assert.equal(open, -1, 'a block opened while another was open');
      open = e.index;
      assert.equal(open, content.length);
      content.push({ ...e.content_block });
      json.push('');
    } else if (e.type === 'content_block_delta') {
      assert.equal(e.index, open);
      const b = content[open];
      if (e.delta.type === 'text_delta') b.text += e.delta.text;
      else if (e.delta.type === 'thinking_delta') b.thinking += e.delta.thinking;
      else if (e.delta.type === 'input_json_delta') json[open] += e.delta.partial_json;
      else assert.fail(`unexpected delta ${e.delta.type}`);
    } else if (e.type === 'content_block_stop') {
      assert.equal(e.index, open);
      if (content[open].type === 'tool_use' && json[open]) content[open].input = JSON.parse(json[open]);
      open = -1;
    } else {
      assert.fail(`unexpected event ${e.type}`);
    }
  }
  const streamed = { content, stop_reason: events.at(-2).delta.stop_reason, stop_sequence: events.at(-2).delta.stop_sequence,
                     usage: events.at(-2).usage };
  const final = await client.messages.stream(req).finalMessage();
  return { plain, streamed, final };
}

// Tool-use ids are fresh per response.
const noIds = (content) => content.map((b) => (b.type === 'tool_use' ? { ...b, id: 'ID' } : b));

function sameContent({ plain, streamed, final }) {
  assert.deepEqual(noIds(streamed.content), noIds(plain.content));
  assert.deepEqual(noIds(final.content), noIds(plain.content));
  assert.equal(streamed.stop_reason, plain.stop_reason);
  assert.equal(final.stop_reason, plain.stop_reason);
  assert.equal(streamed.stop_sequence, plain.stop_sequence);
  assert.equal(final.stop_sequence, plain.stop_sequence);
  assert.equal(streamed.usage.output_tokens, plain.usage.output_tokens);
  assert.equal(final.usage.output_tokens, plain.usage.output_tokens);
}

test('a message: its shape; streamed (both SDK ways) == not streamed', async () => {
  const req = { model: 'tiny', max_tokens: 12, temperature: 0, messages: user('Hello'), thinking: { type: 'disabled' },
                logit_bias: NO_END };
  const r = await threeWays(req);
  sameContent(r);
  const m = r.plain;
  assert.match(m.id, /^msg_/);
  assert.equal(m.type, 'message');
  assert.equal(m.role, 'assistant');
  assert.equal(m.model, 'tiny');
  assert.equal(m.content.length, 1);
  assert.equal(m.content[0].type, 'text');
  assert.ok(m.content[0].text.length > 0);
  assert.equal(m.stop_reason, 'max_tokens');
  assert.equal(m.stop_sequence, null);
  assert.equal(m.usage.output_tokens, 12);
  assert.equal(m.usage.cache_creation_input_tokens, 0);
  assert.ok(m.usage.input_tokens + m.usage.cache_read_input_tokens > 5);
});

test('thinking enabled with a budget: a thinking block, then a text block', async () => {
  const req = { model: 'tiny', max_tokens: 14, temperature: 0, messages: user('Think first'),
                thinking: { type: 'enabled', budget_tokens: 4 }, logit_bias: { ...NO_END, 2009: -100 } };
  const r = await threeWays(req);
  sameContent(r);
  const c = r.plain.content;
  assert.deepEqual(c.map((b) => b.type), ['thinking', 'text'], JSON.stringify(c));
  assert.ok(c[0].thinking.length > 0);
  assert.equal(c[0].signature, '');
  assert.ok(c[1].text.length > 0);
  // Thinking kept open (</think> banned, no budget): everything is thinking.
  const t = await client.messages.create({ ...req, thinking: { type: 'adaptive' } });
  assert.deepEqual(t.content.map((b) => b.type), ['thinking']);
  // Disabled: no thinking block.
  const d = await client.messages.create({ ...req, thinking: { type: 'disabled' } });
  assert.deepEqual(d.content.map((b) => b.type), ['text']);
});

function checkTimer(b) {
  assert.equal(b.type, 'tool_use');
  assert.equal(b.name, 'set_timer');
  assert.match(b.id, /^[A-Za-z0-9_-]+$/);
  assert.equal(typeof b.input, 'object');
  assert.ok(['seconds', 'minutes'].includes(b.input.unit), JSON.stringify(b.input));
  assert.ok(Number.isInteger(b.input.amount), JSON.stringify(b.input));
  assert.equal(typeof b.input.loud, 'boolean', JSON.stringify(b.input));
}

test('tool_choice tool: a valid constrained call, stop_reason tool_use, streamed == not streamed', async () => {
  const req = { model: 'tiny', max_tokens: 200, temperature: 0, messages: user('Set a timer'), tools: [setTimer],
                tool_choice: { type: 'tool', name: 'set_timer' } };
  const r = await threeWays(req);
  sameContent(r);
  const m = r.plain;
  assert.equal(m.stop_reason, 'tool_use');
  const calls = m.content.filter((b) => b.type === 'tool_use');
  assert.equal(calls.length, 1, JSON.stringify(m.content));
  checkTimer(calls[0]);
  assert.equal(m.content.at(-1).type, 'tool_use');
  // tool_choice any, one call only
  const a = await client.messages.create({ ...req, tool_choice: { type: 'any', disable_parallel_tool_use: true } });
  assert.equal(a.stop_reason, 'tool_use');
  assert.equal(a.content.filter((b) => b.type === 'tool_use').length, 1);
  checkTimer(a.content.find((b) => b.type === 'tool_use'));
});

test('multi-turn with tool_use / tool_result: rendered as the chat route renders its OpenAI equivalent', async () => {
  const messages = [
    { role: 'user', content: 'Set a timer' },
    { role: 'assistant', content: [{ type: 'thinking', thinking: 'A timer.', signature: '' },
                                   { type: 'text', text: 'Setting it.' },
                                   { type: 'tool_use', id: 'toolu_01', name: 'set_timer',
                                     input: { unit: 'seconds', amount: 5, loud: true } }] },
    { role: 'user', content: [{ type: 'tool_result', tool_use_id: 'toolu_01', content: 'timer started' },
                              { type: 'text', text: 'Thanks!' }] },
  ];
  const system = [{ type: 'text', text: 'You set timers.' }];
  const count = await client.messages.countTokens({ model: 'tiny', system, messages, tools: [setTimer] });
  const openai = [
    { role: 'system', content: 'You set timers.' },
    { role: 'user', content: 'Set a timer' },
    { role: 'assistant', content: 'Setting it.', reasoning_content: 'A timer.',
      tool_calls: [{ id: 'toolu_01', type: 'function',
                     function: { name: 'set_timer', arguments: { unit: 'seconds', amount: 5, loud: true } } }] },
    { role: 'tool', tool_call_id: 'toolu_01', content: 'timer started' },
    { role: 'user', content: 'Thanks!' },
  ];
  const tok = await (await fetch(`${srv.base}/tokenize`, {
    method: 'POST', headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ messages: openai, tools: [{ type: 'function', function: {
      name: setTimer.name, description: setTimer.description, parameters: setTimer.input_schema } }] }),
  })).json();
  assert.ok(tok.prompt.includes('<tool_response>\ntimer started\n</tool_response>'), tok.prompt);
  assert.ok(tok.prompt.includes('<parameter=amount>\n5\n</parameter>'), tok.prompt);
  assert.equal(count.input_tokens, tok.count);
  const m = await client.messages.create({ model: 'tiny', max_tokens: 8, temperature: 0, system, messages,
                                          tools: [setTimer] });
  assert.equal(m.usage.input_tokens + m.usage.cache_read_input_tokens, count.input_tokens);
  // A tool_result alone (the usual agent turn) and an error result.
  const r = await client.messages.create({ model: 'tiny', max_tokens: 4, temperature: 0, tools: [setTimer], messages: [
    ...messages.slice(0, 2),
    { role: 'user', content: [{ type: 'tool_result', tool_use_id: 'toolu_01', is_error: true,
                                content: [{ type: 'text', text: 'no clock' }] }] }] });
  assert.equal(r.type, 'message');
});

test('a final assistant message is a prefill: the reply continues it, as a completion of the prefilled prompt does', async () => {
  const messages = [{ role: 'user', content: 'Name a color in JSON.' }, { role: 'assistant', content: '{"color": "' }];
  const m = await client.messages.create({ model: 'tiny', max_tokens: 8, temperature: 0, messages, logit_bias: NO_END });
  // The prompt ends inside the assistant turn, right after the prefill (transformers' continue_final_message).
  const tok = await (await fetch(`${srv.base}/tokenize`, {
    method: 'POST', headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ messages, continue_final_message: true }),
  })).json();
  assert.ok(tok.prompt.endsWith('<|im_start|>assistant\n<think>\n\n</think>\n\n{"color": "'), JSON.stringify(tok.prompt));
  assert.equal(m.usage.input_tokens + m.usage.cache_read_input_tokens, tok.count);
  const c = await (await fetch(`${srv.base}/v1/completions`, {
    method: 'POST', headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'tiny', prompt: tok.tokens, max_tokens: 8, temperature: 0, logit_bias: NO_END }),
  })).json();
  assert.equal(m.content.map((b) => b.text ?? '').join(''), c.choices[0].text);
  // An assistant turn that ends in a tool call is history, not a prefill (a new turn opens after it).
  const count = await client.messages.countTokens({ model: 'tiny', tools: [setTimer], messages: [
    user('Set a timer')[0], { role: 'assistant', content: [{ type: 'tool_use', id: 't1', name: 'set_timer',
                                                             input: { unit: 'seconds', amount: 1, loud: false } }] }] });
  assert.ok(count.input_tokens > 0);
});

test('stop_sequences: cut at the match, stop_reason stop_sequence, the matched string', async () => {
  const req = { model: 'tiny', max_tokens: 24, temperature: 0, messages: user('Count'), thinking: { type: 'disabled' },
                logit_bias: NO_END };
  const full = (await client.messages.create(req)).content[0].text;
  // A stop string from the middle of the text (not at its very start).
  const at = [...full].slice(0, 3).join('').length;
  const stop = [...full.slice(at)].slice(0, 2).join('');
  assert.ok(stop.length > 0, full);
  const r = await threeWays({ ...req, stop_sequences: ['NEVER-SEEN', stop] });
  sameContent(r);
  const m = r.plain;
  assert.equal(m.stop_reason, 'stop_sequence');
  assert.equal(m.stop_sequence, stop);
  assert.equal(m.content[0]?.text ?? '', full.slice(0, full.indexOf(stop)));
});

test('count_tokens: the prompt a request renders, with tools, system and images', async () => {
  const base = { model: 'tiny', messages: user('Hello there') };
  const a = await client.messages.countTokens(base);
  const b = await client.messages.countTokens({ ...base, system: 'You are terse.' });
  const c = await client.messages.countTokens({ ...base, system: 'You are terse.', tools: [setTimer] });
  assert.ok(a.input_tokens > 3 && b.input_tokens > a.input_tokens && c.input_tokens > b.input_tokens + 20,
            JSON.stringify([a, b, c]));
  const m = await client.messages.create({ ...base, system: 'You are terse.', max_tokens: 1 });
  assert.equal(m.usage.input_tokens + m.usage.cache_read_input_tokens, b.input_tokens);
  // An image: the expanded placeholders count.
  const png = fs.readFileSync(path.join(DATA, 'tiny-moe/image.png')).toString('base64');
  const img = await client.messages.countTokens({ model: 'tiny', messages: user([
    { type: 'text', text: 'What is this?' },
    { type: 'image', source: { type: 'base64', media_type: 'image/png', data: png } }]) });
  assert.ok(img.input_tokens > a.input_tokens + 4, JSON.stringify(img));
  const r = await client.messages.create({ model: 'tiny', max_tokens: 2, messages: user([
    { type: 'image', source: { type: 'base64', media_type: 'image/png', data: png } },
    { type: 'text', text: 'What is this?' }]) });
  assert.equal(r.usage.input_tokens + r.usage.cache_read_input_tokens, img.input_tokens);
});

test('prefix cache: a repeated prompt reads from the cache (cache_read_input_tokens)', async () => {
  const long = 'The same long system prompt. '.repeat(40);
  const req = { model: 'tiny', max_tokens: 2, temperature: 0, system: long, messages: user('One') };
  const first = await client.messages.create(req);
  const second = await client.messages.create(req);
  const total = first.usage.input_tokens + first.usage.cache_read_input_tokens;
  assert.equal(second.usage.input_tokens + second.usage.cache_read_input_tokens, total);
  assert.ok(second.usage.cache_read_input_tokens > 0, JSON.stringify(second.usage));
});

test('errors in Anthropic\'s shape through the SDK\'s error classes', async () => {
  const expect400 = async (req, re) => {
    await assert.rejects(client.messages.create(req), (e) => {
      assert.ok(e instanceof Anthropic.BadRequestError, `${e.constructor.name} ${e.message}`);
      assert.equal(e.status, 400);
      assert.equal(e.error.type, 'error');
      assert.equal(e.error.error.type, 'invalid_request_error');
      assert.match(e.error.error.message, re);
      return true;
    });
  };
  await expect400({ model: 'tiny', messages: user('Hi') }, /^max_tokens: field required/);
  await expect400({ model: 'tiny', max_tokens: 0, messages: user('Hi') }, /'max_tokens' must be in \[1, /);
  await expect400({ model: 'tiny', max_tokens: 4, messages: [] }, /^messages: must be a non-empty list/);
  await expect400({ model: 'tiny', max_tokens: 4, messages: user('Hi'),
                    tools: [{ type: 'web_search_20250305', name: 'web_search' }] },
                  /server tools are not supported.*tools\[0\] \(type "web_search_20250305", name 'web_search'\)/);
  await expect400({ model: 'tiny', max_tokens: 4, messages: user([{ type: 'document', source: {} }]) },
                  /^messages\[0\]\.content\[0\]: content block type 'document' is not supported/);
  await expect400({ model: 'tiny', max_tokens: 4, messages: user([
    { type: 'text', text: 'x' }, { type: 'image', source: { type: 'base64', media_type: 'image/png', data: 'AAAA' } }]) },
                  /^messages\[0\]\.content\[1\]: image: /);
  await expect400({ model: 'tiny', max_tokens: 4, messages: user('Hi'), stop_sequences: Array(17).fill('x') },
                  /'stop_sequences' may hold at most 16/);
  await expect400({ model: 'tiny', max_tokens: 4, messages: user('Hi'),
                    tools: [{ name: 't', input_schema: { type: 'object', properties: { s: { type: 'string', patternProperties: {} } } } }],
                    tool_choice: { type: 'any' } }, /tools\[0\]\.input_schema: unsupported keyword "patternProperties"/);
  await assert.rejects(client.messages.create({ model: 'gpt-9', max_tokens: 4, messages: user('Hi') }), (e) => {
    assert.ok(e instanceof Anthropic.NotFoundError);
    assert.equal(e.error.error.type, 'not_found_error');
    return true;
  });
  // Raw: malformed JSON, and an unknown sub-route, also in Anthropic's shape; the OpenAI routes keep theirs.
  const raw = await fetch(`${srv.base}/v1/messages`, { method: 'POST', body: '{"model": ' });
  assert.equal(raw.status, 400);
  const body = await raw.json();
  assert.equal(body.type, 'error');
  assert.equal(body.error.type, 'invalid_request_error');
  const nf = await fetch(`${srv.base}/v1/messages/batches`, { method: 'POST', body: '{}' });
  assert.equal(nf.status, 404);
  assert.equal((await nf.json()).error.type, 'not_found_error');
  const oa = await fetch(`${srv.base}/v1/chat/completions`, { method: 'POST', body: '{"model": ' });
  assert.equal((await oa.json()).error.type, 'BadRequestError');
});

test('raw SSE: event lines match the data types; the server stays healthy', async () => {
  const r = await fetch(`${srv.base}/v1/messages`, {
    method: 'POST', headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'tiny', max_tokens: 6, temperature: 0, stream: true, messages: user('Hi'),
                           logit_bias: NO_END }),
  });
  assert.equal(r.status, 200);
  assert.match(r.headers.get('content-type'), /^text\/event-stream/);
  const text = await r.text();
  const events = text.trim().split('\n\n').map((chunk) => {
    const [ev, data] = chunk.split('\n');
    assert.match(ev, /^event: /);
    assert.match(data, /^data: /);
    const j = JSON.parse(data.slice(6));
    assert.equal(j.type, ev.slice(7));
    return j.type;
  });
  assert.equal(events[0], 'message_start');
  assert.deepEqual(events.slice(-2), ['message_delta', 'message_stop']);
  assert.equal((await fetch(`${srv.base}/health`)).status, 200);
});

test('a client that disconnects mid-stream ends its generation', async () => {
  // 1900 tokens take the tiny model ~25 s on a CPU; the abort frees the sequence at once.
  const stream = client.messages.stream({ model: 'tiny', max_tokens: 1900, messages: user('Talk'), logit_bias: NO_END });
  let deltas = 0;
  for await (const e of stream) if (e.type === 'content_block_delta' && ++deltas === 3) break;
  assert.equal(deltas, 3);
  await waitIdle(srv.base, 'the generation kept running after the client left');
});

test('--api-key: x-api-key and Authorization: Bearer on /v1/messages; 401 and 429 in Anthropic\'s shape', async () => {
  const s = await startServer(['--api-key', 'sekret', '--max-model-len', '512', '--max-num-seqs', '1',
                               '--max-queued-requests', '1']);
  try {
    const req = { model: 'tiny', max_tokens: 2, messages: user('Hi') };
    const withKey = new Anthropic({ baseURL: s.base, apiKey: 'sekret', maxRetries: 0 });  // sends x-api-key
    assert.equal((await withKey.messages.create(req)).type, 'message');
    assert.ok((await withKey.messages.countTokens({ model: 'tiny', messages: user('Hi') })).input_tokens > 0);
    const bearer = new Anthropic({ baseURL: s.base, apiKey: null, authToken: 'sekret', maxRetries: 0 });
    assert.equal((await bearer.messages.create(req)).type, 'message');
    const wrong = new Anthropic({ baseURL: s.base, apiKey: 'nope', maxRetries: 0 });
    await assert.rejects(wrong.messages.create(req), (e) => {
      assert.ok(e instanceof Anthropic.AuthenticationError, e.constructor.name);
      assert.equal(e.status, 401);
      assert.equal(e.error.error.type, 'authentication_error');
      return true;
    });
    // Admission control: beyond one running and one waiting, rate_limit_error.
    const statuses = await Promise.all(Array.from({ length: 6 }, () => withKey.messages.create(
      { ...req, max_tokens: 40, logit_bias: NO_END }).then(() => 200, (e) => {
      if (e.status === 429) {
        assert.ok(e instanceof Anthropic.RateLimitError, e.constructor.name);
        assert.equal(e.error.error.type, 'rate_limit_error');
      }
      return e.status;
    })));
    assert.ok(statuses.includes(429) && statuses.includes(200), `${statuses}`);
    // x-api-key is Anthropic's: the OpenAI routes still want Bearer.
    const oa = await fetch(`${s.base}/v1/models`, { headers: { 'x-api-key': 'sekret' } });
    assert.equal(oa.status, 401);
  } finally {
    assert.equal((await s.stop()).code, 0);
  }
});
