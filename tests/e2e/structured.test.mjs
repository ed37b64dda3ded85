// Structured output (docs/server.md "Structured outputs") through the official openai SDK: response_format
// json_object / json_schema and vLLM's structured_outputs. The tiny model's weights are random, so without the
// constraint its text is never JSON: every check below fails if the grammar is not applied.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import OpenAI from 'openai';
import { startServer } from './server.mjs';

let srv, client;
before(async () => {
  srv = await startServer(['--max-model-len', '1024']);
  client = new OpenAI({ baseURL: `${srv.base}/v1`, apiKey: 'unused', maxRetries: 0 });
});
after(async () => { const r = await srv.stop(); assert.equal(r.code, 0, `exit ${JSON.stringify(r)}\n${srv.log()}`); });

const person = {
  type: 'object',
  properties: {
    name: { type: 'string', maxLength: 10 },
    age: { type: 'integer' },
    member: { type: 'boolean' },
    color: { enum: ['red', 'green', 'blue'] },
    tags: { type: 'array', items: { type: 'string', maxLength: 4 }, maxItems: 2 },
  },
  required: ['name', 'age', 'member', 'color'],
  additionalProperties: false,
};

function checkPerson(text, where) {
  let v;
  assert.doesNotThrow(() => { v = JSON.parse(text); }, `${where}: not JSON: ${JSON.stringify(text)}`);
  assert.equal(typeof v, 'object', where);
  for (const k of Object.keys(v)) assert.ok(k in person.properties, `${where}: unexpected key ${k} in ${text}`);
  assert.equal(typeof v.name, 'string', where);
  assert.ok([...v.name].length <= 10, `${where}: name too long: ${text}`);
  assert.ok(Number.isInteger(v.age), `${where}: age ${v.age}`);
  assert.equal(typeof v.member, 'boolean', where);
  assert.ok(['red', 'green', 'blue'].includes(v.color), `${where}: color ${v.color}`);
  if ('tags' in v) {
    assert.ok(Array.isArray(v.tags) && v.tags.length <= 2, `${where}: tags ${text}`);
    for (const t of v.tags) assert.ok(typeof t === 'string' && [...t].length <= 4, `${where}: tag ${t}`);
  }
  return v;
}

const jsonSchemaFormat = { type: 'json_schema', json_schema: { name: 'person', schema: person, strict: true } };

test('response_format json_schema: sampled chat answers are JSON of the schema (thinking off), n = 3', async () => {
  const r = await client.chat.completions.create({
    model: 'tiny', messages: [{ role: 'user', content: 'Describe a person' }], max_tokens: 300, temperature: 1,
    seed: 7, n: 3, response_format: jsonSchemaFormat, chat_template_kwargs: { enable_thinking: false },
  });
  for (const c of r.choices) {
    assert.equal(c.finish_reason, 'stop', `choice ${c.index}: ${c.message.content}`);
    checkPerson(c.message.content, `choice ${c.index}`);
  }
});

test('response_format json_schema, streamed: the deltas join into the same JSON as the non-streamed answer', async () => {
  const req = { model: 'tiny', messages: [{ role: 'user', content: 'Again' }], max_tokens: 300, temperature: 0.8,
                seed: 11, response_format: jsonSchemaFormat, chat_template_kwargs: { enable_thinking: false } };
  const whole = (await client.chat.completions.create(req)).choices[0].message.content;
  let streamed = '';
  let finish = null;
  for await (const chunk of await client.chat.completions.create({ ...req, stream: true }))
    for (const c of chunk.choices) {
      streamed += c.delta.content ?? '';
      finish = c.finish_reason ?? finish;
    }
  assert.equal(finish, 'stop');
  assert.equal(streamed, whole);
  checkPerson(streamed, 'streamed');
});

test('thinking on: the reasoning is free, the content after </think> is constrained', async () => {
  // </think> (2009 in the tiny vocabulary) is pushed a little to come within the budget (with this seed after ~40
  // free tokens); the grammar starts after it.
  const r = await client.chat.completions.create({
    model: 'tiny', messages: [{ role: 'user', content: 'Think, then answer' }], max_tokens: 300, temperature: 1,
    seed: 4, logit_bias: { 2009: 2 }, response_format: jsonSchemaFormat,
  });
  const m = r.choices[0].message;
  assert.equal(r.choices[0].finish_reason, 'stop', JSON.stringify(m));
  checkPerson(m.content, 'content after thinking');
  assert.ok(typeof m.reasoning_content === 'string' && m.reasoning_content.length > 10,
            `free reasoning first: ${JSON.stringify(m)}`);
  assert.throws(() => JSON.parse(m.reasoning_content), 'the reasoning is not constrained');
});

test('response_format json_object and structured_outputs (json, choice) on completions', async () => {
  const obj = await client.completions.create({ model: 'tiny', prompt: 'JSON:', max_tokens: 200, temperature: 1, seed: 5,
                                                response_format: { type: 'json_object' } });
  const o = obj.choices[0];
  if (o.finish_reason === 'stop') {
    const v = JSON.parse(o.text);
    assert.ok(v !== null && typeof v === 'object' && !Array.isArray(v), `json_object gave ${o.text}`);
  } else {
    assert.equal(o.finish_reason, 'length');
    assert.match(o.text, /^\{/, 'a truncated object still starts as one');
  }
  const js = await client.completions.create({ model: 'tiny', prompt: 'JSON:', max_tokens: 300, temperature: 1, seed: 6,
                                               structured_outputs: { json: person } });
  assert.equal(js.choices[0].finish_reason, 'stop');
  checkPerson(js.choices[0].text, 'structured_outputs.json');
  // llama.cpp's spelling: a top-level json_schema.
  const lj = await client.completions.create({ model: 'tiny', prompt: 'JSON:', max_tokens: 300, temperature: 1, seed: 9,
                                               json_schema: person });
  assert.equal(lj.choices[0].finish_reason, 'stop');
  checkPerson(lj.choices[0].text, 'json_schema');
  // vLLM's disable_any_whitespace: no whitespace outside the strings.
  for (const seed of [6, 7, 8]) {
    const c = await client.completions.create({ model: 'tiny', prompt: 'JSON:', max_tokens: 300, temperature: 1, seed,
                                                structured_outputs: { json: person, disable_any_whitespace: true } });
    assert.equal(c.choices[0].finish_reason, 'stop');
    checkPerson(c.choices[0].text, 'disable_any_whitespace');
    assert.doesNotMatch(c.choices[0].text.replace(/"(?:[^"\\]|\\.)*"/g, '""'), /\s/, c.choices[0].text);
  }
  for (const seed of [1, 2, 3, 4]) {
    const ch = await client.completions.create({ model: 'tiny', prompt: 'Pick:', max_tokens: 20, temperature: 1, seed,
                                                 structured_outputs: { choice: ['alpha', 'beta gamma', 'δέλτα'] } });
    assert.ok(['alpha', 'beta gamma', 'δέλτα'].includes(ch.choices[0].text), `choice gave ${ch.choices[0].text}`);
    assert.equal(ch.choices[0].finish_reason, 'stop');
  }
});

test('structured_outputs.regex, guided_regex and a schema\'s pattern: the text matches as a whole', async () => {
  const pattern = '\\d{3}-[a-z]{2,5}( [A-Z]{1,4})?';
  const whole = new RegExp(`^(?:${pattern})$`);
  for (const seed of [1, 2, 3]) {
    const r = await client.chat.completions.create({
      model: 'tiny', messages: [{ role: 'user', content: 'A code' }], max_tokens: 40, temperature: 1, seed,
      structured_outputs: { regex: pattern }, chat_template_kwargs: { enable_thinking: false } });
    const c = r.choices[0];
    assert.equal(c.finish_reason, 'stop', `regex gave ${JSON.stringify(c.message.content)}`);
    assert.match(c.message.content, whole);
  }
  const g = await client.completions.create({ model: 'tiny', prompt: 'Code:', max_tokens: 40, temperature: 1, seed: 4,
                                              guided_regex: pattern, n: 2 });
  for (const c of g.choices) {
    assert.equal(c.finish_reason, 'stop', `guided_regex gave ${JSON.stringify(c.text)}`);
    assert.match(c.text, whole);
  }
  const schema = { type: 'object', properties: { id: { type: 'string', pattern: '^[A-Z]{2}-\\d{3}$' },
                                                 note: { type: 'string', pattern: '"[a-z]+"', maxLength: 6 } },
                   required: ['id', 'note'], additionalProperties: false };
  const j = await client.chat.completions.create({
    model: 'tiny', messages: [{ role: 'user', content: 'An id' }], max_tokens: 100, temperature: 1, seed: 5,
    response_format: { type: 'json_schema', json_schema: { name: 'x', schema, strict: true } },
    chat_template_kwargs: { enable_thinking: false } });
  assert.equal(j.choices[0].finish_reason, 'stop', j.choices[0].message.content);
  const v = JSON.parse(j.choices[0].message.content);
  assert.match(v.id, /^[A-Z]{2}-\d{3}$/);
  assert.match(v.note, /^"[a-z]+"$/);
  assert.ok([...v.note].length <= 6, `note too long: ${v.note}`);
});

test('GBNF grammars: structured_outputs.grammar, guided_grammar and llama.cpp\'s grammar', async () => {
  // A small arithmetic language (recursive): the answer must parse as one.
  const gbnf = `
root   ::= expr
expr   ::= term (("+" | "-") term){0,3}
term   ::= num | "(" expr ")"
num    ::= [1-9] [0-9]{0,2}   # no leading zeros
`;
  const isExpr = (t) => {  // a recursive-descent check of the same language, in JS
    let i = 0;
    const term = () => {
      if (t[i] === '(') { i++; if (!expr() || t[i] !== ')') return false; i++; return true; }
      const m = /^[1-9][0-9]{0,2}/.exec(t.slice(i));
      if (!m) return false;
      i += m[0].length;
      return true;
    };
    const expr = () => {
      if (!term()) return false;
      for (let k = 0; k < 3 && (t[i] === '+' || t[i] === '-'); k++) { i++; if (!term()) return false; }
      return true;
    };
    return expr() && i === t.length;
  };
  for (const [extra, seed] of [[{ structured_outputs: { grammar: gbnf } }, 1], [{ guided_grammar: gbnf }, 2],
                               [{ grammar: gbnf }, 3], [{ grammar: gbnf }, 4]]) {
    const r = await client.completions.create({ model: 'tiny', prompt: 'Sum:', max_tokens: 60, temperature: 1, seed,
                                                ...extra });
    const c = r.choices[0];
    if (c.finish_reason === 'stop') assert.ok(isExpr(c.text), `${JSON.stringify(extra).slice(0, 30)} gave ${c.text}`);
    else assert.ok(/^[0-9+\-()]*$/.test(c.text), `a truncated answer keeps to the alphabet: ${c.text}`);
  }
  const chat = await client.chat.completions.create({
    model: 'tiny', messages: [{ role: 'user', content: 'Yes or no?' }], max_tokens: 20, temperature: 1, seed: 5,
    structured_outputs: { grammar: 'root ::= ("yes" | "no") "."?' }, chat_template_kwargs: { enable_thinking: false } });
  assert.match(chat.choices[0].message.content, /^(yes|no)\.?$/);
  assert.equal(chat.choices[0].finish_reason, 'stop');
});

// Structural tags (vLLM's structural_tag, xgrammar's format objects): free text with constrained regions.
const weatherTags = [
  { type: 'tag', begin: '<call=get_weather>', end: '</call>',
    content: { type: 'json_schema', json_schema: { type: 'object', properties: { city: { type: 'string', maxLength: 8 } },
                                                   required: ['city'] } } },
  { type: 'tag', begin: '<call=get_time>', end: '</call>',
    content: { type: 'json_schema', json_schema: { type: 'object', properties: { utc: { type: 'boolean' } },
                                                   required: ['utc'] } } },
];

function checkCall(name, args, where) {
  const v = JSON.parse(args);
  if (name === 'get_weather') assert.ok(typeof v.city === 'string' && [...v.city].length <= 8, `${where}: ${args}`);
  else assert.equal(typeof v.utc, 'boolean', `${where}: ${args}`);
  assert.deepEqual(Object.keys(v), [name === 'get_weather' ? 'city' : 'utc'], `${where}: ${args}`);
}

test('response_format structural_tag: a prefix, then exactly one tag of the schema (chat, n = 3)', async () => {
  const r = await client.chat.completions.create({
    model: 'tiny', messages: [{ role: 'user', content: 'Call a tool' }], max_tokens: 200, temperature: 1, seed: 11, n: 3,
    chat_template_kwargs: { enable_thinking: false },
    response_format: { type: 'structural_tag', format: { type: 'sequence', elements: [
      { type: 'const_string', value: 'Calling: ' },
      { type: 'triggered_tags', triggers: ['<call='], tags: weatherTags, at_least_one: true, stop_after_first: true },
    ] } },
  });
  for (const c of r.choices) {
    const m = /^Calling: <call=(get_weather|get_time)>(.*)<\/call>$/s.exec(c.message.content);
    assert.ok(m, `choice ${c.index}: ${JSON.stringify(c.message.content)}`);
    checkCall(m[1], m[2], `choice ${c.index}`);
    assert.equal(c.finish_reason, 'stop', 'nothing may follow the one tag: the end of the output is forced');
  }
});

test('structured_outputs.structural_tag as JSON text (vLLM\'s form): free text keeps its excludes, tags their schema', async () => {
  const spec = { type: 'structural_tag', format: {
    type: 'triggered_tags', triggers: ['<call='], tags: weatherTags, excludes: ['e', 'E'] } };
  let calls = 0;
  for (const seed of [1, 2, 3, 4]) {
    const r = await client.completions.create({ model: 'tiny', prompt: 'Text:', max_tokens: 80, temperature: 1, seed,
                                                structured_outputs: { structural_tag: JSON.stringify(spec) } });
    const text = r.choices[0].text;
    // Complete tags out; what is left is free text, and a tag cut by max_tokens may end it.
    const free = text.replace(/<call=(get_weather|get_time)>(.*?)<\/call>/gs, (_, name, args) => {
      checkCall(name, args, `seed ${seed}`);
      ++calls;
      return '';
    });
    const cut = free.indexOf('<call=');
    const rest = cut >= 0 ? free.slice(0, cut) : free;
    if (cut >= 0) assert.equal(r.choices[0].finish_reason, 'length', `an unclosed tag only where the text was cut: ${text}`);
    assert.ok(!/[eE]/.test(rest), `the free text holds an excluded letter: ${JSON.stringify(text)}`);
    assert.ok(rest.length > 0 || calls > 0, 'some output');
  }
  // The same spec in the older form (structures + triggers, JSON Schema contents) is accepted too.
  const legacy = { type: 'structural_tag', triggers: ['<call='], structures: weatherTags.map(
    (t) => ({ begin: t.begin, schema: t.content.json_schema, end: t.end })) };
  const r = await client.chat.completions.create({ model: 'tiny', messages: [{ role: 'user', content: 'x' }],
                                                   max_tokens: 8, response_format: legacy });
  assert.equal(r.choices.length, 1);
});

test('under a structural tag the added tokens <tool_call> / </tool_call> spell their text; under other constraints not', async () => {
  const tk = await (await fetch(`${srv.base}/tokenize`, { method: 'POST', headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ model: 'tiny', prompt: '<tool_call></tool_call>' }) })).json();
  assert.equal(tk.tokens.length, 2, JSON.stringify(tk));
  const [open, close] = tk.tokens;
  // Both added tokens pushed far above the rest: where the constraint lets them spell "<tool_call>", they win.
  const base = { model: 'tiny', prompt: 'Call:', max_tokens: 40, temperature: 0, return_token_ids: true,
                 logit_bias: { [open]: 100, [close]: 100 } };
  const tagged = await client.completions.create({ ...base, response_format: { type: 'structural_tag', format: {
    type: 'tag', begin: '<tool_call>', content: { type: 'const_string', value: '\nx\n' }, end: '</tool_call>' } } });
  const t = tagged.choices[0];
  assert.equal(t.text, '<tool_call>\nx\n</tool_call>');
  assert.equal(t.token_ids[0], open, `the model's own <tool_call> token: ${JSON.stringify(t.token_ids)}`);
  assert.equal(t.token_ids.at(-1), close, JSON.stringify(t.token_ids));
  const regex = await client.completions.create({ ...base, structured_outputs: { regex: '<tool_call>\nx\n</tool_call>' } });
  const r = regex.choices[0];
  assert.equal(r.text, '<tool_call>\nx\n</tool_call>', 'spelled with ordinary tokens');
  assert.ok(!r.token_ids.includes(open) && !r.token_ids.includes(close), JSON.stringify(r.token_ids));
});

test('unsupported or malformed constraints are 400s naming the field; the server stays up', async () => {
  const msgs = [{ role: 'user', content: 'x' }];
  const cases = [
    [{ response_format: { type: 'regex' } }, /response_format.*not supported/],
    [{ response_format: { type: 'json_schema' } }, /json_schema/],
    [{ response_format: { type: 'json_schema', json_schema: { name: 'x', schema: { type: 'string', pattern: 'a(?=b)' } } } },
     /pattern.*lookahead/],
    [{ response_format: { type: 'json_schema', json_schema: { name: 'x', schema: { type: 'strange' } } } }, /strange/],
    [{ structured_outputs: { structural_tag: '{}' } }, /structured_outputs: structural_tag: expected \{"type": "structural_tag", "format"/],
    [{ structured_outputs: { structural_tag: '{"type": "structural_tag", "format": ' } }, /structural_tag' is a string that is not JSON/],
    [{ response_format: { type: 'structural_tag', format: { type: 'token', token: '<|im_end|>' } } },
     /response_format: structural_tag: format: the token-level format "token" is not supported/],
    [{ response_format: { type: 'structural_tag', format: { type: 'triggered_tags', triggers: ['<f='],
                                                             tags: [{ begin: '<g>', content: { type: 'any_text' }, end: '</g>' }] } } },
     /format\.tags\[0\]\.begin "<g>" starts with none of the triggers \["<f="\]/],
    [{ structured_outputs: { json_object: true, disable_any_whitespace: 'yes' } }, /disable_any_whitespace' must be a boolean/],
    [{ structured_outputs: { grammar: 'root ::= item\nitem ::= "a" | missing' } },
     /structured_outputs: grammar: the rule 'missing' is used but never defined at line 2, column 16/],
    [{ grammar: 'root ::= root "a" | "b"' }, /^400 grammar: rule 'root' -> .* refers back to itself .*left recursion/],
    [{ grammar: 'root ::= "a" root' }, /^400 grammar: no finite text satisfies it/],
    [{ structured_outputs: { regex: '(a' } }, /structured_outputs: regex: a '\(' that is never closed at character 0/],
    [{ guided_regex: 'a\\1' }, /guided_regex.*backreference/],
    [{ structured_outputs: { regex: 'a', choice: ['a'] } }, /one of json, json_object, choice, regex, grammar/],
    [{ guided_grammar: 'root ::= "a"', guided_regex: 'a' }, /both constrain/],
    [{ structured_outputs: { choice: [] } }, /choice/],
    [{ response_format: { type: 'json_object' }, structured_outputs: { json: person } }, /both constrain/],
    [{ response_format: { type: 'json_object' }, ignore_eos: true }, /ignore_eos/],
  ];
  for (const [extra, re] of cases) {
    await assert.rejects(client.chat.completions.create({ model: 'tiny', messages: msgs, max_tokens: 4, ...extra }),
      (e) => {
        assert.equal(e.status, 400, `${re}: ${e.status} ${e.message}`);
        assert.match(e.message, re);
        return true;
      });
  }
  const ok = await client.chat.completions.create({ model: 'tiny', messages: msgs, max_tokens: 4,
                                                    response_format: { type: 'text' } });
  assert.equal(ok.choices.length, 1, 'response_format text is no constraint');
  assert.equal((await fetch(`${srv.base}/health`)).status, 200);
});
