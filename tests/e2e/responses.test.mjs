// OpenAI's Responses API (docs/server.md "Responses API") through the official openai SDK (stored responses:
// responses_store.test.mjs):
// client.responses.create (plain and stream: true) and client.responses.stream(...).finalResponse() on the tiny model.
// Its weights are random: tool calls and JSON only come out right through the constraints, and the streamed and
// non-streamed answers must agree token for token (temperature 0 / a seed).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import OpenAI from 'openai';
import { startServer, waitIdle, DATA } from './server.mjs';

let srv, client;
before(async () => {
  srv = await startServer(['--max-model-len', '2048']);
  client = new OpenAI({ baseURL: `${srv.base}/v1`, apiKey: 'unused', maxRetries: 0 });
});
after(async () => { const r = await srv.stop(); assert.equal(r.code, 0, `exit ${JSON.stringify(r)}\n${srv.log()}`); });

const setTimer = {
  type: 'function', name: 'set_timer', description: 'Starts a timer',
  parameters: {
    type: 'object',
    properties: {
      unit: { type: 'string', enum: ['seconds', 'minutes', 'hours'] },
      amount: { type: 'integer' },
      loud: { type: 'boolean' },
    },
    required: ['unit', 'amount', 'loud'],
  },
};

function checkTimerArgs(text) {
  const args = JSON.parse(text);
  assert.deepEqual(Object.keys(args).sort(), ['amount', 'loud', 'unit'], text);
  assert.ok(['seconds', 'minutes', 'hours'].includes(args.unit), text);
  assert.ok(Number.isInteger(args.amount), text);
  assert.equal(typeof args.loud, 'boolean', text);
}

// The message text of a response's output items.
const messageText = (r) => r.output.filter((i) => i.type === 'message')
  .flatMap((i) => i.content).filter((c) => c.type === 'output_text').map((c) => c.text).join('');

// Iterates a `stream: true` response: the events, checked for order (created first, sequence numbers 0, 1, 2, ...,
// items added / done in turn and never interleaved), and the final response from the last event.
async function streamed(req) {
  const events = [];
  for await (const e of await client.responses.create({ ...req, stream: true })) events.push(e);
  assert.equal(events[0].type, 'response.created');
  assert.equal(events[0].response.status, 'in_progress');
  assert.equal(events[1].type, 'response.in_progress');
  events.forEach((e, i) => assert.equal(e.sequence_number, i, `event ${i} ${e.type}`));
  let open = null;
  const text = {}, args = {};
  for (const e of events) {
    if (e.type === 'response.output_item.added') {
      assert.equal(open, null, 'an item opened while another is open');
      open = e.output_index;
    } else if (e.type === 'response.output_item.done') {
      assert.equal(e.output_index, open);
      open = null;
    } else if ('output_index' in e) {
      assert.equal(e.output_index, open, `${e.type} outside its item`);
    }
    if (e.type === 'response.output_text.delta' || e.type === 'response.reasoning_text.delta')
      text[e.output_index] = (text[e.output_index] ?? '') + e.delta;
    if (e.type === 'response.output_text.done' || e.type === 'response.reasoning_text.done')
      assert.equal(e.text, text[e.output_index] ?? '');
    if (e.type === 'response.function_call_arguments.delta') args[e.output_index] = (args[e.output_index] ?? '') + e.delta;
    if (e.type === 'response.function_call_arguments.done') assert.equal(e.arguments, args[e.output_index] ?? '');
  }
  assert.equal(open, null);
  const last = events.at(-1);
  assert.ok(['response.completed', 'response.incomplete'].includes(last.type), last.type);
  return { events, response: last.response };
}

// Output items without their random ids (and without the SDK helpers' parsed / parsed_arguments).
const items = (r) => r.output.map(({ id, parsed_arguments, ...rest }) => ({
  ...rest,
  ...(rest.call_id ? { call_id: 'x' } : {}),
  ...(rest.content ? { content: rest.content.map(({ parsed, ...c }) => c) } : {}),
}));

test('text: create, stream: true and responses.stream() give the same answer; output_text, usage, echo', async () => {
  const req = { model: 'tiny', input: 'Hello there', instructions: 'Answer briefly.', max_output_tokens: 24,
                temperature: 0, reasoning: { effort: 'none' }, metadata: { k: 'v' }, store: true };
  const r = await client.responses.create(req);
  assert.match(r.id, /^resp_/);
  assert.equal(r.object, 'response');
  assert.equal(r.model, 'tiny');
  assert.ok(Number.isInteger(r.created_at));
  assert.ok(['completed', 'incomplete'].includes(r.status));
  assert.ok(r.output_text.length > 0);
  assert.equal(r.output_text, messageText(r));
  assert.deepEqual(r.output.map((i) => i.type), ['message']);
  assert.match(r.output[0].id, /^msg_/);
  assert.equal(r.output[0].role, 'assistant');
  assert.equal(r.usage.total_tokens, r.usage.input_tokens + r.usage.output_tokens);
  assert.ok(r.usage.input_tokens > 5 && r.usage.output_tokens > 0 && r.usage.output_tokens <= 24);
  assert.equal(r.usage.output_tokens_details.reasoning_tokens, 0);
  assert.equal(typeof r.usage.input_tokens_details.cached_tokens, 'number');
  assert.equal(r.temperature, 0);
  assert.equal(r.max_output_tokens, 24);
  assert.equal(r.instructions, 'Answer briefly.');
  assert.deepEqual(r.metadata, { k: 'v' });
  assert.deepEqual(r.tools, []);
  assert.equal(r.tool_choice, 'auto');
  assert.equal(r.parallel_tool_calls, true);
  assert.deepEqual(r.text, { format: { type: 'text' } });
  assert.equal(r.reasoning.effort, 'none');
  assert.equal(r.error, null);

  const s = await streamed(req);
  assert.equal(messageText(s.response), r.output_text);
  assert.deepEqual(items(s.response), items(r));
  assert.equal(s.response.status, r.status);
  assert.deepEqual(s.response.usage.output_tokens, r.usage.output_tokens);
  const deltas = s.events.filter((e) => e.type === 'response.output_text.delta');
  assert.ok(deltas.length > 1, 'streamed in pieces');
  assert.equal(deltas.map((e) => e.delta).join(''), r.output_text);

  const stream = client.responses.stream(req);
  let fromEvents = '';
  stream.on('response.output_text.delta', (e) => { fromEvents += e.delta; });
  const f = await stream.finalResponse();
  assert.equal(f.output_text, r.output_text);
  assert.equal(fromEvents, r.output_text);
  assert.deepEqual(items(f), items(r));
});

test('reasoning: a reasoning item (thinking on) with reasoning_tokens; effort none has none', async () => {
  const req = { model: 'tiny', input: 'Think briefly', max_output_tokens: 12, temperature: 1, seed: 2,
                thinking_token_budget: 6, logit_bias: { 2009: -100 }, ignore_eos: true };
  for (const r of [await client.responses.create(req), (await streamed(req)).response]) {
    assert.deepEqual(r.output.map((i) => i.type), ['reasoning', 'message'], JSON.stringify(r.output));
    const rs = r.output[0];
    assert.match(rs.id, /^rs_/);
    assert.deepEqual(rs.summary, []);
    assert.equal(rs.content.length, 1);
    assert.equal(rs.content[0].type, 'reasoning_text');
    assert.ok(rs.content[0].text.length > 0);
    assert.ok(messageText(r).length > 0);
    assert.equal(r.usage.output_tokens, 12);
    assert.equal(r.usage.output_tokens_details.reasoning_tokens, 6);
    assert.equal(r.status, 'incomplete');
    assert.deepEqual(r.incomplete_details, { reason: 'max_output_tokens' });
  }
  const a = await client.responses.create(req), b = (await streamed(req)).response;
  assert.deepEqual(items(a), items(b));
  const off = await client.responses.create({ ...req, reasoning: { effort: 'none' } });
  assert.deepEqual(off.output.map((i) => i.type), ['message']);
  assert.equal(off.usage.output_tokens_details.reasoning_tokens, 0);
  const low = await client.responses.create({ ...req, reasoning: { effort: 'low', summary: 'auto' } });
  assert.equal(low.output[0].type, 'reasoning');
});

test('function call: tool_choice {type: function, name} gives a function_call item of the schema; streamed too', async () => {
  const req = { model: 'tiny', input: [{ role: 'user', content: 'Set a timer' }], tools: [setTimer],
                tool_choice: { type: 'function', name: 'set_timer' }, max_output_tokens: 200, temperature: 0,
                reasoning: { effort: 'none' } };
  const r = await client.responses.create(req);
  assert.equal(r.status, 'completed', JSON.stringify(r.output));
  const calls = r.output.filter((i) => i.type === 'function_call');
  assert.equal(calls.length, 1, JSON.stringify(r.output));
  const call = calls[0];
  assert.match(call.id, /^fc_/);
  assert.match(call.call_id, /^call_/);
  assert.equal(call.name, 'set_timer');
  assert.equal(call.status, 'completed');
  checkTimerArgs(call.arguments);
  assert.deepEqual(r.tool_choice, { type: 'function', name: 'set_timer' });
  assert.equal(r.tools[0].name, 'set_timer');
  assert.equal(r.tools[0].type, 'function');

  const s = await streamed(req);
  assert.deepEqual(items(s.response), items(r));
  assert.ok(s.events.some((e) => e.type === 'response.function_call_arguments.delta'));
  const done = s.events.find((e) => e.type === 'response.function_call_arguments.done');
  assert.equal(done.name, 'set_timer');
  assert.equal(done.arguments, call.arguments);

  const f = await client.responses.stream(req).finalResponse();
  assert.equal(f.output.find((i) => i.type === 'function_call').arguments, call.arguments);

  // tool_choice required and strict tools take the same path; "none" makes no call
  const req2 = await client.responses.create({ ...req, tool_choice: 'required' });
  checkTimerArgs(req2.output.find((i) => i.type === 'function_call').arguments);
  const none = await client.responses.create({ ...req, tool_choice: 'none', max_output_tokens: 10 });
  assert.ok(!none.output.some((i) => i.type === 'function_call'));
});

test('multi-turn: the previous output items and a function_call_output go back in as input', async () => {
  const first = await client.responses.create({
    model: 'tiny', input: 'Set a timer', tools: [setTimer], tool_choice: { type: 'function', name: 'set_timer' },
    max_output_tokens: 200, temperature: 0, reasoning: { effort: 'none' } });
  const call = first.output.find((i) => i.type === 'function_call');
  assert.ok(call);
  const history = [{ role: 'user', content: 'Set a timer' }, ...first.output];
  const base = { model: 'tiny', tools: [setTimer], max_output_tokens: 16, temperature: 0, reasoning: { effort: 'none' } };
  const withOutput = await client.responses.create({
    ...base, input: [...history, { type: 'function_call_output', call_id: call.call_id, output: 'timer set: 42' }] });
  assert.ok(['completed', 'incomplete'].includes(withOutput.status));
  const without = await client.responses.create({ ...base, input: history });
  // The tool's answer is in the prompt: more input tokens than the same history without it.
  assert.ok(withOutput.usage.input_tokens > without.usage.input_tokens + 3,
            `${withOutput.usage.input_tokens} vs ${without.usage.input_tokens}`);
  // Same prompt through the chat route: the same number of prompt tokens.
  const chat = await client.chat.completions.create({
    model: 'tiny', max_tokens: 1, chat_template_kwargs: { enable_thinking: false },
    tools: [{ type: 'function', function: { name: setTimer.name, description: setTimer.description, parameters: setTimer.parameters } }],
    messages: [{ role: 'user', content: 'Set a timer' },
      { role: 'assistant', content: null, tool_calls: [{ id: call.call_id, type: 'function', function: { name: call.name, arguments: call.arguments } }] },
      { role: 'tool', tool_call_id: call.call_id, content: 'timer set: 42' }] });
  assert.equal(withOutput.usage.input_tokens, chat.usage.prompt_tokens);
  // Reasoning items going back in are the assistant's reasoning_content.
  const r = await client.responses.create({ ...base, input: [
    { role: 'user', content: 'hi' },
    { type: 'reasoning', id: 'rs_1', summary: [], content: [{ type: 'reasoning_text', text: 'the user greets me' }] },
    { type: 'message', role: 'assistant', content: [{ type: 'output_text', text: 'hello', annotations: [] }] },
    { role: 'user', content: 'again' }] });
  assert.ok(r.usage.input_tokens > 10);
});

test('text.format json_schema: the answer is JSON of the schema; json_object an object', async () => {
  const schema = { type: 'object', properties: { amount: { type: 'integer' }, ok: { type: 'boolean' },
                   color: { enum: ['red', 'green'] } }, required: ['amount', 'ok', 'color'], additionalProperties: false };
  const req = { model: 'tiny', input: 'Describe', max_output_tokens: 200, temperature: 0.8, seed: 3,
                reasoning: { effort: 'none' }, text: { format: { type: 'json_schema', name: 'thing', schema, strict: true } } };
  for (const r of [await client.responses.create(req), (await streamed(req)).response]) {
    assert.equal(r.status, 'completed', r.output_text ?? messageText(r));
    const v = JSON.parse(messageText(r));
    assert.deepEqual(Object.keys(v).sort(), ['amount', 'color', 'ok']);
    assert.ok(Number.isInteger(v.amount));
    assert.equal(typeof v.ok, 'boolean');
    assert.ok(['red', 'green'].includes(v.color));
    assert.equal(r.text.format.type, 'json_schema');
  }
  const o = await client.responses.create({ ...req, text: { format: { type: 'json_object' } } });
  if (o.status === 'completed') {
    const v = JSON.parse(o.output_text);
    assert.ok(v !== null && typeof v === 'object' && !Array.isArray(v), `json_object gave ${o.output_text}`);
  } else {
    assert.deepEqual(o.incomplete_details, { reason: 'max_output_tokens' });
    assert.match(o.output_text, /^\{/, 'a truncated object still starts as one');
  }
});

test('max_output_tokens: status incomplete, reason max_output_tokens; response.incomplete when streamed', async () => {
  const req = { model: 'tiny', input: 'Write a long story', max_output_tokens: 3, temperature: 1, seed: 1,
                ignore_eos: true, reasoning: { effort: 'none' } };
  const r = await client.responses.create(req);
  assert.equal(r.status, 'incomplete');
  assert.deepEqual(r.incomplete_details, { reason: 'max_output_tokens' });
  assert.equal(r.usage.output_tokens, 3);
  assert.equal(r.output[0].status, 'incomplete');
  const s = await streamed(req);
  assert.equal(s.events.at(-1).type, 'response.incomplete');
  assert.equal(s.response.status, 'incomplete');
  assert.equal(messageText(s.response), r.output_text);
});

test('errors: 400 BadRequestError naming the field (unknown previous response, built-in tools, types); the server stays up', async () => {
  const cases = [
    [{ previous_response_id: 'resp_123' }, /Previous response with id 'resp_123' not found/, 'previous_response_id'],
    [{ tools: [{ type: 'web_search' }] }, /tools\[0\]: tool type 'web_search' is not supported/, 'tools'],
    [{ tools: [{ type: 'file_search', vector_store_ids: ['v'] }] }, /file_search/, 'tools'],
    [{ max_output_tokens: 0 }, /'max_output_tokens' must be/, 'max_output_tokens'],
    [{ reasoning: { effort: 'extreme' } }, /reasoning\.effort/, 'reasoning.effort'],
    [{ tool_choice: { type: 'function', name: 'nope' }, tools: [setTimer] }, /'nope', which is not in 'tools'/, 'tool_choice'],
    [{ text: { format: { type: 'json_schema', name: 'p', schema: { type: 'string', pattern: 'a(?=b)' } } } }, /text\.format.*lookahead/,
     'text.format'],
    [{ input: [{ type: 'item_reference', id: 'msg_1' }] }, /input\[0\]: item_reference/, 'input'],
    [{ input: [{ role: 'user', content: [{ type: 'input_image', image_url: 'data:image/png;base64,AAAA' }] }] },
     /input\[0\]\.content\[0\]/, 'input'],
  ];
  for (const [extra, re, param] of cases) {
    await assert.rejects(client.responses.create({ model: 'tiny', input: 'hi', ...extra }), (e) => {
      assert.ok(e instanceof OpenAI.BadRequestError, `${re}: ${e}`);
      assert.equal(e.status, 400);
      assert.match(e.message, re);
      assert.equal(e.param, param, e.message);
      return true;
    });
  }
  await assert.rejects(client.responses.create({ model: 'other', input: 'hi' }), (e) => e instanceof OpenAI.NotFoundError);
  // streamed requests fail the same way, before any event
  await assert.rejects(client.responses.create({ model: 'tiny', input: 'hi', stream: true, previous_response_id: 'r' }),
                       (e) => e instanceof OpenAI.BadRequestError);
  assert.equal((await fetch(`${srv.base}/health`)).status, 200);
});

test('raw SSE: event lines name each event; no [DONE]', async () => {
  const res = await fetch(`${srv.base}/v1/responses`, {
    method: 'POST', headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ model: 'tiny', input: 'hi', max_output_tokens: 4, stream: true, reasoning: { effort: 'none' } }),
  });
  assert.equal(res.status, 200);
  assert.match(res.headers.get('content-type'), /text\/event-stream/);
  const body = await res.text();
  const blocks = body.split('\n\n').filter((b) => b.trim() && !b.startsWith(':'));
  for (const b of blocks) {
    const m = b.match(/^event: (\S+)\ndata: (.*)$/s);
    assert.ok(m, b);
    assert.equal(JSON.parse(m[2]).type, m[1]);
  }
  assert.ok(!body.includes('[DONE]'));
});

test('images: input_image (a data: URL) gives the same prompt and answer as the chat route\'s image_url', async () => {
  const url = `data:image/png;base64,${fs.readFileSync(path.join(DATA, 'tiny-moe/image.png')).toString('base64')}`;
  const r = await client.responses.create({
    model: 'tiny', max_output_tokens: 6, temperature: 0, reasoning: { effort: 'none' },
    input: [{ role: 'user', content: [{ type: 'input_text', text: 'What is this?' },
                                      { type: 'input_image', image_url: url, detail: 'auto' }] }] });
  const c = await client.chat.completions.create({
    model: 'tiny', max_tokens: 6, temperature: 0, chat_template_kwargs: { enable_thinking: false },
    messages: [{ role: 'user', content: [{ type: 'text', text: 'What is this?' }, { type: 'image_url', image_url: { url } }] }] });
  assert.equal(r.usage.input_tokens, c.usage.prompt_tokens);
  assert.ok(r.usage.input_tokens > 40, `${r.usage.input_tokens}: the image's placeholders are in the prompt`);
  assert.equal(r.output_text, c.choices[0].message.content);
  // A corrupt image is a 400 naming the Responses part.
  await assert.rejects(client.responses.create({ model: 'tiny', input: [{ role: 'user', content: [
    { type: 'input_text', text: 'x' }, { type: 'input_image', image_url: 'data:image/png;base64,iVBORw0KGgo=' }] }] }),
  (e) => e instanceof OpenAI.BadRequestError && /input\[0\]\.content\[1\]: image: corrupt/.test(e.message) && e.param === 'input');
});

test('prefix caching: a shared instructions prompt is resumed from its checkpoint (cached_tokens)', async () => {
  const instructions = 'Rules of the house: ' + 'be kind, be exact, be brief. '.repeat(12);
  const ask = (input) => client.responses.create({ model: 'tiny', instructions, input, max_output_tokens: 4,
                                                   temperature: 0, reasoning: { effort: 'none' } });
  const r1 = await ask('Tell me about cats.');
  const r2 = await ask('Tell me about owls, please.');
  assert.equal(r1.usage.input_tokens_details.cached_tokens, 0);
  assert.ok(r2.usage.input_tokens_details.cached_tokens >= 64, `cached ${r2.usage.input_tokens_details.cached_tokens}`);
});

test('--api-key: /v1/responses needs it (AuthenticationError)', async () => {
  const s = await startServer(['--max-model-len', '256', '--api-key', 'sekret']);
  try {
    const bad = new OpenAI({ baseURL: `${s.base}/v1`, apiKey: 'wrong', maxRetries: 0 });
    await assert.rejects(bad.responses.create({ model: 'tiny', input: 'hi', max_output_tokens: 2 }),
                         (e) => e instanceof OpenAI.AuthenticationError);
    const good = new OpenAI({ baseURL: `${s.base}/v1`, apiKey: 'sekret', maxRetries: 0 });
    const r = await good.responses.create({ model: 'tiny', input: 'hi', max_output_tokens: 2 });
    assert.equal(r.usage.output_tokens, 2);
  } finally {
    assert.equal((await s.stop()).code, 0);
  }
});

test('a client that goes away mid-stream aborts its generation', async () => {
  const stream = await client.responses.create({ model: 'tiny', input: 'Write forever', max_output_tokens: 1900,
                                                 ignore_eos: true, temperature: 1, stream: true });
  let deltas = 0;
  for await (const e of stream) if (e.type.endsWith('.delta') && ++deltas === 3) break;  // the SDK closes the connection
  await waitIdle(srv.base, 'the generation kept running after the client left');
});
