// Videos in chat requests through the official openai SDK (issue #7 item 4): a video_url part as a data: URL and
// as an allow-listed local file; usage.prompt_tokens counts the expanded prompt (timestamps and pads), which equals
// what `deltaserve logits --video` builds, and so do the greedy tokens; bad videos and too many videos are 400s
// naming the part while the server keeps serving. One small clip (tests/data/vision/clip_80x48_10fps.mp4).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import OpenAI from 'openai';
import { startServer, expectBadRequests, BINARY, DATA, MODEL } from './server.mjs';

const VDIR = path.join(DATA, 'vision');
const CLIP = path.join(VDIR, 'clip_80x48_10fps.mp4');
const MP4 = fs.readFileSync(CLIP);
const VPAD = 1997;  // <|video_pad|>
const N = 3;        // generated tokens compared with the CLI
const TMP = fs.mkdtempSync(path.join(os.tmpdir(), 'ds-video-'));

let srv, client;
before(async () => {
  // Prefill chunks of 16 tokens split the video's groups across engine steps.
  srv = await startServer(['--limit-mm-per-prompt', '{"image": 1, "video": 1}', '--allowed-local-media-path', VDIR,
                           '--max-num-batched-tokens', '16']);
  client = new OpenAI({ baseURL: `${srv.base}/v1`, apiKey: 'unused', maxRetries: 0 });
});
after(async () => {
  fs.rmSync(TMP, { recursive: true, force: true });
  const r = await srv.stop();
  assert.equal(r.code, 0, `exit ${JSON.stringify(r)}\n${srv.log()}`);
});

const videoPart = (url) => ({ type: 'video_url', video_url: { url } });
const TEXT = { type: 'text', text: 'Describe this video.' };

async function chat(content) {
  return client.chat.completions.create({
    model: 'tiny', messages: [{ role: 'user', content }], max_tokens: N, temperature: 0, ignore_eos: true,
    return_token_ids: true });
}

// `deltaserve logits --video` on the template's ids (one placeholder triple) plus the first N-1 generated tokens:
// its expanded input_ids and the argmax of its last N rows.
async function cli(generated) {
  const r = await fetch(`${srv.base}/tokenize`, { method: 'POST', body: JSON.stringify({
    messages: [{ role: 'user', content: [{ type: 'video' }, TEXT] }], add_generation_prompt: true }) });
  const ids = (await r.json()).tokens;
  const out = path.join(TMP, 'logits.safetensors');
  execFileSync(BINARY, ['logits', '--model', MODEL, '--tokens', [...ids, ...generated.slice(0, N - 1)].join(','),
                        '--video', CLIP, '--out', out], { stdio: ['ignore', 'pipe', 'pipe'] });
  const buf = fs.readFileSync(out);
  const hlen = Number(buf.readBigUInt64LE(0));
  const head = JSON.parse(buf.subarray(8, 8 + hlen).toString());
  const view = (name, Type) => new Type(buf.buffer.slice(buf.byteOffset + 8 + hlen + head[name].data_offsets[0],
                                                         buf.byteOffset + 8 + hlen + head[name].data_offsets[1]));
  const [T, V] = head.logits.shape;
  const data = view('logits', Float32Array);
  const tokens = [];
  for (let row = T - N; row < T; row++) {
    let best = 0;
    for (let v = 1; v < V; v++) if (data[row * V + v] > data[row * V + best]) best = v;
    tokens.push(best);
  }
  return { inputIds: Array.from(view('input_ids', Int32Array)).slice(0, T - (N - 1)), tokens };
}

test('a video as a data: URL and as a local file: expanded usage and the CLI\'s greedy tokens', async () => {
  const r = await chat([videoPart(`data:video/mp4;base64,${MP4.toString('base64')}`), TEXT]);
  const c = r.choices[0];
  assert.equal(c.prompt_token_ids.length, r.usage.prompt_tokens);
  assert.equal(c.prompt_token_ids.filter((t) => t === VPAD).length, 12);  // 3 temporal groups of 2x2 merged tokens
  const ref = await cli(c.token_ids);
  assert.deepEqual(c.prompt_token_ids, ref.inputIds);
  assert.deepEqual(c.token_ids, ref.tokens);
  const viaFile = await chat([videoPart(`file://${CLIP}`), TEXT]);
  assert.deepEqual(viaFile.choices[0].token_ids, c.token_ids);
  assert.equal(viaFile.usage.prompt_tokens, r.usage.prompt_tokens);
});

test('bad videos and too many videos are 400s naming the part; the server keeps serving', async () => {
  const cases = [
    [[videoPart('data:video/mp4;base64,AAAAAAAAAAAA')], /messages\[0\]\.content\[0\]: video: not a video container/],
    [[TEXT, videoPart(`data:video/mp4;base64,${MP4.subarray(0, 4000).toString('base64')}`)],
     /messages\[0\]\.content\[1\]: video: /],
    [[videoPart(`file://${CLIP}`), videoPart(`file://${CLIP}`)], /at most 1 video\(s\) per prompt/],
    [[videoPart(path.join(DATA, 'README.md'))], /not inside an allowed directory/],
    [[{ type: 'video_url', video_url: {} }], /a video_url part needs/],
  ];
  await expectBadRequests(srv.base, chat, cases);
});
