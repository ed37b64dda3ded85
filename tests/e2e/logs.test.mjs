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
    const stream = await client.chat.completions.create({ model: 'tiny', messages: [{ role: 'user', content: 'Hi' }],
                                                          max_tokens: 4, stream: true });
    for await (const _ of stream) { /* drain */ }
    await assert.rejects(client.completions.create({ model: 'tiny', prompt: 'x', temperature: 'hot' }),
                         (e) => e.status === 400);
    await waitFor(srv, /deltaserve: stats: prompt throughput [0-9.]+ tokens\/s, generation throughput [1-9][0-9.]* tokens\/s, running \d+, waiting \d+, KV cache [0-9.]+%, state slots \d+\/\d+/);
    await waitFor(srv, /generation throughput 0\.0 tokens\/s, idle/);  // one idle line after the work
    const log = srv.log();
    const id = r.id;
    assert.match(log, new RegExp(`deltaserve: request ${id}: completion, 1 choice\\(s\\), prompt 4 tokens, max_tokens 12, stream no, temperature 0`));
    assert.match(log, new RegExp(`deltaserve: finished ${id}: length, prompt 4 tokens \\(0 cached\\), completion 12 tokens, time to first token [0-9.]+ s, total [0-9.]+ s`));
    assert.match(log, /deltaserve: finished chatcmpl-[0-9a-f]+: length, prompt \d+ tokens/);
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
