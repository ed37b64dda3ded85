// Constrained tool calls (docs/server.md "Constrained tool calls") through the official openai SDK, on the tiny model
// (random weights: without the grammar it does not write a valid call at all). tool_choice named / required constrain
// the call the prompt opens; auto constrains the calls of "strict": true tools from each <tool_call> (1998) on.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import OpenAI from 'openai';
import { startServer, expectBadRequests } from './server.mjs';

let srv, client;
before(async () => {
  srv = await startServer(['--max-model-len', '2048']);
  client = new OpenAI({ baseURL: `${srv.base}/v1`, apiKey: 'unused', maxRetries: 0 });
});
after(async () => { assert.equal((await srv.stop()).code, 0); });

const setTimer = {
  type: 'function',
  function: {
    name: 'set_timer', description: 'Starts a timer',
    parameters: {
      type: 'object',
      properties: {
        unit: { type: 'string', enum: ['seconds', 'minutes', 'hours'] },
        amount: { type: 'integer' },
        loud: { type: 'boolean' },
        label: { type: 'string', maxLength: 8 },
      },
      required: ['unit', 'amount', 'loud'],
    },
  },
};
const lookup = {
  type: 'function',
  function: {
    name: 'lookup',
    parameters: { type: 'object', properties: { id: { type: 'integer' }, exact: { type: 'boolean' } }, required: ['id'] },
  },
};
const messages = [{ role: 'user', content: 'Set a timer' }];

// The arguments of a finished call match its tool's schema.
function checkCall(call) {
  assert.equal(call.type, 'function');
  assert.match(call.id, /^call_/);
  const args = JSON.parse(call.function.arguments);
  const where = `${call.function.name} ${call.function.arguments}`;
  if (call.function.name === 'set_timer') {
    assert.deepEqual(Object.keys(args).filter((k) => !['unit', 'amount', 'loud', 'label'].includes(k)), [], where);
    assert.ok(['seconds', 'minutes', 'hours'].includes(args.unit), where);
    assert.ok(Number.isInteger(args.amount), where);
    assert.equal(typeof args.loud, 'boolean', where);
    if ('label' in args) assert.ok(typeof args.label === 'string' && [...args.label].length <= 8, where);
  } else {
    assert.equal(call.function.name, 'lookup', where);
    assert.ok(Number.isInteger(args.id), where);
    if ('exact' in args) assert.equal(typeof args.exact, 'boolean', where);
  }
}

// The streamed response folded into {content, calls: [{id, name, arguments}], finish}.
async function streamed(req) {
  const calls = [];
  let content = '', finish = null;
  for await (const chunk of await client.chat.completions.create({ ...req, stream: true })) {
    for (const c of chunk.choices) {
      content += c.delta.content ?? '';
      for (const d of c.delta.tool_calls ?? []) {
        if (d.id) calls[d.index] = { id: d.id, name: d.function.name, arguments: '' };
        calls[d.index].arguments += d.function.arguments ?? '';
      }
      if (c.finish_reason) finish = c.finish_reason;
    }
  }
  return { content, calls, finish };
}

test('tool_choice named: one call of that tool whose arguments match the schema; streamed == not streamed', async () => {
  const req = { model: 'tiny', messages, tools: [setTimer, lookup], max_tokens: 400, temperature: 0,
                tool_choice: { type: 'function', function: { name: 'set_timer' } } };
  const r = await client.chat.completions.create(req);
  const m = r.choices[0].message;
  assert.equal(r.choices[0].finish_reason, 'tool_calls', JSON.stringify(m));
  assert.equal(m.tool_calls.length, 1);
  assert.equal(m.tool_calls[0].function.name, 'set_timer');
  checkCall(m.tool_calls[0]);
  assert.equal(m.content, null);
  const s = await streamed(req);
  assert.equal(s.finish, 'tool_calls');
  assert.deepEqual(s.calls.map((c) => [c.name, c.arguments]), m.tool_calls.map((c) => [c.function.name, c.function.arguments]));
});

test('tool_choice required: every response is valid calls of the given tools (several seeds)', async () => {
  const names = new Set();
  for (let seed = 1; seed <= 6; ++seed) {
    const r = await client.chat.completions.create({ model: 'tiny', messages, tools: [setTimer, lookup],
                                                     tool_choice: 'required', parallel_tool_calls: false,
                                                     max_tokens: 400, temperature: 1, seed });
    const m = r.choices[0].message;
    assert.equal(r.choices[0].finish_reason, 'tool_calls', `seed ${seed}: ${JSON.stringify(m)}`);
    assert.equal(m.tool_calls.length, 1, 'parallel_tool_calls false: one call, then the end');
    checkCall(m.tool_calls[0]);
    names.add(m.tool_calls[0].function.name);
  }
  assert.ok(names.size >= 1);
  // Greedy: streamed == not streamed.
  const req = { model: 'tiny', messages, tools: [setTimer, lookup], tool_choice: 'required', max_tokens: 600,
                temperature: 0 };
  const r = await client.chat.completions.create(req);
  const s = await streamed(req);
  assert.equal(s.finish, r.choices[0].finish_reason);
  assert.deepEqual(s.calls.map((c) => [c.name, c.arguments]),
                   (r.choices[0].message.tool_calls ?? []).map((c) => [c.function.name, c.function.arguments]));
  if (r.choices[0].finish_reason === 'tool_calls') r.choices[0].message.tool_calls.forEach(checkCall);
});

test('tool_choice required with parallel calls: after a call only another call or the end', async () => {
  let finished = 0;
  for (let seed = 1; seed <= 4; ++seed) {
    const r = await client.chat.completions.create({ model: 'tiny', messages, tools: [setTimer, lookup],
                                                     tool_choice: 'required', max_tokens: 1000, temperature: 1, seed,
                                                     return_token_ids: true });
    const c = r.choices[0];
    if (c.finish_reason !== 'tool_calls') continue;
    ++finished;
    c.message.tool_calls.forEach(checkCall);
    assert.equal(c.message.content, null, 'no text between or after the calls');
    // 1999 (</tool_call>) is followed by 1998 (<tool_call>) or nothing (the end id is not in token_ids).
    const t = c.token_ids;
    for (let i = 0; i + 1 < t.length; ++i) if (t[i] === 1999) assert.equal(t[i + 1], 1998, `token ${i + 1}`);
    assert.equal(t.filter((x) => x === 1999).length, c.message.tool_calls.length);
  }
  assert.ok(finished >= 2, `${finished} of 4 finished`);
});

test('tool_choice auto with a strict tool: each <tool_call> the model writes is constrained, other tools stay free',
     async () => {
  const strictTimer = { ...setTimer, function: { ...setTimer.function, strict: true } };
  for (const thinking of [false, true]) {
    // <tool_call> (1998) whenever the model is free: a call, then another, until max_tokens.
    const req = { model: 'tiny', messages, tools: [strictTimer], max_tokens: 300, temperature: 1, seed: 5,
                  logit_bias: { 1998: 100 }, chat_template_kwargs: { enable_thinking: thinking } };
    if (thinking) req.thinking_token_budget = 0;  // </think> at once: the trigger counts outside reasoning only
    const r = await client.chat.completions.create(req);
    const calls = r.choices[0].message.tool_calls ?? [];
    assert.ok(calls.length >= 2, JSON.stringify(r.choices[0].message));
    calls.slice(0, -1).forEach(checkCall);  // the last one may be cut by max_tokens
  }
  // A non-strict tool next to it can still be called, with free parameters (raw values: the random model rambles
  // in them, so only the strict tool's finished calls are checked).
  for (let seed = 1; seed <= 3; ++seed) {
    const r = await client.chat.completions.create({ model: 'tiny', messages, tools: [strictTimer, lookup],
                                                     max_tokens: 200, temperature: 1, seed, logit_bias: { 1998: 100 },
                                                     chat_template_kwargs: { enable_thinking: false } });
    const calls = r.choices[0].message.tool_calls ?? [];
    assert.ok(calls.length >= 1);
    for (const c of calls.slice(0, -1)) if (c.function.name === 'set_timer') checkCall(c);
  }
});

test('a string parameter with a pattern: the named call\'s value matches it as a whole', async () => {
  const ticket = { type: 'function', function: { name: 'open_ticket', parameters: { type: 'object',
    properties: { code: { type: 'string', pattern: '^[A-Z]{2}-\\d{2,4}$' },
                  ref: { type: 'object', properties: { sha: { type: 'string', pattern: '[0-9a-f]{7}' } },
                         required: ['sha'], additionalProperties: false } },
    required: ['code', 'ref'] } } };
  for (const seed of [1, 2, 3]) {
    const r = await client.chat.completions.create({
      model: 'tiny', messages: [{ role: 'user', content: 'Open a ticket' }], tools: [ticket], max_tokens: 120,
      temperature: 1, seed, tool_choice: { type: 'function', function: { name: 'open_ticket' } } });
    const call = r.choices[0].message.tool_calls?.[0];
    assert.ok(call, `no call: ${JSON.stringify(r.choices[0])}`);
    const args = JSON.parse(call.function.arguments);
    assert.match(args.code, /^[A-Z]{2}-\d{2,4}$/, call.function.arguments);
    assert.match(args.ref.sha, /^[0-9a-f]{7}$/, call.function.arguments);
  }
});

test('tool schemas that cannot be constrained are 400s naming tools and the pointer', async () => {
  const bad = { type: 'function', function: { name: 'f', strict: true, parameters: { type: 'object',
    properties: { code: { type: 'string', patternProperties: {} } } } } };
  await expectBadRequests(srv.base, (tool_choice) => client.chat.completions.create({
    model: 'tiny', messages, tools: [bad], tool_choice, max_tokens: 4 }), [
    ['required', /tools\[0\]\.function\.parameters: unsupported keyword "patternProperties" at \/properties\/code/],
    [{ type: 'function', function: { name: 'f' } }, /unsupported keyword "patternProperties"/],
    ['auto', /tools\[0\]\.function\.parameters: unsupported keyword "patternProperties"/],
  ]);
  // Not strict, auto: nothing is compiled.
  const loose = { type: 'function', function: { ...bad.function, strict: false } };
  const r = await client.chat.completions.create({ model: 'tiny', messages, tools: [loose], max_tokens: 2 });
  assert.ok(r.choices[0]);
  // A constraint next to a strict tool's grammar is refused, as next to required / named.
  await expectBadRequests(srv.base, (tool_choice) => client.chat.completions.create({
    model: 'tiny', messages, tools: [{ ...setTimer, function: { ...setTimer.function, strict: true } }], tool_choice,
    response_format: { type: 'json_object' }, max_tokens: 4 }), [
    ['auto', /cannot be combined with tools declared "strict": true/],
    ['required', /cannot be combined with tool_choice required/],
  ]);
  await expectBadRequests(srv.base, (ignore_eos) => client.chat.completions.create({
    model: 'tiny', messages, tools: [setTimer], tool_choice: 'required', ignore_eos, max_tokens: 4 }), [
    [true, /'ignore_eos' cannot be combined with tool_choice required/],
  ]);
});
