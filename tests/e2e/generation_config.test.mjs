// Server-wide request defaults (docs/server.md "Request semantics"): vLLM's --generation-config auto | vllm | FOLDER
// and --override-generation-config (a Responses API answer echoes the temperature and top_p it ran with, so a request
// that leaves them out shows the defaults in force), and --enable-force-include-usage.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { startServer } from './server.mjs';

async function defaults(args) {
  const srv = await startServer(args);
  try {
    const r = await fetch(`${srv.base}/v1/responses`, {
      method: 'POST', headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ model: 'tiny', input: 'Hi', max_output_tokens: 2 }) });
    assert.equal(r.status, 200);
    const j = await r.json();
    return { temperature: j.temperature, top_p: j.top_p, log: srv.log() };
  } finally {
    assert.equal((await srv.stop()).code, 0);
  }
}

test('auto (the model\'s generation_config.json), vllm (none), a folder, and overrides on each', async () => {
  const auto = await defaults([]);
  assert.equal(auto.temperature, 0.6);
  assert.equal(auto.top_p, 0.95);
  assert.match(auto.log, /default sampling parameters \(generation config\): \{"temperature":0\.6,"top_k":20,"top_p":0\.95\}/);
  const none = await defaults(['--generation-config', 'vllm']);
  assert.equal(none.temperature, 1);
  assert.equal(none.top_p, 1);
  const over = await defaults(['--override-generation-config', '{"temperature": 0.3}']);
  assert.equal(over.temperature, 0.3);
  assert.equal(over.top_p, 0.95, 'merged with the model\'s');
  const onlyOver = await defaults(['--generation-config', 'vllm', '--override-generation-config', '{"top_p": 0.5}']);
  assert.equal(onlyOver.temperature, 1);
  assert.equal(onlyOver.top_p, 0.5);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'gencfg-'));
  fs.writeFileSync(path.join(dir, 'generation_config.json'), JSON.stringify({ temperature: 0.2, top_p: 0.8 }));
  const folder = await defaults(['--generation-config', dir]);
  assert.equal(folder.temperature, 0.2);
  assert.equal(folder.top_p, 0.8);
  fs.rmSync(dir, { recursive: true });
});

test('malformed generation-config flags stop the server at start, naming the flag', async () => {
  await assert.rejects(startServer(['--generation-config', '/no/such/dir']),
                       /--generation-config: expected auto, vllm or a folder, got '\/no\/such\/dir'/);
  await assert.rejects(startServer(['--override-generation-config', '{"temp": 1}']),
                       /--override-generation-config: unknown parameter 'temp'/);
  await assert.rejects(startServer(['--override-generation-config', '{"top_k": 2.5}']),
                       /--override-generation-config: 'top_k' must be an integer, got 2.5/);
  const empty = fs.mkdtempSync(path.join(os.tmpdir(), 'gencfg-'));
  await assert.rejects(startServer(['--generation-config', empty]), /generation_config\.json does not exist/);
  fs.rmSync(empty, { recursive: true });
});

test('--enable-force-include-usage: every stream ends with a usage chunk', async () => {
  for (const [args, want] of [[[], false], [['--enable-force-include-usage'], true]]) {
    const srv = await startServer(args);
    try {
      const r = await fetch(`${srv.base}/v1/chat/completions`, {
        method: 'POST', headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ model: 'tiny', messages: [{ role: 'user', content: 'Hi' }], max_tokens: 3, stream: true }) });
      const chunks = (await r.text()).split('\n').filter((l) => l.startsWith('data: {')).map((l) => JSON.parse(l.slice(6)));
      const last = chunks.at(-1);
      assert.equal(Boolean(last.usage), want, JSON.stringify(last));
      if (want) assert.equal(last.usage.completion_tokens, 3);
    } finally {
      assert.equal((await srv.stop()).code, 0);
    }
  }
});
