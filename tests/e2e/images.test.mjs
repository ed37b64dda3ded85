// Images in chat requests through the official openai SDK (issue #7 item 4): data: URLs, http URLs served by a
// local node server, allow-listed local files, several images per message; usage.prompt_tokens counts the
// expanded placeholders, and the greedy continuation equals `deltaserve logits --image` (argmax of each row)
// on the same prompt — so an ignored, misplaced or mis-expanded image fails. Bad images get 400s naming the
// part while the server keeps serving.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import zlib from 'node:zlib';
import OpenAI from 'openai';
import { startServer, expectBadRequests, metrics, BINARY, DATA, MODEL, goldenJson } from './server.mjs';

const IMAGE_DIR = path.join(DATA, 'tiny-moe');
const IMAGE = path.join(IMAGE_DIR, 'image.png');
const PNG = fs.readFileSync(IMAGE);
const PAD = 1996;  // <|image_pad|>
const N = 4;       // generated tokens compared with the CLI

// A minimal PNG writer (8-bit RGB, one IDAT) for pictures of chosen sizes.
function crc32(buf) {
  let crc = 0xffffffff;
  for (const b of buf) {
    let c = (crc ^ b) & 0xff;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    crc = (crc >>> 8) ^ c;
  }
  return (crc ^ 0xffffffff) >>> 0;
}
function pngChunk(type, data) {
  const len = Buffer.alloc(4); len.writeUInt32BE(data.length);
  const td = Buffer.concat([Buffer.from(type, 'ascii'), data]);
  const crc = Buffer.alloc(4); crc.writeUInt32BE(crc32(td));
  return Buffer.concat([len, td, crc]);
}
function makePng(w, h) {
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(w, 0); ihdr.writeUInt32BE(h, 4); ihdr[8] = 8; ihdr[9] = 2;
  const raw = Buffer.alloc((w * 3 + 1) * h);
  for (let y = 0; y < h; y++)
    for (let x = 0; x < w; x++) {
      const o = y * (w * 3 + 1) + 1 + x * 3;
      raw[o] = (x * 7) & 255; raw[o + 1] = (y * 5) & 255; raw[o + 2] = ((x + y) * 3) & 255;
    }
  return Buffer.concat([Buffer.from([137, 80, 78, 71, 13, 10, 26, 10]), pngChunk('IHDR', ihdr),
                        pngChunk('IDAT', zlib.deflateSync(raw)), pngChunk('IEND', Buffer.alloc(0))]);
}
const dataUrl = (buf, type = 'image/png') => `data:${type};base64,${buf.toString('base64')}`;

const TMP = fs.mkdtempSync(path.join(os.tmpdir(), 'ds-images-'));
const SMALL = makePng(64, 48);
const SMALL_FILE = path.join(TMP, 'small.png');
fs.writeFileSync(SMALL_FILE, SMALL);

let srv, client, media, mediaBase;
before(async () => {
  media = http.createServer((req, res) => {
    if (req.url === '/image.png') { res.writeHead(200, { 'Content-Type': 'image/png' }); res.end(PNG); }
    else if (req.url === '/small.png') { res.writeHead(200, { 'Content-Type': 'image/png' }); res.end(SMALL); }
    else { res.writeHead(404); res.end('no such image'); }
  });
  await new Promise((r) => media.listen(0, '127.0.0.1', r));
  mediaBase = `http://127.0.0.1:${media.address().port}`;
  srv = await startServer(['--limit-mm-per-prompt', '{"image": 2}', '--max-image-pixels', '40000',
                           '--allowed-local-media-path', IMAGE_DIR, '--max-num-batched-tokens', '32']);
  client = new OpenAI({ baseURL: `${srv.base}/v1`, apiKey: 'unused', maxRetries: 0 });
});
after(async () => {
  media.close();
  fs.rmSync(TMP, { recursive: true, force: true });
  const r = await srv.stop();
  assert.equal(r.code, 0, `exit ${JSON.stringify(r)}\n${srv.log()}`);
});

const imagePart = (url) => ({ type: 'image_url', image_url: { url } });

async function chat(content, extra = {}) {
  return client.chat.completions.create({
    model: 'tiny', messages: [{ role: 'user', content }], max_tokens: N, temperature: 0, ignore_eos: true,
    return_token_ids: true, ...extra });
}

// Prompt tokens of the rendered template with one placeholder per image (what /tokenize returns).
async function templatedCount(content) {
  const r = await fetch(`${srv.base}/tokenize`, { method: 'POST',
    body: JSON.stringify({ messages: [{ role: 'user', content }], add_generation_prompt: true }) });
  const j = await r.json();
  assert.equal(r.status, 200, JSON.stringify(j));
  return j.count;
}

// Greedy continuation by the command line: `deltaserve logits --image FILE...` on the collapsed prompt plus
// the first N-1 generated tokens; the argmax of the last N rows. Returns {tokens, imageTokens[]}.
function cliGreedy(promptIds, generated, files) {
  const collapsed = promptIds.filter((t, i) => !(t === PAD && promptIds[i - 1] === PAD));
  const out = path.join(TMP, `logits-${process.pid}-${Date.now()}.safetensors`);
  const args = ['logits', MODEL, '--tokens', [...collapsed, ...generated.slice(0, N - 1)].join(','), '--out', out];
  for (const f of files) args.push('--image', f);
  const log = execFileSync(BINARY, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  const buf = fs.readFileSync(out);
  fs.rmSync(out);
  const hlen = Number(buf.readBigUInt64LE(0));
  const meta = JSON.parse(buf.subarray(8, 8 + hlen).toString()).logits;
  const [T, V] = meta.shape;
  const data = new Float32Array(buf.buffer.slice(buf.byteOffset + 8 + hlen + meta.data_offsets[0],
                                                 buf.byteOffset + 8 + hlen + meta.data_offsets[1]));
  const tokens = [];
  for (let r = T - N; r < T; r++) {
    let best = 0;
    for (let v = 1; v < V; v++) if (data[r * V + v] > data[r * V + best]) best = v;
    tokens.push(best);
  }
  void log;
  return tokens;
}

test('an image as a data: URL: expanded usage and the CLI\'s greedy tokens', async () => {
  const [, gh, gw] = goldenJson().image.grid_thw;  // the reference processor's grid for image.png
  const content = [{ type: 'text', text: 'What is in this picture?' }, imagePart(dataUrl(PNG))];
  const r = await chat(content);
  const c = r.choices[0];
  assert.equal(r.usage.prompt_tokens, (await templatedCount(content)) - 1 + (gh * gw) / 4);
  assert.equal(c.prompt_token_ids.length, r.usage.prompt_tokens);
  assert.equal(c.prompt_token_ids.filter((t) => t === PAD).length, (gh * gw) / 4);
  assert.equal(c.token_ids.length, N);
  assert.deepEqual(c.token_ids, cliGreedy(c.prompt_token_ids, c.token_ids, [IMAGE]));
  // Without the image the model says something else: the image is not ignored.
  const plain = await chat([{ type: 'text', text: 'What is in this picture?' }]);
  assert.notDeepEqual(plain.choices[0].token_ids, c.token_ids);
});

test('mm_processor_kwargs sets the image\'s pixel budget (vLLM\'s field); bad ones are 400s naming it', async () => {
  const [, gh, gw] = goldenJson().image.grid_thw;
  const content = [{ type: 'text', text: 'What is in this picture?' }, imagePart(dataUrl(PNG))];
  const pads = (r) => r.choices[0].prompt_token_ids.filter((t) => t === PAD).length;
  const small = await chat(content, { mm_processor_kwargs: { min_pixels: 3136, max_pixels: 30000 } });
  assert.ok(pads(small) > 0 && pads(small) < (gh * gw) / 4, `${pads(small)} image tokens against ${(gh * gw) / 4}`);
  assert.ok(pads(small) * 4 * 16 * 16 <= 30000, 'within the budget');
  const same = await chat(content, { mm_processor_kwargs: { images_kwargs: { size: { shortest_edge: 3136, longest_edge: 30000 } } } });
  assert.equal(pads(same), pads(small), 'size {shortest_edge, longest_edge} is the same budget');
  assert.equal(pads(await chat(content, { mm_processor_kwargs: {} })), (gh * gw) / 4, 'none: the model\'s own');
  for (const [kw, re] of [[{ max_pixels: 'x' }, /mm_processor_kwargs\.max_pixels must be a positive integer/],
                          [{ do_resize: false }, /mm_processor_kwargs: unknown key 'do_resize'/],
                          [{ min_pixels: 90000, max_pixels: 30000 }, /min_pixels \(90000\) exceed their max_pixels/]])
    await assert.rejects(chat(content, { mm_processor_kwargs: kw }), (e) => e.status === 400 && re.test(e.message));
});

test('prefix caching: the next turn of a chat about an image resumes past the image; another image does not', async () => {
  const [, gh, gw] = goldenJson().image.grid_thw;
  const content = [{ type: 'text', text: 'Describe this picture.' }, imagePart(dataUrl(PNG))];
  const first = await chat(content, { cache_salt: 'turns' });
  const history = [{ role: 'user', content }, { role: 'assistant', content: first.choices[0].message.content },
                   { role: 'user', content: 'And what colour is it?' }];
  const next = await client.chat.completions.create({ model: 'tiny', messages: history, max_tokens: N, temperature: 0,
                                                      ignore_eos: true, return_token_ids: true, cache_salt: 'turns' });
  const cached = next.usage.prompt_tokens_details?.cached_tokens ?? 0;
  const pads = next.choices[0].prompt_token_ids.lastIndexOf(PAD);
  assert.ok(cached > pads, `cached ${cached} tokens, the image's last placeholder at ${pads} (${(gh * gw) / 4} of them)`);
  const cold = await client.chat.completions.create({ model: 'tiny', messages: history, max_tokens: N, temperature: 0,
                                                      ignore_eos: true, return_token_ids: true, cache_salt: 'cold' });
  assert.equal(cold.usage.prompt_tokens_details?.cached_tokens ?? 0, 0);
  assert.deepEqual(next.choices[0].token_ids, cold.choices[0].token_ids, 'resumed = computed from scratch');
  // The same conversation about another picture shares only the text before the image.
  const other = structuredClone(history);
  other[0].content[1] = imagePart(dataUrl(makePng(150, 240)));
  const o = await client.chat.completions.create({ model: 'tiny', messages: other, max_tokens: 2, cache_salt: 'turns',
                                                   return_token_ids: true });
  const firstPad = o.choices[0].prompt_token_ids.indexOf(PAD);
  assert.ok((o.usage.prompt_tokens_details?.cached_tokens ?? 0) <= firstPad, 'not past the first placeholder');
});

test('the same image from an http URL and from an allow-listed local file gives the same answer', async () => {
  const content = (url) => [{ type: 'text', text: 'Describe:' }, imagePart(url)];
  const viaData = await chat(content(dataUrl(PNG)));
  const viaHttp = await chat(content(`${mediaBase}/image.png`));
  const viaFile = await chat(content(`file://${IMAGE}`));
  assert.deepEqual(viaHttp.choices[0].token_ids, viaData.choices[0].token_ids);
  assert.deepEqual(viaFile.choices[0].token_ids, viaData.choices[0].token_ids);
  assert.equal(viaHttp.usage.prompt_tokens, viaData.usage.prompt_tokens);
});

test('two images in one message, in order, and streamed', async () => {
  const content = [imagePart(`${mediaBase}/small.png`), { type: 'text', text: 'and' }, imagePart(dataUrl(PNG))];
  const r = await chat(content);
  const c = r.choices[0];
  const runs = [];
  c.prompt_token_ids.forEach((t, i) => {
    if (t === PAD) { if (c.prompt_token_ids[i - 1] === PAD) runs[runs.length - 1]++; else runs.push(1); }
  });
  const [, gh, gw] = goldenJson().image.grid_thw;
  assert.equal(runs.length, 2);
  assert.equal(runs[1], (gh * gw) / 4);
  assert.notEqual(runs[0], runs[1]);
  assert.equal(r.usage.prompt_tokens, (await templatedCount(content)) - 2 + runs[0] + runs[1]);
  assert.deepEqual(c.token_ids, cliGreedy(c.prompt_token_ids, c.token_ids, [SMALL_FILE, IMAGE]));
  // Swapping the images changes the layout and the answer.
  const swapped = await chat([imagePart(dataUrl(PNG)), { type: 'text', text: 'and' }, imagePart(`${mediaBase}/small.png`)]);
  assert.notDeepEqual(swapped.choices[0].prompt_token_ids, c.prompt_token_ids);

  const stream = await client.chat.completions.create({
    model: 'tiny', messages: [{ role: 'user', content }], max_tokens: N, temperature: 0, ignore_eos: true,
    stream: true, stream_options: { include_usage: true } });
  let text = '', usage = null;
  for await (const ch of stream) {
    if (ch.usage) usage = ch.usage;
    for (const x of ch.choices) text += (x.delta.content ?? '') + (x.delta.reasoning_content ?? '');
  }
  assert.equal(usage.prompt_tokens, r.usage.prompt_tokens);
  assert.equal(text, (c.message.content ?? '') + (c.message.reasoning_content ?? ''));
});

test('several requests with images at once each get their own answer', async () => {
  const one = await chat([imagePart(dataUrl(PNG)), { type: 'text', text: 'A' }]);
  const two = await chat([imagePart(dataUrl(SMALL)), { type: 'text', text: 'A' }]);
  const all = await Promise.all([0, 1, 2, 3].map((i) =>
    chat([imagePart(dataUrl(i % 2 ? SMALL : PNG)), { type: 'text', text: 'A' }])));
  all.forEach((r, i) => assert.deepEqual(r.choices[0].token_ids, (i % 2 ? two : one).choices[0].token_ids, `request ${i}`));
});

test('bad images get a 400 naming the part and the problem; the server keeps serving', async () => {
  const truncated = PNG.subarray(0, Math.floor(PNG.length / 2));
  const corrupt = Buffer.from(PNG); for (let i = 60; i < 160; i++) corrupt[i] ^= 0x5a;
  const cases = [
    [[imagePart(dataUrl(corrupt))], /messages\[0\]\.content\[0\]: image: .*(corrupt|CRC|decod)/i],
    [[imagePart(dataUrl(truncated))], /messages\[0\]\.content\[0\]: image: .*(truncated|corrupt)/i],
    [[imagePart('data:image/png;base64,')], /empty data \(0 bytes\), expected a PNG, JPEG or WebP/],
    [[imagePart(dataUrl(makePng(0, 4)))], /messages\[0\]\.content\[0\]: image: PNG has size 0x4, expected a positive width/],
    [[imagePart(dataUrl(Buffer.from('GIF89a\x01\x00\x01\x00\x00\x00\x00;', 'binary'), 'image/gif'))],
     /unsupported format \(GIF\): expected PNG, JPEG or WebP/],
    [[imagePart(dataUrl(Buffer.from('not base64', 'utf8')).replace(/base64,.*/, 'base64,***'))], /base64: expected A-Z/],
    [[imagePart(dataUrl(PNG)), imagePart(dataUrl(PNG)), imagePart(dataUrl(PNG))],
     /at most 2 images per prompt are allowed \(--limit-mm-per-prompt\), got 3/],
    [[imagePart(dataUrl(makePng(250, 200)))], /messages\[0\]\.content\[0\]: image: .*(40000|pixels)/],
    [[imagePart(path.join(DATA, 'README.md'))], /not inside an allowed directory/],
    [[imagePart(`file://${path.join(DATA, 'tiny-dense', '..', 'README.md')}`)], /not inside an allowed directory/],
    [[imagePart(`${mediaBase}/missing.png`)], /returned HTTP 404 \(expected 200\)/],
    [[{ type: 'video_url', video_url: { url: 'data:video/mp4;base64,AAAA' } }],
     /messages\[0\]\.content\[0\]: video: not a video container FFmpeg can read/],
    [[{ type: 'video_url', video_url: { url: 'data:image/png;base64,AAAA' } }], /video: data URL media type 'image\/png'/],
    [[{ type: 'image_url', image_url: {} }], /an image_url part needs/],
    [[{ type: 'text', text: 'look: <|image_pad|>' }, imagePart(dataUrl(PNG))], /2 image placeholder tokens/],
  ];
  await expectBadRequests(srv.base, chat, cases);
  const ok = await chat([imagePart(dataUrl(PNG))]);
  assert.equal(ok.choices[0].token_ids.length, N);
});

test('with speculative decoding on, an image request gets the plain server\'s tokens and drafts are verified', async () => {
  const spec = await startServer(['--speculative-config', '{"method": "mtp", "num_speculative_tokens": 2}']);
  try {
    const c = new OpenAI({ baseURL: `${spec.base}/v1`, apiKey: 'unused', maxRetries: 0 });
    const content = [{ type: 'text', text: 'What is in this picture?' }, imagePart(dataUrl(PNG))];
    const before = await metrics(spec.base);
    const r = await c.chat.completions.create({ model: 'tiny', messages: [{ role: 'user', content }], max_tokens: N,
                                                temperature: 0, ignore_eos: true, return_token_ids: true });
    const after = await metrics(spec.base);
    const plain = await chat(content);
    assert.deepEqual(r.choices[0].token_ids, plain.choices[0].token_ids, 'speculation keeps the greedy tokens');
    assert.equal(r.usage.prompt_tokens, plain.usage.prompt_tokens);
    assert.ok(after.get('spec_decode_num_draft_tokens_total') > before.get('spec_decode_num_draft_tokens_total'),
              'drafts were proposed and verified for the image request');
  } finally {
    await spec.stop();
  }
});
