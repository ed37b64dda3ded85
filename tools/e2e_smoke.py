#!/usr/bin/env python3
"""Server end-to-end smoke test for machines without Node.js (the GPU host): standard library only.
Starts `deltaserve serve` with the given backend, then checks: /health, /v1/models, greedy completions equal
for concurrent streaming and solo runs (batching invariance), SSE framing and usage, a chat with a named tool
call, a constrained named tool call, an image request, structured outputs, logprobs, prefix caching, /v1/responses (a
stored conversation continued, a background run) and /v1/messages, malformed input, metrics back to zero, graceful
SIGTERM (exit 0); then a second server with MTP speculative decoding, whose greedy text and image answers must equal
the first one's.

  tools/e2e_smoke.py BINARY MODEL_DIR [--backend cuda]
"""
import json, math, os, socket, subprocess, sys, threading, time, urllib.request, urllib.error

binary, model = sys.argv[1], sys.argv[2]
backend = sys.argv[sys.argv.index("--backend") + 1] if "--backend" in sys.argv else "cpu"
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
base = f"http://127.0.0.1:{port}"
def start(extra=()):
    return subprocess.Popen([binary, "serve", model, "--port", str(port), "--backend", backend, "--max-model-len",
                             "1024", "--max-num-seqs", "8", "--served-model-name", "tiny", *extra],
                            stderr=subprocess.PIPE, text=True)
proc = start()
failures = []

def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        failures.append(what)

def post(path, body, stream=False):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode() if not isinstance(body, bytes) else body,
                                 headers={"Content-Type": "application/json"})
    try:
        r = urllib.request.urlopen(req, timeout=120)
        return r.status, (r.read().decode() if not stream else r)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()

def wait_healthy():
    for _ in range(600):
        try:
            if urllib.request.urlopen(base + "/health", timeout=1).status == 200:
                return
        except Exception:
            time.sleep(0.1)
wait_healthy()
check(json.load(urllib.request.urlopen(base + "/v1/models"))["data"][0]["id"] == "tiny", "/v1/models")

prompts = [[1255, 1369, 548, 434, 1735], [1578, 716, 913], [174, 1788, 1858, 1260, 1559, 743, 1924], [12, 13]]
def complete(p, n):
    st, body = post("/v1/completions", {"prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True,
                                        "return_token_ids": True})
    return json.loads(body)["choices"][0]["token_ids"]
solo = {i: complete(prompts[i % 4], 10 + i) for i in range(12)}

results = {}
def stream(i):
    st, r = post("/v1/completions", {"prompt": prompts[i % 4], "max_tokens": 10 + i, "temperature": 0, "ignore_eos": True,
                                     "return_token_ids": True, "stream": True,
                                     "stream_options": {"include_usage": True}}, stream=True)
    ids, usage, done = [], None, False
    for line in r:
        line = line.decode().strip()
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            continue
        c = json.loads(line[6:])
        usage = c.get("usage") or usage
        for ch in c["choices"]:
            ids += ch.get("token_ids", [])
    results[i] = (ids, usage, done)
threads = [threading.Thread(target=stream, args=(i,)) for i in range(12)]
[t.start() for t in threads]; [t.join() for t in threads]
check(all(results[i][0] == solo[i] for i in range(12)), "12 concurrent streams equal their solo runs")
check(all(results[i][2] and results[i][1]["completion_tokens"] == 10 + i for i in range(12)), "SSE [DONE] and usage")

tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
        "properties": {"city": {"type": "string"}}}}}
st, body = post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Weather?"}], "tools": [tool],
                                          "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                                          "max_tokens": 16})
calls = json.loads(body)["choices"][0]["message"].get("tool_calls") or []
check(st == 200 and calls and calls[0]["function"]["name"] == "get_weather", "named tool call")
# Constrained tool call (docs/server.md "Constrained tool calls"): named, an enum + integer + boolean tool; the
# random model's call finishes and its arguments have the schema's types.
timer = {"type": "function", "function": {"name": "set_timer", "parameters": {"type": "object", "properties": {
         "unit": {"type": "string", "enum": ["seconds", "minutes"]}, "amount": {"type": "integer"},
         "loud": {"type": "boolean"}}, "required": ["unit", "amount", "loud"]}}}
st, body = post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Timer?"}], "tools": [timer, tool],
                                          "tool_choice": {"type": "function", "function": {"name": "set_timer"}},
                                          "max_tokens": 400, "temperature": 0})
ok = st == 200
if ok:
    ch = json.loads(body)["choices"][0]
    calls = ch["message"].get("tool_calls") or []
    args = json.loads(calls[0]["function"]["arguments"]) if calls else {}
    ok = (ch["finish_reason"] == "tool_calls" and len(calls) == 1 and calls[0]["function"]["name"] == "set_timer" and
          args.get("unit") in ("seconds", "minutes") and type(args.get("amount")) is int and
          type(args.get("loud")) is bool)
check(ok, "constrained named tool call (finish_reason tool_calls, arguments of the schema's types)" +
      ("" if ok else f": {st} {body[:300]}"))
# An image (data: URL of the fixtures' picture): served on every backend, the same greedy output twice.
png = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "tiny-moe", "image.png")
if os.path.exists(png):
    import base64
    url = "data:image/png;base64," + base64.b64encode(open(png, "rb").read()).decode()
    def image_chat():
        return post("/v1/chat/completions", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]}],
            "max_tokens": 8, "temperature": 0, "ignore_eos": True, "return_token_ids": True})
    st1, b1 = image_chat()
    st2, b2 = image_chat()
    ok = st1 == 200 and st2 == 200
    if ok:
        j1, j2 = json.loads(b1), json.loads(b2)
        ok = (j1["usage"]["prompt_tokens"] > 77 and j1["usage"]["completion_tokens"] == 8 and
              j1["choices"][0]["message"]["content"] == j2["choices"][0]["message"]["content"])
    check(ok, "image request (200, 77 image tokens in the prompt, same output twice)" + ("" if ok else f": {st1} {b1[:300]}"))
    image_ids = json.loads(b1)["choices"][0]["token_ids"] if ok else None
    # Prefix caching keys the placeholders by the image: the next turn resumes past the picture, with the tokens
    # of a cold run (another cache_salt).
    turn = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": json.loads(b1)["choices"][0]["message"]["content"] if ok else ""},
            {"role": "user", "content": "And then?"}]
    def next_turn(salt):
        st, b = post("/v1/chat/completions", {"messages": turn, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                                              "return_token_ids": True, "cache_salt": salt})
        return json.loads(b) if st == 200 else {}
    warm, cold = next_turn(None), next_turn("cold")
    pads = max((i for i, t in enumerate(warm.get("choices", [{}])[0].get("prompt_token_ids", [])) if t == 1996),
               default=-1)
    cached = (warm.get("usage", {}).get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    check(pads > 0 and cached > pads and warm["choices"][0]["token_ids"] == cold["choices"][0]["token_ids"],
          f"image prefix caching: the next turn resumes past the picture ({cached} cached, last placeholder {pads}) "
          "with a cold run's tokens")
# Structured output (docs/server.md): constrained requests (host-sampled) beside greedy unconstrained streams
# (device-sampled where the step allows): every constrained answer is JSON of its schema, the others equal solo runs.
schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "n": {"type": "integer"},
          "ok": {"type": "boolean"}, "c": {"enum": ["red", "blue"]}}, "required": ["name", "n", "ok", "c"],
          "additionalProperties": False}
def constrained(i):
    st, body = post("/v1/chat/completions", {"messages": [{"role": "user", "content": f"Person {i}"}],
                                             "max_tokens": 300, "temperature": 1, "seed": i,
                                             "chat_template_kwargs": {"enable_thinking": i % 2 == 0},
                                             "logit_bias": {"2009": 2},
                                             "response_format": {"type": "json_schema",
                                                                 "json_schema": {"name": "p", "schema": schema}}})
    results[100 + i] = (st, body)
results.clear()
threads = [threading.Thread(target=constrained, args=(i,)) for i in range(6)] + \
          [threading.Thread(target=stream, args=(i,)) for i in range(6)]
[t.start() for t in threads]; [t.join() for t in threads]
ok, bad = True, ""
for i in range(6):
    st, body = results[100 + i]
    try:
        c = json.loads(body)["choices"][0]
        v = json.loads(c["message"]["content"])
        good = (st == 200 and c["finish_reason"] == "stop" and set(v) == {"name", "n", "ok", "c"} and
                isinstance(v["n"], int) and isinstance(v["ok"], bool) and v["c"] in ("red", "blue") and len(v["name"]) <= 8)
    except Exception as e:  # not JSON, or no choice
        good = False
    if not good:
        ok, bad = False, f": {st} {body[:300]}"
        break
check(ok, "6 structured-output answers are JSON of their schema" + bad)
check(all(results[i][0] == solo[i] for i in range(6)), "6 unconstrained streams beside them equal their solo runs")
st, body = post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 4,
                                          "response_format": {"type": "json_schema", "json_schema": {
                                              "name": "p", "schema": {"type": "string", "pattern": "a(?=b)"}}}})
check(st == 400 and "lookahead" in body, "an unsupported pattern construct is a 400 naming it")
# A regular expression (Python's re.fullmatch checks it), a schema pattern and a GBNF grammar, host-sampled on the
# device's logits.
import re
pat = r"\d{3}-[a-z]{2,5}( [A-Z]{1,4})?"
gbnf = 'root ::= expr\nexpr ::= term (("+" | "*") term){0,3}\nterm ::= [1-9] [0-9]? | "(" expr ")"'
ok, bad = True, ""
for i, extra in enumerate([{"structured_outputs": {"regex": pat}}, {"guided_regex": pat},
                           {"structured_outputs": {"grammar": gbnf}}, {"grammar": gbnf}]):
    st, body = post("/v1/completions", {"prompt": "Code:", "max_tokens": 40, "temperature": 1, "seed": i, **extra})
    c = json.loads(body)["choices"][0] if st == 200 else {}
    text = c.get("text", "")
    good = st == 200 and c["finish_reason"] == "stop" and (
        re.fullmatch(pat, text) if "regex" in str(extra) else re.fullmatch(r"[0-9+*()]+", text) and
        text.count("(") == text.count(")"))
    if not good:
        ok, bad = False, f": {extra} -> {st} {body[:300]}"
        break
check(ok, "regex and GBNF constrained completions match their language" + bad)
# min_tokens (a -inf bias in the device sampler's edits) and thinking_token_budget (the forced </think>, host-sampled).
st, body = post("/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 20, "temperature": 0, "min_tokens": 5,
                                    "logit_bias": {"1986": 100}, "return_token_ids": True})
j = json.loads(body) if st == 200 else {}
check(st == 200 and j["choices"][0]["finish_reason"] == "stop" and j["usage"]["completion_tokens"] == 6,
      "min_tokens holds the EOS back five tokens" + ("" if st == 200 else f": {st} {body[:200]}"))
st, body = post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Think"}], "max_tokens": 12,
                                          "temperature": 1, "seed": 2, "logit_bias": {"2009": -100}, "ignore_eos": True,
                                          "thinking_token_budget": 6, "return_token_ids": True})
ids = json.loads(body)["choices"][0].get("token_ids", []) if st == 200 else []
check(st == 200 and 2009 in ids and ids.index(2009) == 6, f"thinking_token_budget 6 forces </think> at token 6: {ids}")
# allowed_token_ids (a host mask) and bad_words (-inf edits on the device sampler).
st, body = post("/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 12, "temperature": 1, "seed": 4,
                                    "ignore_eos": True, "allowed_token_ids": [300, 301, 302, 777], "return_token_ids": True})
ids = json.loads(body)["choices"][0].get("token_ids", []) if st == 200 else []
check(st == 200 and len(ids) == 12 and set(ids) <= {300, 301, 302, 777}, f"allowed_token_ids: {ids}")
ref = complete(prompts[0], 1)[0]
word = json.loads(post("/detokenize", {"tokens": [ref]})[1])["prompt"]
st, body = post("/v1/completions", {"prompt": prompts[0], "max_tokens": 1, "temperature": 0, "ignore_eos": True,
                                    "bad_words": [word], "return_token_ids": True})
one = len(json.loads(post("/tokenize", {"prompt": word.strip()})[1])["tokens"]) == 1
got = json.loads(body)["choices"][0]["token_ids"] if st == 200 else []
check(st == 200 and (not one or got != [ref]), f"bad_words {word!r} keeps greedy token {ref} out: {got}")
# Prefix caching (on by default): a long prompt again and continued resumes from checkpoints with the tokens of a
# cold run (a fresh cache_salt shares nothing); concurrent continuations too.
def cached_run(p, n, salt=None):
    body = {"prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    if salt:
        body["cache_salt"] = salt
    st, b = post("/v1/completions", body)
    j = json.loads(b)
    return j["choices"][0]["token_ids"], j["usage"]["prompt_tokens_details"]["cached_tokens"]
long_p = [(i * 37) % 1900 + 20 for i in range(300)]
t1, c1 = cached_run(long_p, 12)
t2, c2 = cached_run(long_p, 12)
check(c1 == 0 and c2 == 288 and t2 == t1, f"prefix cache: the same prompt resumes at 288 (cached {c1}, {c2})")
conts = [long_p + t1 + [5 + i, 6, 7 + i] * (i + 1) for i in range(6)]
cold = [cached_run(p, 10, salt=f"cold-{i}") for i, p in enumerate(conts)]
warm = [None] * 6
def run_warm(i):
    warm[i] = cached_run(conts[i], 10)
ths = [threading.Thread(target=run_warm, args=(i,)) for i in range(6)]
for t in ths: t.start()
for t in ths: t.join()
check(all(c[1] == 0 for c in cold) and all(w[1] >= 288 for w in warm) and all(w[0] == c[0] for w, c in zip(warm, cold)),
      "prefix cache: 6 concurrent continuations resume (cached " + str([w[1] for w in warm]) + ") with the cold runs' tokens")
# Logprobs (Backend::row_logprobs on the device): a greedy token is its row's most likely, the alternatives come in
# order, and they are probabilities (their sum at most 1). (Two ids that decode to the same text share a key.)
st, body = post("/v1/completions", {"prompt": prompts[0], "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                                    "logprobs": 5})
lp = json.loads(body)["choices"][0]["logprobs"] if st == 200 else None
ok = st == 200 and len(lp["tokens"]) == 8
for i in range(len(lp["tokens"]) if ok else 0):
    top = list(lp["top_logprobs"][i].values())
    ok = ok and 1 <= len(top) <= 5 and all(top[q] >= top[q + 1] for q in range(len(top) - 1))
    ok = ok and abs(top[0] - lp["token_logprobs"][i]) < 1e-6 and sum(math.exp(v) for v in top) <= 1 + 1e-5
check(ok, "logprobs 5: greedy tokens are their rows' most likely, alternatives ordered, probabilities")
# Echo with logprobs and max_tokens 0 (lm-evaluation-harness' loglikelihood call; the prompt's logprobs through the
# lm_head over every prompt row and Backend::row_logprobs / row_ranks): the greedy continuation above, echoed after its
# prompt, gets the logprobs its generation reported (prefill against decode: within bf16 rounding) and ranks first.
st2, body2 = post("/v1/completions", {"prompt": prompts[0], "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                                      "return_token_ids": True})
gen_ids = json.loads(body2)["choices"][0]["token_ids"] if st2 == 200 else []
st3, body3 = post("/v1/completions", {"prompt": prompts[0] + gen_ids, "max_tokens": 0, "echo": True, "logprobs": 1})
c = json.loads(body3)["choices"][0] if st3 == 200 else {}
ok = st3 == 200 and len(gen_ids) == 8 and len(c["logprobs"]["tokens"]) == len(prompts[0]) + 8
P = len(prompts[0])
for i in range(8 if ok else 0):
    ok = ok and abs(c["logprobs"]["token_logprobs"][P + i] - lp["token_logprobs"][i]) < 0.05
    ok = ok and c["prompt_logprobs"][P + i][str(gen_ids[i])]["rank"] == 1
check(ok, "echo + logprobs + max_tokens 0: the greedy continuation's logprobs and rank 1 "
          f"({[round(c['logprobs']['token_logprobs'][P + i] - lp['token_logprobs'][i], 4) for i in range(8)] if ok else st3})")

# A structural tag (vLLM's structural_tag): exactly one tag of the schema after a fixed prefix, sampled.
tag_fmt = {"type": "structural_tag", "format": {"type": "sequence", "elements": [
    {"type": "const_string", "value": "Calling: "},
    {"type": "triggered_tags", "triggers": ["<call="], "at_least_one": True, "stop_after_first": True, "tags": [
        {"type": "tag", "begin": "<call=get_weather>", "end": "</call>", "content": {"type": "json_schema",
         "json_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                         "required": ["city"]}}}]}]}}
st, body = post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Call"}], "max_tokens": 100,
                                         "temperature": 1, "seed": 3, "response_format": tag_fmt,
                                         "chat_template_kwargs": {"enable_thinking": False}})
text = json.loads(body)["choices"][0]["message"]["content"] if st == 200 else ""
ok = text.startswith("Calling: <call=get_weather>") and text.endswith("</call>")
if ok:
    try:
        args = json.loads(text[len("Calling: <call=get_weather>"):-len("</call>")])
        ok = list(args) == ["city"] and isinstance(args["city"], str) and len(args["city"]) <= 8
    except ValueError:
        ok = False
check(ok, f"structural tag: one tag of the schema after the prefix ({st}: {text[:120]!r})")

# The Responses and Anthropic Messages routes run on the same chat pipeline.
st, body = post("/v1/responses", {"input": "Hello", "max_output_tokens": 8, "temperature": 0,
                                  "reasoning": {"effort": "none"}})
j = json.loads(body) if st == 200 else {}
check(st == 200 and j.get("object") == "response" and j.get("usage", {}).get("output_tokens", 0) > 0,
      f"/v1/responses ({st}, status {j.get('status')})")
# Stored responses: previous_response_id gives the prompt of the whole conversation sent again; a background run
# polled to the same answer as a foreground one.
r1 = j
st, body = post("/v1/responses", {"previous_response_id": r1.get("id"), "input": "And then?", "max_output_tokens": 8,
                                  "temperature": 0, "reasoning": {"effort": "none"}})
r2 = json.loads(body) if st == 200 else {}
st, body = post("/v1/responses", {"input": [{"role": "user", "content": "Hello"}] + r1.get("output", []) +
                                  [{"role": "user", "content": "And then?"}], "max_output_tokens": 8, "temperature": 0,
                                  "reasoning": {"effort": "none"}, "store": False})
full = json.loads(body) if st == 200 else {}
check(r2.get("usage", {}).get("input_tokens") == full.get("usage", {}).get("input_tokens") and
      r2.get("output") and [i.get("content") for i in r2["output"]] == [i.get("content") for i in full.get("output", [])],
      f"previous_response_id = the whole conversation ({r2.get('usage')}, {full.get('usage')})")
st, body = post("/v1/responses", {"input": "Tell me a story", "max_output_tokens": 32, "temperature": 0,
                                  "ignore_eos": True, "reasoning": {"effort": "none"}, "background": True})
bg = json.loads(body) if st == 200 else {}
for _ in range(600):
    g = json.load(urllib.request.urlopen(f"{base}/v1/responses/{bg.get('id')}"))
    if g["status"] not in ("queued", "in_progress"):
        break
    time.sleep(0.05)
st, body = post("/v1/responses", {"input": "Tell me a story", "max_output_tokens": 32, "temperature": 0,
                                  "ignore_eos": True, "reasoning": {"effort": "none"}, "store": False})
fg = json.loads(body) if st == 200 else {}
check(bg.get("status") == "queued" and g.get("status") == "incomplete" and
      [i.get("content") for i in g.get("output", [])] == [i.get("content") for i in fg.get("output", [])],
      f"background response polled to the foreground answer ({bg.get('status')} -> {g.get('status')})")

st, body = post("/v1/messages", {"model": "tiny", "max_tokens": 8, "messages": [{"role": "user", "content": "Hello"}],
                                 "thinking": {"type": "disabled"}})
j = json.loads(body) if st == 200 else {}
check(st == 200 and j.get("type") == "message" and j.get("usage", {}).get("output_tokens", 0) > 0,
      f"/v1/messages ({st}, stop_reason {j.get('stop_reason')})")
st, body = post("/v1/chat/completions", b'{"messages": [')
check(st == 400 and "not valid JSON" in json.loads(body)["error"]["message"], "malformed JSON is a 400")
st, body = post("/v1/completions", {"prompt": [1, 2], "max_tokens": 5000})
check(st == 400, "too long is a 400")

time.sleep(0.5)
m = urllib.request.urlopen(base + "/metrics").read().decode()
busy = [l for l in m.splitlines() if l.startswith(("deltaserve:num_requests_running", "deltaserve:kv_blocks_used",
                                                     "deltaserve:state_slots_used")) and not l.endswith(" 0")]
check(not busy, "metrics back to zero " + str(busy))
def stop(what):
    proc.terminate()
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    check(proc.returncode == 0, f"{what}SIGTERM exit code {proc.returncode}" +
          ("" if proc.returncode == 0 else "; the server's last lines:\n" + "\n".join(err.splitlines()[-15:])))
stop("")

# Speculative decoding (the checkpoint's MTP head, 2 drafts a step): the greedy answers of text and image requests
# are the plain server's, and drafts were verified.
proc = start(["--speculative-config", '{"method": "mtp", "num_speculative_tokens": 2}'])
wait_healthy()
same = all(complete(prompts[i % 4], 10 + i) == solo[i] for i in range(4))
check(same, "speculative decoding: greedy completions equal the plain server's")
if os.path.exists(png):
    st, b = image_chat()
    got = json.loads(b)["choices"][0]["token_ids"] if st == 200 else None
    check(got is not None and got == image_ids, f"speculative decoding: the image answer equals the plain server's "
          f"({got} / {image_ids})")
m = urllib.request.urlopen(base + "/metrics").read().decode()
drafts = [float(l.split()[-1]) for l in m.splitlines() if l.startswith("deltaserve:spec_decode_num_draft_tokens_total")]
check(drafts and drafts[0] > 0, f"speculative decoding: drafts verified ({drafts})")
stop("speculating server: ")
print(f"{12 - len(failures)} passed, {len(failures)} failed" if False else f"e2e_smoke ({backend}): {len(failures)} failed")
sys.exit(1 if failures else 0)
