// Stored responses (docs/server.md "Stored responses and background runs") through the official openai SDK:
// retrieve / delete, inputTokens.count, previous_response_id (a conversation continued from the store gives the same prompt as the
// whole conversation sent again), input_items with pagination, background responses (polled, streamed, resumed with
// starting_after, cancelled, not cancelled by a client that leaves) and --responses-store 0.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import OpenAI from 'openai';
import { startServer, metrics, waitIdle } from './server.mjs';

let srv, client;
before(async () => {
  srv = await startServer(['--max-model-len', '2048']);
  client = new OpenAI({ baseURL: `${srv.base}/v1`, apiKey: 'unused', maxRetries: 0 });
});
after(async () => { const r = await srv.stop(); assert.equal(r.code, 0, `exit ${JSON.stringify(r)}\n${srv.log()}`); });

const base = { model: 'tiny', temperature: 0, reasoning: { effort: 'none' } };
const setTimer = {
  type: 'function', name: 'set_timer', description: 'Starts a timer',
  parameters: { type: 'object', properties: { amount: { type: 'integer' } }, required: ['amount'] },
};
const noIds = (items) => items.map(({ id, ...rest }) => rest);

const idle = () => waitIdle(srv.base, 'requests still running', 10000);

async function waitFor(id, statuses) {
  const deadline = Date.now() + 30000;
  for (;;) {
    const r = await client.responses.retrieve(id);
    if (statuses.includes(r.status)) return r;
    if (Date.now() > deadline) assert.fail(`response ${id} still ${r.status}`);
    await new Promise((res) => setTimeout(res, 50));
  }
}

test('retrieve gives the stored response; store: false and deleted ones are 404s', async () => {
  const r = await client.responses.create({ ...base, input: 'Hello there', max_output_tokens: 12, metadata: { a: 'b' } });
  assert.equal(r.store, true);
  const g = await client.responses.retrieve(r.id);
  assert.deepEqual(g, r);
  // a streamed one is stored too, as its last event gave it
  const events = [];
  for await (const e of await client.responses.create({ ...base, input: 'Hi', max_output_tokens: 5, stream: true }))
    events.push(e);
  const last = events.at(-1).response;
  const { output_text, ...stored } = await client.responses.retrieve(last.id);  // the SDK adds output_text
  assert.deepEqual(stored, last);

  // store: null is the default (Python clients send None as null)
  const dflt = await client.responses.create({ ...base, input: 'Hi', max_output_tokens: 2, store: null });
  assert.equal(dflt.store, true);
  assert.equal((await client.responses.retrieve(dflt.id)).id, dflt.id);
  const off = await client.responses.create({ ...base, input: 'Hello there', max_output_tokens: 4, store: false });
  assert.equal(off.store, false);
  await assert.rejects(client.responses.retrieve(off.id), (e) => e instanceof OpenAI.NotFoundError &&
                       /Response with id 'resp_\w+' not found/.test(e.message));
  const m = await metrics(srv.base);
  assert.ok(m.get('responses_stored') >= 2, `stored ${m.get('responses_stored')}`);
  assert.ok(m.get('responses_store_bytes') > 1000, `bytes ${m.get('responses_store_bytes')}`);
  await client.responses.delete(r.id);
  assert.equal((await metrics(srv.base)).get('responses_stored'), m.get('responses_stored') - 1);
  await assert.rejects(client.responses.retrieve(r.id), (e) => e instanceof OpenAI.NotFoundError);
  await assert.rejects(client.responses.delete(r.id), (e) => e instanceof OpenAI.NotFoundError);
  await assert.rejects(client.responses.inputItems.list(r.id), (e) => e instanceof OpenAI.NotFoundError);
});

test('previous_response_id: the same prompt and answer as the whole conversation sent again; input_items', async () => {
  const count = await client.responses.inputTokens.count({ model: 'tiny', input: 'My name is Ada.', reasoning: { effort: 'none' } });
  const r1 = await client.responses.create({ ...base, input: 'My name is Ada.', max_output_tokens: 10 });
  assert.deepEqual(count, { object: 'response.input_tokens', input_tokens: r1.usage.input_tokens });
  const r2 = await client.responses.create({ ...base, previous_response_id: r1.id, input: 'What is my name?',
                                             max_output_tokens: 10 });
  assert.equal(r2.previous_response_id, r1.id);
  const count2 = await client.responses.inputTokens.count({ model: 'tiny', previous_response_id: r1.id,
                                                            input: 'What is my name?', reasoning: { effort: 'none' } });
  assert.equal(count2.input_tokens, r2.usage.input_tokens);
  const full = await client.responses.create({ ...base, store: false, max_output_tokens: 10,
    input: [{ role: 'user', content: 'My name is Ada.' }, ...r1.output, { role: 'user', content: 'What is my name?' }] });
  assert.equal(r2.usage.input_tokens, full.usage.input_tokens);
  assert.equal(r2.output_text, full.output_text);
  assert.ok(r2.usage.input_tokens > r1.usage.input_tokens + r1.usage.output_tokens - 5);
  // The previous turn's prompt and answer are resumed from the prefix cache.
  assert.ok(r2.usage.input_tokens_details.cached_tokens >= 16, JSON.stringify(r2.usage));

  // input_items: newest first by default; the chain's earlier items (r1's input and output) included.
  const page = await client.responses.inputItems.list(r2.id);
  const items = page.data;
  assert.equal(items.length, 2 + r1.output.length);
  assert.equal(items[0].type, 'message');
  assert.equal(items[0].role, 'user');
  assert.deepEqual(items[0].content, [{ type: 'input_text', text: 'What is my name?' }]);
  assert.match(items[0].id, /^msg_/);
  assert.deepEqual(items.at(-1).content, [{ type: 'input_text', text: 'My name is Ada.' }]);
  assert.deepEqual(noIds(items.slice(1, -1).reverse()), noIds(r1.output));
  assert.equal(page.has_more, false);
  const asc = (await client.responses.inputItems.list(r2.id, { order: 'asc' })).data;
  assert.deepEqual(asc, [...items].reverse());
  // One item a page: the SDK follows `after` to the end.
  const paged = [];
  for await (const it of client.responses.inputItems.list(r2.id, { limit: 1, order: 'asc' })) paged.push(it);
  assert.deepEqual(paged, asc);
  // A third turn continues the chain.
  const r3 = await client.responses.create({ ...base, previous_response_id: r2.id, input: 'Thanks', max_output_tokens: 4 });
  const all = (await client.responses.inputItems.list(r3.id, { order: 'asc', limit: 100 })).data;
  assert.deepEqual(all.map((i) => i.id).slice(0, asc.length), asc.map((i) => i.id));
  assert.equal(all.length, asc.length + r2.output.length + 1);
  // Instructions are not carried over: a turn's own only.
  const withRules = await client.responses.create({ ...base, previous_response_id: r2.id, input: 'Thanks',
                                                    instructions: 'Be brief.', max_output_tokens: 4 });
  assert.equal(withRules.instructions, 'Be brief.');
  assert.ok(withRules.usage.input_tokens > r3.usage.input_tokens);
  const after = await client.responses.create({ ...base, previous_response_id: withRules.id, input: 'Ok',
                                                max_output_tokens: 2 });
  assert.equal(after.instructions, null);
  const afterItems = (await client.responses.inputItems.list(after.id, { limit: 100 })).data;
  assert.ok(!JSON.stringify(afterItems).includes('Be brief.'));
  // item_reference: a stored item by its id, as if sent again.
  const byRef = await client.responses.inputTokens.count({ model: 'tiny', reasoning: { effort: 'none' },
    input: [{ type: 'item_reference', id: items.at(-1).id }, ...r1.output.map((o) => ({ type: 'item_reference', id: o.id })),
            { role: 'user', content: 'What is my name?' }] });
  assert.equal(byRef.input_tokens, r2.usage.input_tokens);
  await assert.rejects(client.responses.create({ ...base, input: [{ type: 'item_reference', id: 'msg_nope' }] }), (e) =>
    e instanceof OpenAI.BadRequestError && /input\[0\]: item_reference 'msg_nope' names no stored item/.test(e.message));
  // Deleting the first response leaves the later ones' conversations whole.
  await client.responses.delete(r1.id);
  const r4 = await client.responses.create({ ...base, previous_response_id: r3.id, input: 'Bye', max_output_tokens: 2 });
  assert.ok(r4.usage.input_tokens > r3.usage.input_tokens);
});

test('previous_response_id in a tool loop: a function_call_output continues the stored call', async () => {
  const tools = [setTimer];
  const first = await client.responses.create({ ...base, input: 'Set a timer', tools,
    tool_choice: { type: 'function', name: 'set_timer' }, max_output_tokens: 100 });
  const call = first.output.find((i) => i.type === 'function_call');
  assert.ok(call, JSON.stringify(first.output));
  const output = { type: 'function_call_output', call_id: call.call_id, output: 'timer set' };
  const chained = await client.responses.create({ ...base, tools, previous_response_id: first.id, input: [output],
                                                  max_output_tokens: 8 });
  const whole = await client.responses.create({ ...base, tools, store: false, max_output_tokens: 8,
    input: [{ role: 'user', content: 'Set a timer' }, ...first.output, output] });
  assert.equal(chained.usage.input_tokens, whole.usage.input_tokens);
  assert.equal(chained.output_text, whole.output_text);
});

test('errors: unknown or running previous responses, bad pagination, cancel of a foreground response', async () => {
  await assert.rejects(client.responses.create({ ...base, previous_response_id: 'resp_nope', input: 'x' }), (e) =>
    e instanceof OpenAI.BadRequestError && e.param === 'previous_response_id' &&
    /Previous response with id 'resp_nope' not found/.test(e.message));
  const bg = await client.responses.create({ ...base, input: 'Write forever', background: true,
                                             max_output_tokens: 1900, ignore_eos: true, temperature: 1 });
  await assert.rejects(client.responses.create({ ...base, previous_response_id: bg.id, input: 'x' }), (e) =>
    e instanceof OpenAI.BadRequestError && /still in progress/.test(e.message));
  await client.responses.cancel(bg.id);
  const r = await client.responses.create({ ...base, input: 'hi', max_output_tokens: 2 });
  await assert.rejects(client.responses.cancel(r.id), (e) =>
    e instanceof OpenAI.BadRequestError && /only background responses can be cancelled/.test(e.message));
  await assert.rejects(client.responses.inputItems.list(r.id, { limit: 0 }), (e) =>
    e instanceof OpenAI.BadRequestError && e.param === 'limit');
  await assert.rejects(client.responses.inputItems.list(r.id, { after: 'msg_nope' }), (e) =>
    e instanceof OpenAI.BadRequestError && /no input item 'msg_nope'/.test(e.message));
  await assert.rejects(client.responses.create({ ...base, input: 'x', background: true, store: false }), (e) =>
    e instanceof OpenAI.BadRequestError && e.param === 'background');
  await assert.rejects(client.responses.retrieve(r.id, { stream: true }), (e) =>
    e instanceof OpenAI.BadRequestError && /only background responses can be streamed again/.test(e.message));
  assert.equal((await fetch(`${srv.base}/health`)).status, 200);
});

test('background: queued at once, polled to the same answer as a foreground run', async () => {
  const req = { ...base, input: 'Tell me a story', max_output_tokens: 40, ignore_eos: true };
  const fg = await client.responses.create({ ...req, store: false });
  const bg = await client.responses.create({ ...req, background: true });
  assert.equal(bg.background, true);
  assert.ok(['queued', 'in_progress'].includes(bg.status), bg.status);
  const done = await waitFor(bg.id, ['completed', 'incomplete']);
  assert.equal(done.output_text, fg.output_text);
  assert.equal(done.usage.output_tokens, 40);
  assert.equal(done.status, fg.status);
  assert.equal(done.background, true);
});

test('background stream: a client that leaves does not stop it; GET stream resumes after starting_after', async () => {
  const req = { ...base, input: 'Tell me a story', max_output_tokens: 60, ignore_eos: true };
  const fg = await client.responses.create({ ...req, store: false });
  const first = [];
  for await (const e of await client.responses.create({ ...req, background: true, stream: true })) {
    first.push(e);
    if (e.type === 'response.output_text.delta' && first.filter((x) => x.type === e.type).length === 3) break;
  }
  assert.equal(first[0].type, 'response.created');
  assert.equal(first[0].response.status, 'queued');
  const id = first[0].response.id;
  const lastSeen = first.at(-1).sequence_number;
  const rest = [];
  for await (const e of await client.responses.retrieve(id, { stream: true, starting_after: lastSeen })) rest.push(e);
  assert.equal(rest[0].sequence_number, lastSeen + 1);
  rest.forEach((e, i) => assert.equal(e.sequence_number, lastSeen + 1 + i));
  assert.equal(rest.at(-1).type, 'response.incomplete');
  const text = [...first, ...rest].filter((e) => e.type === 'response.output_text.delta').map((e) => e.delta).join('');
  assert.equal(text, fg.output_text);
  // The whole stream again, from the start, after the end.
  const again = [];
  for await (const e of await client.responses.retrieve(id, { stream: true })) again.push(e);
  assert.deepEqual(again, [...first, ...rest]);
  assert.equal((await client.responses.retrieve(id)).output_text, fg.output_text);
});

test('background cancel: status cancelled, the generation stops, the partial output kept', async () => {
  const bg = await client.responses.create({ ...base, input: 'Write forever', background: true,
                                             max_output_tokens: 1900, ignore_eos: true, temperature: 1 });
  await new Promise((r) => setTimeout(r, 300));
  const c = await client.responses.cancel(bg.id);
  assert.equal(c.status, 'cancelled');
  assert.ok(c.usage.output_tokens < 1900);
  await idle();
  const g = await client.responses.retrieve(bg.id);
  assert.equal(g.status, 'cancelled');
  // cancelling again returns it as it is
  const { output_text, ...asIs } = g;
  assert.deepEqual(await client.responses.cancel(bg.id), asIs);
  const events = [];
  for await (const e of await client.responses.retrieve(bg.id, { stream: true })) events.push(e);
  assert.equal(events.at(-1).type, 'response.cancelled');
  // deleting a running background response cancels it
  const bg2 = await client.responses.create({ ...base, input: 'Write forever', background: true,
                                              max_output_tokens: 1900, ignore_eos: true, temperature: 1 });
  await client.responses.delete(bg2.id);
  await idle();
});

test('--responses-store 0: nothing stored, previous_response_id and background are 400s naming the flag', async () => {
  const s = await startServer(['--max-model-len', '256', '--responses-store', '0']);
  try {
    const c = new OpenAI({ baseURL: `${s.base}/v1`, apiKey: 'unused', maxRetries: 0 });
    const r = await c.responses.create({ ...base, input: 'hi', max_output_tokens: 2 });
    assert.equal(r.store, false);
    assert.ok(Number.isNaN((await metrics(s.base)).get('responses_stored')), 'no store, no gauge');
    await assert.rejects(c.responses.retrieve(r.id), (e) => e instanceof OpenAI.NotFoundError &&
                         /--responses-store 0/.test(e.message));
    for (const extra of [{ previous_response_id: r.id }, { background: true }])
      await assert.rejects(c.responses.create({ ...base, input: 'x', ...extra }), (e) =>
        e instanceof OpenAI.BadRequestError && /--responses-store 0/.test(e.message));
  } finally {
    assert.equal((await s.stop()).code, 0);
  }
});

test('a server stopping cancels its background responses, ends the streams that follow them, exits 0', async () => {
  const s = await startServer(['--max-model-len', '2048', '--shutdown-timeout', '1']);
  const c = new OpenAI({ baseURL: `${s.base}/v1`, apiKey: 'unused', maxRetries: 0 });
  const bg = await c.responses.create({ ...base, input: 'Write forever', background: true, max_output_tokens: 1900,
                                        ignore_eos: true, temperature: 1 });
  const followed = (async () => {
    const evs = [];
    for await (const e of await c.responses.retrieve(bg.id, { stream: true })) evs.push(e);
    return evs;
  })();
  await new Promise((r) => setTimeout(r, 200));
  const t0 = Date.now();
  assert.equal((await s.stop()).code, 0);
  assert.ok(Date.now() - t0 < 10000);
  assert.equal((await followed).at(-1).type, 'response.cancelled');
});
