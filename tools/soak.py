#!/usr/bin/env python3
"""Soak test (docs/server.md "Soak test and sanitizers"): a real `deltaserve serve` under a sustained mix of every
kind of request it takes, from several client threads at once for a given time. Standard library only, so it runs
on the GPU host (no Node.js there) as well as here.

The mix: chat (streamed and not, thinking on and off), streams abandoned after a few chunks, clients that give up
before the answer (mid-prefill or mid-decode), completions with n = 2, logprobs and echo, json_schema structured
outputs, required tool calls, images, Responses conversations continued with previous_response_id (and deleted),
background responses polled or cancelled, Anthropic messages (streamed and not), /tokenize, and bad requests.

It samples /metrics every 5 s — among them the server's resident memory, malloc's bytes in use (growing with a leak;
resident memory growing while they do not is the allocator's fragmentation) and its open descriptors — and with
--backend cuda its device memory (nvidia-smi); at the end it checks:
  - no request got a 5xx or a malformed answer, and every 4xx was one the client meant to provoke;
  - the server counted every answer (request_success_total grew by at least the answers received);
  - once the load stops no request is running or waiting, no KV block is held outside the prefix cache's
    checkpoints and no DeltaNet state slot is in use;
  - resident memory levels off: its least-squares growth over the second half of the run is under --max-growth-mb
    (default 16; 0 = not checked, for sanitizer builds whose allocators hold freed memory in quarantine);
  - with --backend cuda, the device memory the process holds did not grow over the second half;
  - no file descriptor is left open (process_open_fds back to its level before the load);
  - SIGTERM ends the server with exit status 0 and no sanitizer report in its log.
It prints a JSON summary (with --out FILE also the samples, and the server's log beside it) and exits 1 when a check
fails.

  tools/soak.py BINARY MODEL_DIR [--backend cpu|cuda] [--minutes 5] [--workers 6] [--seed 1] [--out soak.json]
                [--max-growth-mb 16] [-- extra server flags]
"""
import argparse, base64, json, os, random, re, socket, subprocess, sys, threading, time, urllib.error, urllib.request

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("binary")
ap.add_argument("model")
ap.add_argument("--backend", default="cpu")
ap.add_argument("--minutes", type=float, default=5)
ap.add_argument("--workers", type=int, default=6)
ap.add_argument("--seed", type=int, default=1)
ap.add_argument("--out")
ap.add_argument("--max-growth-mb", type=float, default=16)
argv = sys.argv[1:]
extra = []
if "--" in argv:
    extra = argv[argv.index("--") + 1:]
    argv = argv[:argv.index("--")]
opts = ap.parse_args(argv)

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.environ.get("DS_TEST_DATA_DIR", os.path.join(HERE, "..", "tests", "data"))
IMAGE_URL = "data:image/png;base64," + base64.b64encode(
    open(os.path.join(DATA, "tiny-moe", "image.png"), "rb").read()).decode()
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches in Paris and 42 "
         "robots compute prime numbers under the old bridge near the river").split()
_r = random.Random(opts.seed)
PROMPTS = [" ".join(_r.choice(WORDS) for _ in range(3 + int(_r.random() ** 3 * 600))) for _ in range(64)]
SET_TIMER = {"type": "function", "function": {"name": "set_timer", "description": "Starts a timer", "parameters": {
    "type": "object", "properties": {"minutes": {"type": "integer"}, "label": {"type": "string"}},
    "required": ["minutes"]}}}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}

s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
BASE = f"http://127.0.0.1:{port}"
server_args = ["--max-model-len", "4096", "--max-num-seqs", "8", "--responses-store", "2", "--cache-ram", "64"] + extra
log_path = (re.sub(r"\.json$", "", opts.out) + ".server.log") if opts.out else f"/tmp/soak-{port}.server.log"
log_file = open(log_path, "w")
proc = subprocess.Popen([opts.binary, "serve", opts.model, "--host", "127.0.0.1", "--port", str(port), "--backend",
                         opts.backend, "--served-model-name", "tiny"] + server_args,
                        stdout=log_file, stderr=subprocess.STDOUT)


class Unexpected(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Unexpected(what)


def request(method, path, body=None, timeout=300):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(BASE + path, data=data, method=method, headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=timeout)


def call(method, path, body=None, timeout=300):
    """(status, parsed JSON or text) for a whole answer; HTTP errors are answers too."""
    try:
        with request(method, path, body, timeout) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def ok200(status, body, what):
    check(status == 200, f"{what}: HTTP {status} {str(body)[:300]}")
    return body


def sse(path, body, stop_after=None):
    """The data events of a stream, or the first stop_after of them before the client hangs up."""
    events = []
    with request("POST", path, body) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            events.append(json.loads(line[6:]))
            if stop_after is not None and len(events) >= stop_after:
                break  # leaving the with block closes the connection mid-stream
    return events


def k_chat(rnd, prompt):
    b = ok200(*call("POST", "/v1/chat/completions", {
        "model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": 1 + rnd.randrange(48),
        "temperature": rnd.choice([0, 0.8]), "seed": rnd.randrange(1000),
        "chat_template_kwargs": {"enable_thinking": rnd.random() < 0.5}}), "chat")
    check(len(b["choices"]) == 1 and b["choices"][0]["finish_reason"] in ("stop", "length"), f"chat {b['choices']}")
    check(b["usage"]["completion_tokens"] >= 1, "chat usage")
    return "ok"


def k_chat_stream(rnd, prompt):
    ev = sse("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": prompt}],
                                      "max_tokens": 1 + rnd.randrange(64), "temperature": 0.7, "stream": True,
                                      "stream_options": {"include_usage": True}})
    finish = [c["finish_reason"] for e in ev for c in e["choices"] if c.get("finish_reason")]
    usage = [e["usage"] for e in ev if e.get("usage")]
    check(len(finish) == 1 and usage and usage[-1]["completion_tokens"] >= 1, f"stream finish {finish} usage {usage}")
    return "ok"


def k_abandoned_stream(rnd, prompt):
    sse("/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 200, "ignore_eos": True, "stream": True},
        stop_after=1 + rnd.randrange(8))
    return "aborted"


def k_impatient(rnd, prompt):
    # Gives up before the answer: the server must cancel it and lose nothing else.
    try:
        with request("POST", "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 100,
                                                 "ignore_eos": True}, timeout=0.001 + rnd.random() * 0.03) as r:
            body = json.loads(r.read())
        check(body["choices"][0]["finish_reason"] == "length", "impatient finish")
        return "ok"
    except (TimeoutError, socket.timeout):
        return "aborted"
    except urllib.error.URLError as e:
        if isinstance(e.reason, (TimeoutError, socket.timeout)):
            return "aborted"
        raise


def k_completions_n(rnd, prompt):
    b = ok200(*call("POST", "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 4 + rnd.randrange(12),
                                                "n": 2, "logprobs": 3, "temperature": 1, "seed": rnd.randrange(10**6),
                                                "echo": rnd.random() < 0.3}), "completions n=2")
    check(len(b["choices"]) == 2 and all(c["logprobs"]["tokens"] for c in b["choices"]), "n = 2 with logprobs")
    return "ok"


def k_json_schema(rnd, prompt):
    b = ok200(*call("POST", "/v1/chat/completions", {
        "model": "tiny", "messages": [{"role": "user", "content": "Describe a person. " + prompt[:40]}],
        "max_tokens": 120, "temperature": 0.8, "seed": rnd.randrange(10**6),
        "chat_template_kwargs": {"enable_thinking": False},
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}}),
        "json_schema")
    c = b["choices"][0]
    if c["finish_reason"] == "stop":
        v = json.loads(c["message"]["content"])
        check(isinstance(v["name"], str) and isinstance(v["age"], int), f"schema: {c['message']['content']}")
    return "ok"


def k_tool_call(rnd, prompt):
    b = ok200(*call("POST", "/v1/chat/completions", {
        "model": "tiny", "messages": [{"role": "user", "content": "Set a timer for the eggs."}], "tools": [SET_TIMER],
        "tool_choice": "required", "max_tokens": 200, "temperature": 0.7, "seed": rnd.randrange(10**6),
        "chat_template_kwargs": {"enable_thinking": False}}), "tool call")
    c = b["choices"][0]
    if c["finish_reason"] == "tool_calls":
        for t in c["message"]["tool_calls"]:
            check(isinstance(json.loads(t["function"]["arguments"])["minutes"], int), "tool arguments")
    else:
        check(c["finish_reason"] == "length", f"tool finish {c['finish_reason']}")
    return "ok"


def k_image(rnd, prompt):
    b = ok200(*call("POST", "/v1/chat/completions", {
        "model": "tiny", "max_tokens": 1 + rnd.randrange(8), "temperature": 0,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE_URL}},
                                                  {"type": "text", "text": "What is this?"}]}]}), "image")
    check(b["usage"]["prompt_tokens"] > 20, f"image prompt tokens {b['usage']['prompt_tokens']}")
    return "ok"


def k_conversation(rnd, prompt):
    base = {"model": "tiny", "temperature": 0, "reasoning": {"effort": "none"},
            "max_output_tokens": 4 + rnd.randrange(8)}
    prev = ok200(*call("POST", "/v1/responses", {**base, "input": prompt[:60]}), "response")
    check(prev["status"] in ("completed", "incomplete"), f"response {prev['status']}")
    for turn in range(1 + rnd.randrange(3)):
        st, b = call("POST", "/v1/responses", {**base, "input": f"And then {turn}?", "previous_response_id": prev["id"]})
        if st == 404 and "not found" in str(b):
            return "rejected"  # the small store evicted the previous turn meanwhile: a 404 naming it
        prev = ok200(st, b, "continued response")
    if rnd.random() < 0.5:
        st, b = call("DELETE", f"/v1/responses/{prev['id']}")
        check(st in (200, 404), f"delete {st}")
    return "ok"


def k_background(rnd, prompt):
    r = ok200(*call("POST", "/v1/responses", {"model": "tiny", "input": "Count slowly", "background": True,
                                              "temperature": 0.5, "max_output_tokens": 20 + rnd.randrange(60)}),
              "background")
    check(r["status"] in ("queued", "in_progress"), f"background {r['status']}")
    cancel = rnd.random() < 0.4
    if cancel:
        time.sleep(rnd.random() * 0.05)
        st, b = call("POST", f"/v1/responses/{r['id']}/cancel")
        check(st in (200, 404), f"cancel {st} {b}")
    deadline = time.time() + 120
    while True:
        st, g = call("GET", f"/v1/responses/{r['id']}")
        if st == 404:
            return "rejected"  # finished and evicted from the small store
        ok200(st, g, "background poll")
        if g["status"] in ("completed", "incomplete", "cancelled"):
            return "aborted" if cancel else "ok"
        check(g["status"] != "failed", f"background failed: {g.get('error')}")
        check(time.time() < deadline, f"background {r['id']} still {g['status']}")
        time.sleep(0.05)


def k_anthropic(rnd, prompt):
    body = {"model": "tiny", "max_tokens": 1 + rnd.randrange(16), "messages": [{"role": "user", "content": prompt[:80]}]}
    if rnd.random() < 0.5:
        ev = sse("/v1/messages", {**body, "stream": True})
        stops = [e["delta"].get("stop_reason") for e in ev if e.get("type") == "message_delta"]
        check(stops and stops[-1] in ("end_turn", "max_tokens"), f"messages stream {stops}")
    else:
        b = ok200(*call("POST", "/v1/messages", body), "messages")
        check(b["stop_reason"] in ("end_turn", "max_tokens"), f"messages {b.get('stop_reason')}")
    return "ok"


def k_tokenize(rnd, prompt):
    b = ok200(*call("POST", "/tokenize", {"prompt": prompt}), "tokenize")
    check(b["count"] == len(b["tokens"]) > 0, "tokenize count")
    return "ok"


BAD = [
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user"'),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": -3}),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}}),
    ("/v1/completions", {"model": "tiny", "prompt": [100] * 5000, "max_tokens": 4}),  # over --max-model-len
    ("/v1/responses", {"model": "tiny", "input": "x", "previous_response_id": "resp_nope"}),
]


def k_bad_request(rnd, prompt):
    path, body = rnd.choice(BAD)
    st, b = call("POST", path, body)
    check(st in (400, 404) and isinstance(b, dict) and len(b.get("error", {}).get("message", "")) > 10,
          f"bad request {path}: {st} {str(b)[:300]}")
    return "rejected"


MIX = {k_chat: 6, k_chat_stream: 6, k_abandoned_stream: 3, k_impatient: 3, k_completions_n: 3, k_json_schema: 2,
       k_tool_call: 2, k_image: 2, k_conversation: 3, k_background: 2, k_anthropic: 2, k_tokenize: 2, k_bad_request: 3}


def metrics():
    text = urllib.request.urlopen(BASE + "/metrics", timeout=30).read().decode()
    def get(name):
        vals = [float(m) for m in re.findall(rf"^(?:deltaserve:)?{name}(?:\{{[^}}]*\}})? ([0-9.e+-]+)$", text, re.M)]
        return sum(vals) if vals else float("nan")
    return get


def device_mb(pid):
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
    except Exception:
        return None
    for line in out.splitlines():
        p, _, mb = line.partition(",")
        if p.strip() == str(pid):
            return float(mb)
    return None


def slope(xs, ys):
    n = len(xs); mx = sum(xs) / n; my = sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def main():
    deadline = time.time() + 120
    while True:
        if proc.poll() is not None:
            sys.exit(f"server exited early ({proc.returncode}); log: {log_path}")
        try:
            if urllib.request.urlopen(BASE + "/health", timeout=1).status == 200:
                break
        except Exception:
            pass
        if time.time() > deadline:
            proc.kill(); sys.exit(f"server did not become healthy; log: {log_path}")
        time.sleep(0.1)

    m0 = metrics()
    success_before, fds_before = m0("request_success_total"), m0("process_open_fds")
    started = time.time(); end_at = started + opts.minutes * 60
    counts, failures, samples = {}, [], []
    answered = [0]
    lock = threading.Lock()
    done = threading.Event()

    def sampler():
        while not done.wait(5):
            try:
                m = metrics()
                samples.append({"t": round(time.time() - started, 1), "rss_mb": round(m("process_resident_memory_bytes") / 2**20, 1),
                                "device_mb": device_mb(proc.pid) if opts.backend == "cuda" else None,
                                "running": m("num_requests_running"), "waiting": m("num_requests_waiting"),
                                "kv_blocks_used": m("kv_blocks_used"), "store_bytes": m("responses_store_bytes"),
                                "malloc_mb": round(m("malloc_in_use_bytes") / 2**20, 1),
                                "open_fds": m("process_open_fds")})
            except Exception as e:
                with lock:
                    failures.append({"kind": "metrics", "error": repr(e)})

    def worker(w):
        rnd = random.Random(opts.seed * 1000 + w)
        kinds, weights = list(MIX), list(MIX.values())
        while time.time() < end_at:
            kind = rnd.choices(kinds, weights)[0]
            name = kind.__name__[2:]
            try:
                outcome = kind(rnd, rnd.choice(PROMPTS))
            except Exception as e:
                outcome = "failed"
                with lock:
                    if len(failures) < 20:
                        failures.append({"kind": name, "error": repr(e)[:400]})
            with lock:
                c = counts.setdefault(name, {"ok": 0, "aborted": 0, "rejected": 0, "failed": 0})
                c[outcome] += 1
                if outcome == "ok" and name not in ("conversation", "tokenize"):  # no engine request of their own
                    answered[0] += 1

    st = threading.Thread(target=sampler, daemon=True); st.start()
    ws = [threading.Thread(target=worker, args=(w,)) for w in range(opts.workers)]
    [t.start() for t in ws]; [t.join() for t in ws]
    done.set(); st.join()

    checks = []
    def ok(name, passed, detail=""):
        checks.append({"name": name, "pass": bool(passed), "detail": detail})
    ok("no request failed", not failures, f"{len(failures)} failures")
    idle_by = time.time() + 60
    while True:
        m = metrics()
        if m("num_requests_running") + m("num_requests_waiting") == 0 or time.time() > idle_by:
            break
        time.sleep(0.1)
    ok("idle after the load", m("num_requests_running") + m("num_requests_waiting") == 0)
    # A connection's thread may close its socket a moment after its request ends: give descriptors 10 s to return.
    fds_by = time.time() + 10
    while metrics()("process_open_fds") > fds_before and time.time() < fds_by:
        time.sleep(0.1)
    m = metrics()
    grown = m("request_success_total") - success_before
    ok("every answer counted", grown >= answered[0], f"request_success_total +{grown:.0f}, answers {answered[0]}")
    ok("nothing held at rest", m("kv_blocks_used") == 0 and m("state_slots_used") == 0,
       f"kv blocks used {m('kv_blocks_used'):.0f} (checkpoints hold {m('prefix_cache_blocks'):.0f} more), "
       f"state slots used {m('state_slots_used'):.0f}")
    # The listening socket and the log stay; connections, media fetches and files opened for requests must not.
    ok("no descriptor left open", m("process_open_fds") <= fds_before,
       f"process_open_fds {fds_before:.0f} before the load, {m('process_open_fds'):.0f} after")
    half = [x for x in samples if x["t"] >= opts.minutes * 30]
    def per_minute(key):
        return slope([x["t"] for x in half], [x[key] for x in half]) * 60 if len(half) >= 3 else float("nan")
    per_min, malloc_per_min = per_minute("rss_mb"), per_minute("malloc_mb")
    if opts.max_growth_mb > 0:
        ok("resident memory levels off", len(half) >= 3 and per_min * opts.minutes / 2 < opts.max_growth_mb,
           f"second half: {per_min:.3f} MB/min fitted, {per_min * opts.minutes / 2:.1f} MB over the half "
           f"(limit {opts.max_growth_mb})")
    dev = [x["device_mb"] for x in half if x["device_mb"] is not None]
    if opts.backend == "cuda":
        ok("device memory constant", dev and dev[-1] <= dev[0],
           f"device MB over the second half: {dev[0]} -> {dev[-1]}" if dev else "nvidia-smi gave nothing")
    proc.terminate()
    try:
        code = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill(); code = "killed after 120 s"
    log_file.close()
    log = open(log_path, errors="replace").read()
    sanitizer = re.search(r"ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:|WARNING: ThreadSanitizer", log)
    ok("clean exit", code == 0 and not sanitizer,
       f"exit {code}" + (f", sanitizer report in {log_path}" if sanitizer else ""))

    rss = [x["rss_mb"] for x in samples]
    summary = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "backend": opts.backend,
               "minutes": opts.minutes, "workers": opts.workers, "seed": opts.seed, "server_args": server_args,
               "counts": counts, "answered": answered[0], "failures": failures, "checks": checks,
               "rss_mb": {"first": rss[0] if rss else None, "max": max(rss, default=None),
                          "last": rss[-1] if rss else None, "second_half_mb_per_min": round(per_min, 3)},
               "malloc_in_use_mb": {"first": samples[0]["malloc_mb"] if samples else None,
                                    "last": samples[-1]["malloc_mb"] if samples else None,
                                    "second_half_mb_per_min": round(malloc_per_min, 3)},
               "device_mb": {"first": dev[0], "last": dev[-1], "max": max(dev)} if dev else None,
               "samples": len(samples), "server_log": log_path}
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump({**summary, "series": samples}, f, indent=1)
    print(json.dumps(summary, indent=1))
    failed = [c["name"] for c in checks if not c["pass"]]
    print("soak: " + (f"FAILED ({', '.join(failed)})" if failed else "passed"), file=sys.stderr)
    sys.exit(1 if failed else 0)


try:
    main()
finally:
    if proc.poll() is None:
        proc.kill()
