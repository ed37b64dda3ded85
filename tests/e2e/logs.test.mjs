// The server's stderr log, as an operator reads it (vLLM's conventions): the periodic stats line while there is work,
// the access log (one line per HTTP request, health probes and metric scrapes left out), and with
// --enable-log-requests one line per generation received and finished; each turned off by its flag.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import OpenAI from 'openai';
import { startServer } from './server.mjs';

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function waitFor(srv, re, ms = 10000) {
  const deadline = Date.now() + ms;
  while (!re.test(srv.log())) {
    if (Date.now() > deadline) assert.fail(`no log line matching ${re} within ${ms} ms:\n${srv.log()}`);
    await sleep(50);
  }
}

test('stats line, access log and request lines', async () => {
  const srv = await startServer(['--log-stats-interval', '0.2', '--enable-log-requests']);
  try {
    const client = new OpenAI({ baseURL: `${srv.base}/v1`, apiKey: 'unused', maxRetries: 0 });
    await fetch(`${srv.base}/health`);
    await fetch(`${srv.base}/metrics`);
    assert.equal((await fetch(`${srv.base}/ping`)).status, 200);
    assert.equal((await fetch(`${srv.base}/ping`, { method: 'POST' })).status, 200);
    const r = await client.completions.create({ model: 'tiny', prompt: [5, 6, 7, 8], max_tokens: 12, temperature: 0,
                                                ignore_eos: true });
    // Why a prompt was or was not resumed from a prefix-cache checkpoint (block size 16).
    const p1 = Array.from({ length: 40 }, (_, i) => 5 + i), p2 = [...p1.slice(0, 20), ...p1.slice(0, 20).reverse()];
    const ids = [];
    for (const prompt of [p1, p1, p2])
      ids.push((await client.completions.create({ model: 'tiny', prompt, max_tokens: 2, temperature: 0 })).id);
    const stream = await client.chat.completions.create({ model: 'tiny', messages: [{ role: 'user', content: 'Hi' }],
                                                          max_tokens: 4, stream: true });
    for await (const _ of stream) { /* drain */ }
    await assert.rejects(client.completions.create({ model: 'tiny', prompt: 'x', temperature: 'hot' }),
                         (e) => e.status === 400);
    await waitFor(srv, /deltaserve: stats: prompt throughput [0-9.]+ tokens\/s, generation throughput [1-9][0-9.]* tokens\/s, running \d+, waiting \d+, KV cache [0-9.]+%, state slots \d+\/\d+/);
    // One idle line after the work: the last stats line says idle (an earlier one can fall in a gap between two
    // requests on a loaded machine).
    await sleep(500);  // past the interval that counts the last request's tokens
    const lastIdle = () => /idle$/.test((srv.log().match(/deltaserve: stats: .*/g) || []).pop() ?? '');
    for (const deadline = Date.now() + 10000; !lastIdle();) {
      if (Date.now() > deadline) assert.fail(`the last stats line is not an idle one:\n${srv.log()}`);
      await sleep(50);
    }
    const log = srv.log();
    const id = r.id;
    assert.match(log, new RegExp(`deltaserve: request ${id}: completion, 1 choice\\(s\\), prompt 4 tokens, max_tokens 12, stream no, temperature 0`));
    assert.match(log, new RegExp(`deltaserve: finished ${id}: length, prompt 4 tokens \\(0 cached: no checkpoint shares its first token\\), completion 12 tokens, time to first token [0-9.]+ s, total [0-9.]+ s`));
    assert.match(log, /deltaserve: finished chatcmpl-[0-9a-f]+: length, prompt \d+ tokens/);
    assert.match(log, new RegExp(`finished ${ids[0]}: length, prompt 40 tokens \\(0 cached: no checkpoint shares its first token\\)`));
    assert.match(log, new RegExp(`finished ${ids[1]}: length, prompt 40 tokens \\(32 cached\\)`));
    assert.match(log, new RegExp(`finished ${ids[2]}: length, prompt 40 tokens \\(0 cached: checkpoints share its first 20 tokens, none ends within them\\)`));
    assert.match(log, /deltaserve: 127\.0\.0\.1:\d+ "POST \/v1\/completions HTTP\/1\.1" 200 [0-9.]+ s/);
    assert.match(log, /"POST \/v1\/chat\/completions HTTP\/1\.1" 200/);
    assert.match(log, /"POST \/v1\/completions HTTP\/1\.1" 400/);
    assert.doesNotMatch(log, /"GET \/health HTTP\/1\.1" 200/);  // the 503s while loading are logged
    assert.doesNotMatch(log, /"GET \/metrics/);
    assert.doesNotMatch(log, /\/ping/);
    // Idle: after the idle line no further stats lines.
    const n = (srv.log().match(/deltaserve: stats:/g) || []).length;
    await sleep(700);
    assert.equal((srv.log().match(/deltaserve: stats:/g) || []).length, n, 'quiet while idle');
  } finally {
    const { code } = await srv.stop();
    assert.equal(code, 0);
  }
});

test('--disable-log-stats and --disable-access-log keep stderr quiet; requests are not logged by default', async () => {
  const srv = await startServer(['--log-stats-interval', '0.2', '--disable-log-stats', '--disable-access-log']);
  try {
    const client = new OpenAI({ baseURL: `${srv.base}/v1`, apiKey: 'unused', maxRetries: 0 });
    await client.completions.create({ model: 'tiny', prompt: [5, 6, 7], max_tokens: 8, temperature: 0 });
    await sleep(800);
    const log = srv.log();
    assert.doesNotMatch(log, /deltaserve: stats:/);
    assert.doesNotMatch(log, /"POST /);
    assert.doesNotMatch(log, /deltaserve: (request|finished) /);
  } finally {
    await srv.stop();
  }
  await assert.rejects(startServer(['--log-stats-interval', '0']), /log-stats-interval: expected seconds/);
});
