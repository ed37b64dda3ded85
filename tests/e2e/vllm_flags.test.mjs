// A vLLM recipe's command line starts deltaserve (docs/server.md "vLLM's flags"): the flags that change nothing here
// are accepted with a note each, --config FILE.yaml gives flags as vLLM's does, several API keys (--api-key-file,
// $DELTASERVE_API_KEY), --metrics-prefix vllm, --allowed-media-domains refuses other hosts (and redirects to them), --language-model-only
// serves text without the vision tower.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import OpenAI from 'openai';
import { startServer, DATA } from './server.mjs';

const TMP = fs.mkdtempSync(path.join(os.tmpdir(), 'ds-vllm-flags-'));
const PNG = fs.readFileSync(path.join(DATA, 'tiny-moe/image.png'));
after(() => fs.rmSync(TMP, { recursive: true, force: true }));

const ask = (c, extra = {}) => c.chat.completions.create({ model: 'tiny', max_tokens: 2, temperature: 0,
  messages: [{ role: 'user', content: 'hi' }], ...extra });
const imageAsk = (c, url) => ask(c, { messages: [{ role: 'user', content: [
  { type: 'text', text: 'What is it?' }, { type: 'image_url', image_url: { url } }] }] });

test('a vLLM recipe in a --config file: notes for the no-ops, API keys from a file, media hosts allow-listed', async () => {
  const media = http.createServer((req, res) => {
    if (req.url === '/image.png') { res.writeHead(200, { 'Content-Type': 'image/png' }); res.end(PNG); }
    else if (req.url === '/away') {
      res.writeHead(302, { Location: `http://localhost:${media.address().port}/image.png` });
      res.end();
    } else { res.writeHead(404); res.end(); }
  });
  await new Promise((r) => media.listen(0, '127.0.0.1', r));
  const mediaBase = `http://127.0.0.1:${media.address().port}`;
  fs.writeFileSync(path.join(TMP, 'keys'), '# two keys\nkey-one\n\n  key-two  \n');
  fs.writeFileSync(path.join(TMP, 'serve.yaml'), [
    '# copied from a vLLM recipe',
    'reasoning-parser: qwen3',
    'enable-auto-tool-choice: true',
    'tool_call_parser: qwen3_coder',
    'trust-remote-code: true',
    'kv-cache-dtype: fp8',
    'max-num-queued-reqs: 8',
    `api-key-file: ${path.join(TMP, 'keys')}`,
    'allowed-media-domains: ["127.0.0.1"]',
    'max-model-len: 4096   # the command line wins',
    'metrics-prefix: vllm',
  ].join('\n'));
  const s = await startServer(['--config', path.join(TMP, 'serve.yaml'), '-tp', '1', '--max-model-len', '1024']);
  try {
    const log = s.log();
    for (const f of ['--reasoning-parser qwen3', '--enable-auto-tool-choice', '--tool-call-parser qwen3_coder',
                     '--trust-remote-code'])
      assert.match(log, new RegExp(`note: ${f} is vLLM's; it changes nothing here`), log);
    assert.match(log, /note: --kv-cache-dtype fp8 is not implemented/);
    assert.match(log, /max_model_len 1024, images and videos\)/);
    for (const key of ['key-one', 'key-two'])
      assert.equal((await ask(new OpenAI({ baseURL: `${s.base}/v1`, apiKey: key, maxRetries: 0 }))).usage.completion_tokens, 2);
    await assert.rejects(ask(new OpenAI({ baseURL: `${s.base}/v1`, apiKey: 'key-three', maxRetries: 0 })),
                         (e) => e instanceof OpenAI.AuthenticationError);
    const c = new OpenAI({ baseURL: `${s.base}/v1`, apiKey: 'key-two', maxRetries: 0 });
    const ok = await imageAsk(c, `${mediaBase}/image.png`);
    assert.ok(ok.usage.prompt_tokens > 40, 'the image was read');
    await assert.rejects(imageAsk(c, `http://localhost:${media.address().port}/image.png`), (e) =>
      e instanceof OpenAI.BadRequestError && /is on host 'localhost', which --allowed-media-domains does not list/.test(e.message));
    await assert.rejects(imageAsk(c, `${mediaBase}/away`), (e) =>
      e instanceof OpenAI.BadRequestError && /\(a redirect of 'http:\/\/127\.0\.0\.1:\d+\/away'\) is on host 'localhost'/.test(e.message));
    assert.equal((await fetch(`${s.base}/health`)).status, 200);
    // --metrics-prefix vllm: vLLM's dashboards find their names
    const m = await (await fetch(`${s.base}/metrics`)).text();
    assert.match(m, /^vllm:num_requests_running\{model_name="tiny"\} 0$/m);
    assert.match(m, /^vllm:prompt_tokens_total\{model_name="tiny"\} [1-9]/m);
    assert.ok(!m.includes('deltaserve:'));
  } finally {
    media.close();
    assert.equal((await s.stop()).code, 0);
  }
});

test('--language-model-only: text is served, images are 400s naming the flag; $DELTASERVE_API_KEY; several served names', async () => {
  // startServer gives --served-model-name tiny: these two follow it, as vLLM's `--served-model-name A B C`
  const s = await startServer(['alias-a', 'org/alias-b', '--language-model-only', '--max-model-len', '512'],
                              { env: { DELTASERVE_API_KEY: 'env-key' } });
  try {
    assert.match(s.log(), /text only: --language-model-only left the vision tower unloaded/);
    const c = new OpenAI({ baseURL: `${s.base}/v1`, apiKey: 'env-key', maxRetries: 0 });
    assert.equal((await ask(c)).usage.completion_tokens, 2);
    await assert.rejects(imageAsk(c, `data:image/png;base64,${PNG.toString('base64')}`), (e) =>
      e instanceof OpenAI.BadRequestError && /started with --language-model-only/.test(e.message));
    await assert.rejects(ask(new OpenAI({ baseURL: `${s.base}/v1`, apiKey: 'other', maxRetries: 0 })),
                         (e) => e instanceof OpenAI.AuthenticationError);
    // every served name is a model id; responses name the first
    assert.deepEqual((await c.models.list()).data.map((m) => m.id), ['tiny', 'alias-a', 'org/alias-b']);
    assert.equal((await c.models.retrieve('org/alias-b')).id, 'org/alias-b');
    const r = await ask(c, { model: 'org/alias-b' });
    assert.equal(r.model, 'tiny');
    await assert.rejects(ask(c, { model: 'alias-c' }), (e) =>
      e instanceof OpenAI.NotFoundError && /this server serves 'tiny', 'alias-a', 'org\/alias-b'/.test(e.message));
  } finally {
    assert.equal((await s.stop()).code, 0);
  }
});
