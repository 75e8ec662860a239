"""`jinfer serve`: the real server process on 127.0.0.1, driven by the official `openai` client (and
httpx where the client cannot): results equal LLM.generate, streaming, n, logprobs, concurrency,
every bad field -> 400 naming it, 404/401/413, disconnect -> cancel, overload -> 503, /metrics,
one log line per request, SIGTERM -> exit 0. The last test stops the shared server."""

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jinfer.llm import LLM
from jinfer.sampling import SamplingParams
from jinfer.testing import make_tiny_llm_dir

REPO = Path(__file__).resolve().parents[1]
KEY = "test-key"
MAX_BATCH, MAX_QUEUE, MAX_LEN, BUCKETS = 4, 16, 16384, (16, 64)
MAX_BODY = 65536
GRACE = 10
SECRET_PROMPT = "zebra unicorn"  # must never appear in the server log
LONG = {"max_tokens": MAX_LEN - 100, "ignore_eos": True}  # runs far longer than any test waits for it
LONG_KW = {"max_tokens": LONG["max_tokens"], "extra_body": {"ignore_eos": True}}  # (openai client)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir, tmp, *flags):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "server.log"
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        env.pop("XLA_FLAGS", None)  # one device, as a user runs it
        cmd = [
            sys.executable,
            "-m",
            "jinfer.cli",
            "--compilation-cache",
            "off",
            "serve",
            "--model",
            str(model_dir),
            "--port",
            str(self.port),
            *flags,
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log)
        self.health = []  # /health statuses seen while starting
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()
            with contextlib.suppress(httpx.TransportError):
                r = httpx.get(f"{self.url}/health", timeout=5)
                self.health.append((r.status_code, r.json()))
                if r.status_code == 200:
                    return
            time.sleep(0.2)
        raise AssertionError(f"server not ready: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[tuple, float]:
        text = httpx.get(f"{self.url}/metrics").text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        }

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llm_dir(tmp_path_factory.mktemp("tiny") / "model", max_position_embeddings=MAX_LEN)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    s = Server(
        model_dir,
        tmp_path_factory.mktemp("serve"),
        "--max-batch",
        str(MAX_BATCH),
        "--max-len",
        str(MAX_LEN),
        "--buckets",
        ",".join(map(str, BUCKETS)),
        "--max-queue",
        str(MAX_QUEUE),
        "--api-key",
        KEY,
        "--max-body-bytes",
        str(MAX_BODY),
        "--grace-period",
        str(GRACE),
        "--served-model-name",
        "tiny",
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, max_batch=MAX_BATCH, max_len=MAX_LEN, buckets=BUCKETS)


def chat(text):
    return [{"role": "user", "content": text}]


def post(server, path, body, key=KEY, timeout=120):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=timeout)


def test_ready_only_after_warmup_and_models(server, client):
    assert server.health[0] == (503, {"status": "loading"})
    status, body = server.health[-1]
    assert status == 200 and body["status"] == "ok" and body["warmup_seconds"] > 0
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"


def test_chat_and_completions_equal_python_api(server, client, llm):
    p = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2)
    want = llm.generate(chat("Paris is"), p)[0]
    r = client.chat.completions.create(
        model="tiny",
        messages=chat("Paris is"),
        max_completion_tokens=12,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    c = r.choices[0]
    assert c.message.content == want.text and c.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(want.prompt_token_ids), 12)
    assert [t.logprob for t in c.logprobs.content] == pytest.approx(
        [lp[t] for t, lp in zip(want.token_ids, want.logprobs, strict=True)], abs=1e-5
    )
    assert all(len(t.top_logprobs) == 2 for t in c.logprobs.content)

    stream = client.chat.completions.create(
        model="tiny",
        messages=chat("Paris is"),
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want.text
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].choices == []

    # completions: token-id prompt, seeded sampling, stop string, n=2, logprobs
    ids = llm.tokenizer.encode("The quick brown")
    p = SamplingParams(max_tokens=20, temperature=0.9, seed=7, n=2, logprobs=1, stop=("e ",))
    want = llm.generate([ids], p)[0]
    r = client.completions.create(
        model="tiny", prompt=ids, max_tokens=20, temperature=0.9, seed=7, n=2, logprobs=1, stop="e "
    )
    assert [c.text for c in r.choices] == [o.text for o in want.outputs]
    assert [c.finish_reason for c in r.choices] == [o.finish_reason for o in want.outputs]
    assert r.usage.completion_tokens == want.usage["completion_tokens"] and r.usage.prompt_tokens == len(ids)
    got_lp = r.choices[1].logprobs.token_logprobs
    assert got_lp == pytest.approx(
        [lp[t] for t, lp in zip(want.outputs[1].token_ids, want.outputs[1].logprobs, strict=True)], abs=1e-5
    )
    pieces = ["", ""]
    for ch in client.completions.create(
        model="tiny", prompt=ids, max_tokens=20, temperature=0.9, seed=7, n=2, stop="e ", stream=True
    ):
        for c in ch.choices:
            pieces[c.index] += c.text
    assert pieces == [o.text for o in want.outputs]
    text = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=5, temperature=0)
    assert (
        text.choices[0].text
        == llm.generate("The quick brown", SamplingParams(max_tokens=5, temperature=0))[0].text
    )


def test_16_concurrent_requests_equal_each_alone(server):
    bodies = [
        {
            "model": "tiny",
            "messages": chat(f"Request {i}: café 🙂"),
            "max_tokens": 10 + i,
            **({"temperature": 0} if i % 2 else {"temperature": 0.8, "seed": i}),
            "stream": i % 3 == 0,
        }
        for i in range(16)
    ]
    aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)

    async def one(body):
        r = await aclient.chat.completions.create(**body)
        if body["stream"]:
            return "".join([ch.choices[0].delta.content or "" async for ch in r if ch.choices])
        return r.choices[0].message.content

    async def alone_then_together():
        alone = [await one(b) for b in bodies]
        return alone, await asyncio.gather(*map(one, bodies))

    alone, together = asyncio.run(alone_then_together())
    assert together == alone
    assert len(set(alone)) > 8  # the requests really differ


BAD = [  # (route, body changes, field the error must name)
    ("chat", {"temperature": -1}, "temperature"),
    ("chat", {"temperature": "hot"}, "temperature"),
    ("chat", {"top_p": 1.5}, "top_p"),
    ("chat", {"top_k": -2}, "top_k"),
    ("chat", {"min_p": 2}, "min_p"),
    ("chat", {"max_tokens": 0}, "max_tokens"),
    ("chat", {"max_completion_tokens": 2.5}, "max_completion_tokens"),
    ("chat", {"max_tokens": MAX_LEN + 1}, "max_tokens"),
    ("chat", {"n": 0}, "n"),
    ("chat", {"n": MAX_BATCH + 1}, "n"),
    ("chat", {"seed": -1}, "seed"),
    ("chat", {"logprobs": True, "top_logprobs": 9}, "top_logprobs"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("chat", {"stop": [""]}, "stop"),
    ("chat", {"stop": 5}, "stop"),
    ("chat", {"stream": "yes"}, "stream"),
    ("chat", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("chat", {"ignore_eos": "no"}, "ignore_eos"),
    ("chat", {"presence_penalty": 0.5}, "presence_penalty"),
    ("chat", {"logit_bias": {"5": 10}}, "logit_bias"),
    ("chat", {"response_format": {"type": "json_object"}}, "response_format"),
    ("chat", {"messages": []}, "messages"),
    ("chat", {"messages": [{"content": "no role"}]}, "messages"),
    ("completions", {"prompt": []}, "prompt"),
    ("completions", {"prompt": [10**6]}, "prompt"),
    ("completions", {"prompt": [5] * (MAX_LEN + 1)}, "prompt"),  # longer than max_len
    ("completions", {"logprobs": 6}, "logprobs"),
    ("completions", {"stop_token_ids": "x"}, "stop_token_ids"),
]


@pytest.mark.parametrize("route,change,field", BAD, ids=[f"{r}-{f}-{i}" for i, (r, _, f) in enumerate(BAD)])
def test_bad_field_is_400_naming_it_and_server_keeps_serving(server, route, change, field):
    base = {"model": "tiny", "max_tokens": 3}
    base.update({"messages": chat("hi")} if route == "chat" else {"prompt": "hi"})
    r = post(server, f"/v1/{'chat/completions' if route == 'chat' else 'completions'}", {**base, **change})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and field in err["message"] and err["type"] == "invalid_request_error"
    ok = post(server, "/v1/chat/completions", {"messages": chat("hi"), "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_404_401_413_and_malformed_json(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=chat("hi"), max_tokens=2)
    assert e.value.body["param"] == "model" and "gpt-4" in e.value.body["message"]
    assert httpx.get(f"{server.url}/v1/nothing-here").status_code == 404
    for key in (None, "wrong-key"):
        r = post(server, "/v1/chat/completions", {"messages": chat("hi")}, key=key)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = post(server, "/v1/completions", {"prompt": "x" * (MAX_BODY + 10)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(
        f"{server.url}/v1/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    deep = b"[" * 5000 + b"]" * 5000  # json.loads raises RecursionError, not ValueError
    r = httpx.post(f"{server.url}/v1/completions", content=deep, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"

    # A lone surrogate ("\ud800", valid JSON) is no text a tokenizer takes: 400 naming the field.
    def post_ascii(path, body):  # json.dumps escapes the surrogate; httpx's json= cannot encode it
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        return httpx.post(f"{server.url}{path}", content=json.dumps(body).encode(), headers=headers)

    r = post_ascii("/v1/completions", {"prompt": "a\ud800b", "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    assert "surrogate" in r.json()["error"]["message"]
    r = post_ascii("/v1/chat/completions", {"messages": chat("x\udfff"), "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens >= 1


def test_logprob_bytes_join_to_the_text():
    """OpenAI's `bytes` are each token's own bytes, so a character split over byte-level tokens
    (an emoji, CJK) joins back: they were the UTF-8 of U+FFFD per token. Completions' text_offset
    counts characters of the text."""
    from jinfer.serve.protocol import LogprobFormatter
    from jinfer.testing import train_tokenizer
    from jinfer.tokenizer import Tokenizer

    tok = Tokenizer(train_tokenizer())
    text = " stars 🌟🌟 and 中文 café"
    ids = tok.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tok.decode([t]) for t in ids)  # some tokens hold part of a character
    fmt = LogprobFormatter(tok, top=1)
    lps = [{t: -0.5} for t in ids]
    items = fmt.chat(ids, lps)
    assert b"".join(bytes(i["bytes"]) for i in items).decode("utf-8") == text
    done = fmt.completion(ids, lps, offset=3)
    raws = [tok.token_bytes(t) for t in ids]
    for i, at in enumerate(done["text_offset"]):
        assert at == 3 + len(b"".join(raws[:i]).decode("utf-8", errors="ignore"))


def _wait_for(server, check, what, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = server.metrics()
        if check(m):
            return m
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}: {server.metrics()}")


def _aborts(m):
    return m.get(("jinfer_request_finish_total", (("reason", "abort"),)), 0)


def _idle(m):
    return m[("jinfer_requests_running", ())] == 0 and m[("jinfer_queue_depth", ())] == 0


def test_disconnect_cancels_the_request_and_frees_its_slot(server, client):
    before = server.metrics()
    stream = client.chat.completions.create(
        model="tiny",
        messages=chat("a long story"),
        stream=True,
        max_tokens=LONG["max_tokens"],
        extra_body={"ignore_eos": True},
    )
    next(iter(stream))
    stream.close()  # the client goes away mid-stream
    m = _wait_for(server, lambda m: _aborts(m) == _aborts(before) + 1 and _idle(m), "the stream's abort")
    generated = m[("jinfer_generation_tokens_total", ())] - before[("jinfer_generation_tokens_total", ())]
    assert generated < LONG["max_tokens"]
    # A non-streaming request whose client gives up is cancelled too.
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/v1/completions", {"prompt": "hi", **LONG}, timeout=httpx.Timeout(120, read=1.0))
    _wait_for(server, lambda m: _aborts(m) == _aborts(before) + 2 and _idle(m), "the request's abort")
    r = client.chat.completions.create(model="tiny", messages=chat("next"), max_tokens=3)
    assert r.choices[0].finish_reason in ("length", "stop")


def test_disconnect_frees_a_slot_for_the_next_request_at_once(server, client):
    """All slots busy with long streams; one client leaves; a new request runs and completes while
    the other long streams still hold their slots."""
    streams = []
    for i in range(MAX_BATCH):
        s = client.completions.create(model="tiny", prompt=f"story {i}", stream=True, **LONG_KW)
        next(iter(s))
        streams.append(s)
    _wait_for(server, lambda m: m[("jinfer_requests_running", ())] == MAX_BATCH, "all slots busy")
    streams.pop().close()
    r = client.chat.completions.create(
        model="tiny", messages=chat("next"), max_tokens=5, extra_body={"ignore_eos": True}
    )
    assert r.usage.completion_tokens == 5
    assert server.metrics()[("jinfer_requests_running", ())] == MAX_BATCH - 1
    for s in streams:
        s.close()
    _wait_for(server, _idle, "the long streams to be cancelled")


def test_overload_answers_503_with_retry_after(server, client):
    total = MAX_BATCH + MAX_QUEUE + 3
    results, release = [], asyncio.Event()

    async def hold(http):
        body = {"model": "tiny", "prompt": "hi", "stream": True, **LONG}
        async with http.stream("POST", "/v1/completions", json=body) as r:
            results.append(
                (
                    r.status_code,
                    r.headers.get("retry-after"),
                    await r.aread() if r.status_code != 200 else b"",
                )
            )
            if r.status_code == 200:
                await release.wait()

    async def run():
        async with httpx.AsyncClient(
            base_url=server.url,
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=120,
            limits=httpx.Limits(max_connections=total),
        ) as http:
            tasks = [asyncio.create_task(hold(http)) for _ in range(total)]
            deadline = time.monotonic() + 60
            while sum(s == 503 for s, *_ in results) < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            release.set()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(run())
    rejected = [(s, ra, body) for s, ra, body in results if s == 503]
    assert len(rejected) >= 3 and all(s in (200, 503) for s, *_ in results)
    assert all(ra == "1" and b"overloaded" in body for _, ra, body in rejected)
    _wait_for(server, _idle, "the held requests to be cancelled")
    assert client.chat.completions.create(model="tiny", messages=chat("after"), max_tokens=2).choices


def test_metrics_count_requests_and_tokens_and_log_has_no_prompt(server, client):
    before = server.metrics()
    usages, ids = [], []
    for stream in (False, True):
        for k in range(2):
            r = client.chat.completions.create(
                model="tiny",
                messages=chat(f"{SECRET_PROMPT} {k}"),
                max_tokens=4 + k,
                stream=stream,
                stream_options={"include_usage": True} if stream else None,
            )
            if stream:
                chunks = list(r)
                r = chunks[-1]
            usages.append(r.usage)
            ids.append(r.id)
    assert (
        post(server, "/v1/chat/completions", {"messages": chat(SECRET_PROMPT), "top_p": 7}).status_code == 400
    )
    too_long = {"prompt": [5] * (MAX_LEN + 1), "max_tokens": 4}  # rejected: counts no prompt tokens
    assert post(server, "/v1/completions", too_long).status_code == 400
    after = server.metrics()

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("jinfer_requests_total", route="/v1/chat/completions", status="200") == 4
    assert delta("jinfer_requests_total", route="/v1/chat/completions", status="400") == 1
    assert delta("jinfer_requests_total", route="/v1/completions", status="400") == 1
    assert delta("jinfer_prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert delta("jinfer_generation_tokens_total") == sum(u.completion_tokens for u in usages)
    assert delta("jinfer_time_to_first_token_seconds_count") == 4
    assert delta("jinfer_time_per_output_token_seconds_count") == 4
    assert after[("jinfer_kv_cache_blocks_total", ())] > 0
    log = server.log()
    assert SECRET_PROMPT not in log
    for rid in ids:
        assert log.count(f"id={rid} ") == 1


def test_embeddings_from_an_embedding_model(tmp_path):
    from jinfer.convert import convert

    fixture = REPO / "tests" / "fixtures" / "hf" / "bert"
    convert(fixture, tmp_path / "bert", progress=False)
    s = Server(tmp_path / "bert", tmp_path)
    try:
        golden = np.load(fixture / "golden.npz")
        rows = [
            ids[m.astype(bool)].tolist()
            for ids, m in zip(golden["input_ids"], golden["attention_mask"], strict=True)
        ]
        c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0)
        r = c.embeddings.create(model=str(tmp_path / "bert"), input=rows)  # base64 on the wire
        got = np.array([d.embedding for d in r.data])
        np.testing.assert_allclose(got, golden["cls_embedding"], atol=1e-4)  # a plain BERT dir: CLS pooling
        assert r.usage.prompt_tokens == sum(map(len, rows))
        floats = post(s, "/v1/embeddings", {"input": rows[0], "encoding_format": "float"}).json()
        np.testing.assert_allclose(floats["data"][0]["embedding"], got[0], atol=1e-6)
        r = post(s, "/v1/chat/completions", {"messages": chat("hi")})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
        assert post(s, "/v1/embeddings", {"input": []}).json()["error"]["param"] == "input"
        # Text with a model directory that has no tokenizer.json: 400 (was a 500, AttributeError).
        r = post(s, "/v1/embeddings", {"input": "hello"})
        assert r.status_code == 400 and "needs a tokenizer" in r.json()["error"]["message"], r.text
    finally:
        s.stop()


def test_sigterm_finishes_in_flight_requests_and_exits_0(server, client):
    """Last test: stops the module's server. A stream running at SIGTERM completes; one that cannot
    finish within the grace period ends cleanly with finish_reason "abort"; exit status 0."""
    results = {}
    opts = {"stream": True, "stream_options": {"include_usage": True}, "extra_body": {"ignore_eos": True}}
    running = client.chat.completions.create(model="tiny", messages=chat("x"), max_tokens=2000, **opts)
    running = iter(running)
    next(running)  # it is running

    def long():
        stream = client.completions.create(model="tiny", prompt="hi", stream=True, **LONG_KW)
        results["long"] = [c.choices[0].finish_reason for c in stream if c.choices][-1]

    thread = threading.Thread(target=long)
    thread.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    chunks = list(running)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 2000
    assert server.proc.wait(timeout=GRACE + 60) == 0
    assert time.monotonic() - t0 < GRACE + 60
    thread.join(timeout=30)
    assert results["long"] in ("abort", "length")  # (length only on a machine fast enough)
    log = server.log()
    assert "Traceback" not in log and "Shutting down" in log, log
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-batch", "0"], "--max-batch: 0 is too small"),
        (["--port", "99999"], "--port: '99999' is not a TCP port"),
        (["--grace-period", "-5"], "--grace-period: '-5' is not a duration"),
        (["--buckets", "0,16"], "--buckets '0,16': expected comma-separated integers >= 1"),
        (["--mesh", "foo"], "mesh spec 'foo': cannot parse 'foo'"),
        (["--mesh", "data=3"], "mesh spec 'data=3' needs 3 devices but 8 are available"),
    ],
)
def test_bad_flags_exit_2_before_the_model_loads(flags, message, tmp_path):
    """Flag values are checked up front: no model (here none exists) is loaded, no port opened."""
    cmd = [sys.executable, "-m", "jinfer.cli", "serve", "--model", str(tmp_path / "absent"), *flags]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_stop_while_the_model_loads_exits_at_once(tmp_path):
    """SIGTERM while the model is still loading ends the server at once with status 0 (the load
    cannot be cancelled; before, the process lived until the load ended, or aborted)."""
    gate = tmp_path / "gate"
    code = f"""if True:
        import pathlib, time, sys
        from jinfer.serve import command
        from jinfer.serve import backend
        def slow(config):
            pathlib.Path({str(gate)!r}).write_text("loading")
            time.sleep(120)
        backend.load_backend = slow
        from jinfer import cli
        sys.exit(cli.main(["serve", "--model", "x", "--port", "0"]))
    """
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # uvicorn's signal handlers are in place once the lifespan started the load
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert time.monotonic() - t < 30
    assert "stopped while the model was loading" in proc.stderr.read()
