"""`neoformer serve`: a real server process on 127.0.0.1 driven by the `openai` client and raw HTTP,
plus the scheduler and the app in-process for the cases that need control (queue full, timeouts)."""
import asyncio
import http.client
import json
import os
import random
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import serving

from neoformer import ModelConfig, build_model, checkpoint
from neoformer.cli import main
from neoformer.generate import generate
from neoformer.tokenizer import CharTokenizer

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
os.environ["HF_HUB_OFFLINE"] = "1"

TEXT = "the quick brown fox jumps over the lazy dog. <|im_start|>user\nassistant system<|im_end|>\n"
REPO = Path(__file__).resolve().parents[1]


def tiny_decoder(tok, seq_len=512, **extra):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, ffn_hidden=96,
                      max_seq_len=seq_len, init_std=0.3, **extra)
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer.from_texts([TEXT])


@pytest.fixture(scope="module")
def served(tmp_path_factory, tok):
    """A checkpoint and a `neoformer serve` process on a free port (max batch 4)."""
    path = checkpoint.save_checkpoint(tmp_path_factory.mktemp("serve") / "tiny", 1, tiny_decoder(tok), tokenizer=tok)
    with serving(path, max_batch=4, timeout_s=30) as (port, proc):
        yield port, path
    # graceful SIGTERM: must exit on its own, promptly (uvicorn re-raises the signal at the end)
    assert proc.wait(timeout=20) in (0, -15)


def _get(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    r = conn.getresponse()
    return r.status, r.read().decode()


def _post(port, path, body, conn=None):
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, data, {"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, json.loads(r.read() or b"null"), dict(r.getheaders())


def client(port, cls=None):
    return (cls or openai.OpenAI)(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)


# ---- the openai client ------------------------------------------------------------------------
def test_openai_client_sync_async_and_stream(served, tok):
    port, path = served
    c = client(port)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    out = c.completions.create(model="tiny", prompt="the quick", max_tokens=12, temperature=0,
                               extra_body={"ignore_eos": True})
    model, _ = checkpoint.load_model(path)
    expected = generate(model, tok.encode("the quick"), 12, eos_token_id=[], return_dict=True).new_tokens[0]
    assert out.choices[0].text == tok.decode(expected)
    assert out.usage.prompt_tokens == 9 and out.usage.completion_tokens == 12
    pieces = list(c.completions.create(model="tiny", prompt="the quick", max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(p.choices[0].text for p in pieces if p.choices) == out.choices[0].text
    assert pieces[-1].usage.completion_tokens == 12 and pieces[-2].choices[0].finish_reason == "length"

    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=10,
                                     temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.total_tokens > 10
    streamed = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                         max_tokens=10, temperature=0, stream=True)
    assert "".join(p.choices[0].delta.content or "" for p in streamed) == chat.choices[0].message.content

    async def run_async():
        ac = client(port, openai.AsyncOpenAI)
        outs = await asyncio.gather(*(ac.completions.create(model="tiny", prompt="the quick", max_tokens=12,
                                                            temperature=0, extra_body={"ignore_eos": True})
                                      for _ in range(3)))
        await ac.close()
        return outs

    assert all(o.choices[0].text == out.choices[0].text for o in asyncio.run(run_async()))
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="other", prompt="x", max_tokens=2)


def test_batching_invariance_greedy_and_seeded(served, tok):
    """Each request's tokens under concurrent load == its tokens alone, for ragged prompts and lengths."""
    port, _ = served
    rng = random.Random(0)
    requests = [{"prompt": [rng.randrange(4, tok.vocab_size) for _ in range(rng.randrange(1, 150))],
                 "max_tokens": rng.randrange(5, 40), "ignore_eos": True, "logprobs": 0,
                 **({"temperature": 0} if i % 2 else {"temperature": 1.0, "top_p": 0.9, "seed": i})}
                for i in range(10)]

    def ask(body):
        status, out, _ = _post(port, "/v1/completions", body)
        assert status == 200, out
        return [t for t in out["choices"][0]["logprobs"]["token_logprobs"]], out["choices"][0]["text"]

    alone = [ask(r) for r in requests]
    together = [None] * len(requests)
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(requests[i]))) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert together == alone  # texts and every logprob bit-identical


def test_n_choices_seeds_and_stop_strings_spanning_tokens(served, tok):
    port, _ = served
    c = client(port)
    base = c.completions.create(model="tiny", prompt="the lazy", max_tokens=30, temperature=0,
                                extra_body={"ignore_eos": True}).choices[0].text
    stop = base[10:13]  # three characters: three tokens of the char tokenizer
    cut = c.completions.create(model="tiny", prompt="the lazy", max_tokens=30, temperature=0, stop=[stop],
                               extra_body={"ignore_eos": True})
    assert cut.choices[0].text == base[:base.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(p.choices[0].text for p in c.completions.create(
        model="tiny", prompt="the lazy", max_tokens=30, temperature=0, stop=[stop], stream=True,
        extra_body={"ignore_eos": True}))
    assert streamed == cut.choices[0].text
    many = c.completions.create(model="tiny", prompt=["the", "a dog"], max_tokens=8, n=3, temperature=1.0, seed=7)
    assert sorted(ch.index for ch in many.choices) == list(range(6))
    again = c.completions.create(model="tiny", prompt=["the", "a dog"], max_tokens=8, n=3, temperature=1.0, seed=7)
    assert [ch.text for ch in many.choices] == [ch.text for ch in again.choices]
    assert len({ch.text for ch in many.choices[:3]}) > 1  # n samples differ


def test_echo_logprobs_serve_lm_eval_loglikelihood(served, tok):
    """lm-eval's local-completions payload and parser against a float64 recomputation."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    port, path = served
    context, continuation = tok.encode("the quick brown"), tok.encode(" fox")
    body = {"model": "tiny", "prompt": [context + continuation], "temperature": 0, "max_tokens": 1, "logprobs": 1,
            "seed": 1234, "echo": True}
    status, out, _ = _post(port, "/v1/completions", body)
    assert status == 200, out
    (logprob, greedy), = LocalCompletionsAPI.parse_logprobs(out, tokens=[context + continuation],
                                                           ctxlens=[len(context)])
    model, _ = checkpoint.load_model(path)
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        lsm = model.double()(ids)[0][0].log_softmax(-1)
    want = sum(float(lsm[len(context) - 1 + i, t]) for i, t in enumerate(continuation))
    assert logprob == pytest.approx(want, abs=1e-4)
    assert greedy == all(int(lsm[len(context) - 1 + i].argmax()) == t for i, t in enumerate(continuation))
    assert out["choices"][0]["logprobs"]["token_logprobs"][0] is None


def test_disconnect_cancels_and_frees_the_row(served):
    port, _ = served
    before = _metric(port, "neoformer_generation_tokens_total")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "the", "max_tokens": 500, "stream": True,
                                                        "ignore_eos": True}), {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.readline().startswith(b"data: ")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    for _ in range(100):  # bounded: 10 s
        if _metric(port, "neoformer_requests_running") == 0:
            break
        time.sleep(0.1)
    assert _metric(port, "neoformer_requests_running") == 0
    assert _metric(port, "neoformer_generation_tokens_total") - before < 500


def _metric(port, name):
    text = _get(port, "/metrics")[1]
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


INVALID = {  # values every field must refuse
    "prompt": [None, 3, [], {}, [[]], [-5], [10**9], [1.5], ["a", 3], "", True, "\ud800"],
    "max_tokens": [-1, 1e308, 2**70, "x", 10**6, 1.5, True, []],
    "temperature": [-1, 3, "x", True, [], 1e308, float("nan")],
    "top_p": [0, -1, 2, "x", True, float("nan")],
    "n": [0, -5, 100, "x", 1.5, True],
    "stop": [3, "", [""], [3], {"a": 1}, ["a"] * 50],
    "seed": [2**70, -2**70, "x", 1.5, True],
    "logprobs": [-1, 100, "x", 1.5, True],
    "echo": ["yes", 1, []], "stream": ["yes", 1, []], "ignore_eos": ["yes", 1],
    "top_k": [-5, "x", 1.5, True], "min_p": [-1, 2, "x"], "repetition_penalty": [0, -1, 100, "x"],
    "min_tokens": [-1, "x", 1.5], "stream_options": ["x", 3, {"include_usage": True}], "best_of": [5, 0, "x"],
    "presence_penalty": [1, "x", 5], "logit_bias": [{"1": 5}, "x"], "model": ["unknown-model", 3, []],
    "messages": [None, [], "x", [{"role": "robot", "content": "x"}], [{"role": "user"}],
                 [{"role": "user", "content": 3}], [3]],
}
CHAT_ONLY, COMPLETION_ONLY = {"messages"}, {"prompt", "best_of", "echo"}


def _hostile_bodies(rng):
    raw = [b"", b"{", b"[1,2]", b"null", b'"text"', b"\xff\xfe{}", b'{"prompt": "\xc3\x28"}', b"{" * 5000,
           b'{"prompt": "a", "max_tokens": 1e999}', b'{"prompt": "' + b"a" * 200000 + b'"}', b"NaN"]
    for i in range(1100):
        if i < len(raw):
            yield "/v1/completions", raw[i]
            continue
        path = rng.choice(["/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/tokenize", "/detokenize"])
        if path == "/v1/embeddings":
            body = {"input": rng.choice(INVALID["prompt"]), "model": "tiny"}
        elif path == "/detokenize":
            body = {"tokens": rng.choice([[-1], ["a"], None, [10**9], 3, [True]])}
        elif path == "/tokenize":
            body = {"prompt": rng.choice([None, 3, [], {}])}
        else:
            chat = "chat" in path
            body = {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "the"}
            body["max_tokens"] = 3
            field = rng.choice([f for f in INVALID if f not in (COMPLETION_ONLY if chat else CHAT_ONLY)])
            value = rng.choice(INVALID[field])
            if chat and field == "logprobs":
                value = rng.choice([3, "x", []])
            body[field] = value
        yield path, json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")


def test_fuzz_hostile_requests_get_4xx_and_server_survives(served):
    port, _ = served
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    statuses = []
    for path, body in _hostile_bodies(random.Random(1)):
        try:
            status, out, _ = _post(port, path, body, conn)
        except (http.client.HTTPException, OSError):  # the server may close a connection after a 413
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            status, out, _ = _post(port, path, body, conn)
        statuses.append(status)
        assert 400 <= status < 500, (path, body[:200], status, out)
        assert set(out["error"]) >= {"message", "type", "param", "code"}
    assert len(statuses) >= 1000
    status, out, _ = _post(port, "/v1/completions", {"prompt": "the", "max_tokens": 3})
    assert status == 200 and out["usage"]["completion_tokens"] <= 3


def test_32_concurrent_clients_no_failures(served):
    port, _ = served
    results = []

    def one(i):
        c = client(port)
        if i % 2:
            out = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6)
            results.append(out.choices[0].finish_reason in ("stop", "length"))
        else:
            pieces = list(c.completions.create(model="tiny", prompt="the " * (i + 1), max_tokens=6, stream=True))
            results.append(pieces[-1].choices[0].finish_reason in ("stop", "length"))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [True] * 32
    text = _get(port, "/metrics")[1]
    assert "neoformer_time_to_first_token_seconds_bucket" in text and "neoformer_inter_token_latency_seconds_count" in text


def test_limits_tokenize_and_playground(served, tok):
    port, _ = served
    status, out, _ = _post(port, "/v1/completions", {"prompt": "the", "max_tokens": 600})
    assert status == 400 and "context of 512" in out["error"]["message"]
    status, out, _ = _post(port, "/v1/completions", {"prompt": [5] * 513})
    assert status == 400 and out["error"]["param"] == "prompt"
    status, out, _ = _post(port, "/tokenize", {"prompt": "the fox"})
    assert out["tokens"] == tok.encode("the fox")
    assert _post(port, "/detokenize", {"tokens": out["tokens"]})[1]["prompt"] == "the fox"
    status, page = _get(port, "/")
    assert status == 200 and "/v1/chat/completions" in page and "src=\"http" not in page and "href=\"http" not in page
    assert _get(port, "/nope")[0] == 404


# ---- in-process: the app (auth, queue, body limit) and the scheduler ---------------------------
def _asgi(app, method, path, body=b"", headers=(), stay=False):
    """One request through the ASGI app without a socket -> (status, headers, parsed body). The
    client leaves once its body is read, unless ``stay`` (then it waits for the whole response)."""
    sent, messages = [], [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if messages:
            return messages.pop(0)
        if stay:
            await asyncio.Event().wait()  # never set: still connected (is_disconnected cancels this wait)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         *headers], "http_version": "1.1", "scheme": "http", "server": ("t", 80), "client": ("t", 1)}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), json.loads(data)


def test_api_key_queue_bound_and_body_limit(tok):
    from neoformer.serve import Sampling, Sequence
    from neoformer.serve.app import ServeOptions, Server, create_app

    server = Server(tiny_decoder(tok, 64), tok, {}, "tiny", ServeOptions(api_key="sekret", max_queue=1,
                                                                          max_body_bytes=2000))
    app = create_app(server)  # scheduler not started: nothing drains the queue
    body = json.dumps({"prompt": "the", "max_tokens": 2}).encode()
    status, _, out = _asgi(app, "POST", "/v1/completions", body)
    assert status == 401 and out["error"]["type"] == "authentication_error"
    assert _asgi(app, "GET", "/health")[0] == 200
    auth = [(b"authorization", b"Bearer sekret")]
    server.scheduler.submit(Sequence([1], Sampling(), lambda event: None))  # fills the queue of one
    status, headers, out = _asgi(app, "POST", "/v1/completions", body, auth)
    assert status == 429 and headers[b"retry-after"] == b"1" and out["error"]["type"] == "rate_limit_error"
    status, _, out = _asgi(app, "POST", "/v1/completions", b'{"prompt": "' + b"a" * 3000 + b'"}', auth)
    assert status == 413


def _collect(scheduler, prompts, samplings, deadline=float("inf")):
    from neoformer.serve import Sequence

    out = [[] for _ in prompts]
    seqs = [Sequence(p, s, (lambda i: lambda e: out[i].append(e))(i), deadline) for i, (p, s) in
            enumerate(zip(prompts, samplings))]
    for seq in seqs:
        scheduler.submit(seq)
    for _ in range(2000):
        if all(any(e.finish for e in events) for events in out):
            break
        scheduler.step()
    return seqs, out


def test_scheduler_rmc_state_per_request_and_cancel_and_timeout(tok):
    from neoformer.serve import Sampling, Scheduler

    model = tiny_decoder(tok, 128, rmc=True)
    prompts = [tok.encode(t) for t in ("the quick brown fox", "a", "lazy dog jumps over")]
    greedy = Sampling(max_tokens=12, ignore_eos=True)
    alone = [[e.token for e in _collect(Scheduler(model, tok, max_batch=4), [p], [greedy])[1][0] if e.token is not None]
             for p in prompts]
    reference = [generate(model, p, 12, eos_token_id=[], return_dict=True).new_tokens[0] for p in prompts]
    batch = Scheduler(model, tok, max_batch=4, prefill_chunk=4)
    _, events = _collect(batch, prompts, [greedy] * 3)
    assert [[e.token for e in ev if e.token is not None] for ev in events] == alone
    assert alone == reference  # the RMC summary stays per row

    from neoformer.serve import Sequence

    sched, events = Scheduler(model, tok, max_batch=1), [[]]
    seq = Sequence(prompts[0], Sampling(max_tokens=100, ignore_eos=True), events[0].append)
    sched.submit(seq)
    sched.step()
    sched.step()
    seq.cancel()
    sched.step()
    assert sched.rows == [None] and events[0][-1].finish == "cancelled" and len(events[0]) < 10
    waiting = Sequence(prompts[1], greedy, events[0].append, deadline=time.monotonic() - 1)
    sched.submit(waiting)
    sched.step()
    assert events[0][-1].finish == "timeout" and not sched.waiting


def test_prefill_tokens_per_step_never_exceed_the_chunk_and_tokens_match_generate(tok):
    """--prefill-chunk bounds the prompt tokens of every step (a strict bound: the step after which
    running rows get their next token costs the same however many newcomers wait), and the
    chunked prefill gives generate's tokens."""
    from neoformer.serve import Sampling, Scheduler, Sequence

    model = tiny_decoder(tok, 128)
    prompts = [[5, 6, 7], [8, 9, 10], [11, 12, 13, 14, 15, 16, 17]]  # 3 + 3 tokens do not fit one 4-token step
    sched = Scheduler(model, tok, max_batch=4, prefill_chunk=4)
    out = [[] for _ in prompts]
    seqs = [Sequence(p, Sampling(max_tokens=6, ignore_eos=True), out[i].append) for i, p in enumerate(prompts)]
    for seq in seqs:
        sched.submit(seq)
    per_step = []
    while not all(o and o[-1].finish for o in out):
        before = sum(seq.prefilled for seq in seqs)
        sched.step()
        per_step.append(sum(seq.prefilled for seq in seqs) - before)
    assert max(per_step) <= 4 and per_step[:5] == [3, 3, 4, 3, 0]
    want = [generate(model, p, 6, eos_token_id=[], return_dict=True).new_tokens[0] for p in prompts]
    assert [[e.token for e in ev if e.token is not None] for ev in out] == want


def test_encoder_decoder_completions_match_generate(tok):
    from neoformer.serve import Sampling, Scheduler

    torch.manual_seed(1)
    cfg = ModelConfig(kind="encoder_decoder", vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_encoder_layers=2,
                      n_heads=4, ffn_hidden=48, max_seq_len=64, init_std=0.3)
    model = build_model(cfg).eval()
    sources = [tok.encode("abc"), tok.encode("the quick brown")]
    _, events = _collect(Scheduler(model, tok, max_batch=3), sources, [Sampling(max_tokens=8, ignore_eos=True)] * 2)
    want = [generate(model, s, 8, tokenizer=tok, eos_token_id=[], return_dict=True).new_tokens[0] for s in sources]
    assert [[e.token for e in ev if e.token is not None] for ev in events] == want


# ---- encoders: /v1/embeddings semantics, `neoformer embed`, `neoformer fill-mask` ---------------
@pytest.fixture(scope="module")
def encoder_ckpt(tmp_path_factory, tok):
    torch.manual_seed(2)
    cfg = ModelConfig(kind="encoder", vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, ffn_hidden=48,
                      max_seq_len=64, init_std=0.3)
    return checkpoint.save_checkpoint(tmp_path_factory.mktemp("enc") / "enc", 1, build_model(cfg), tokenizer=tok)


def test_embed_and_fill_mask_cli(encoder_ckpt, tok, tmp_path, capsys):
    from neoformer.serve.encoders import embed

    model, _ = checkpoint.load_model(encoder_ckpt)
    (tmp_path / "in.txt").write_text("the fox\n{\"text\": \"a lazy dog\"}\n")
    assert main(["embed", str(encoder_ckpt), "--input", str(tmp_path / "in.txt")]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    hidden = model.encode(torch.tensor([tok.encode("a lazy dog")])).double()[0].mean(0)
    assert torch.allclose(torch.tensor(rows[1]["embedding"], dtype=torch.float64), hidden / hidden.norm(), atol=1e-5)
    cls = embed(model, [tok.encode("the fox")], "cls", normalize=False)[0]
    assert torch.allclose(torch.tensor(cls), model.encode(torch.tensor([tok.encode("the fox")]))[0, 0], atol=1e-6)
    assert main(["fill-mask", str(encoder_ckpt), "--text", "the <mask>ox", "--json", "--top-k", "3"]) == 0
    (fillers,) = json.loads(capsys.readouterr().out)
    ids = tok.encode("the ") + [tok.mask_id] + tok.encode("ox")
    probs = model(torch.tensor([ids]))[0, 4].softmax(-1)
    assert [f["id"] for f in fillers] == probs.topk(3).indices.tolist()
    assert main(["fill-mask", str(encoder_ckpt), "--text", "no mask here"]) == 2
    assert capsys.readouterr().err.startswith("error: the text has no <mask>")


def test_generate_cli_prints_encoder_decoder_output_as_its_own_field(tmp_path, tok, capsys):
    torch.manual_seed(1)
    cfg = ModelConfig(kind="encoder_decoder", vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_encoder_layers=1,
                      n_heads=4, ffn_hidden=48, max_seq_len=64, init_std=0.3)
    model = build_model(cfg).eval()
    path = checkpoint.save_checkpoint(tmp_path / "s2s", 1, model, tokenizer=tok)
    assert main(["generate", str(path), "--prompt", "abc", "-n", "6", "--ignore-eos"]) == 0
    out = capsys.readouterr().out
    expected = generate(model, tok.encode("abc"), 6, tokenizer=tok, eos_token_id=[], return_dict=True).texts[0]
    assert out == f"source: abc\noutput: {expected}\n"


@pytest.mark.slow
def test_playground_streams_a_reply_in_a_headless_browser(served):
    """Debian's chromium + chromium-driver (apt-get install chromium chromium-driver), driven by selenium."""
    import shutil

    browser, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not browser or not driver_path:
        missing = "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        # .ci/run installs them and sets this, so CI never passes by skipping
        (pytest.fail if os.environ.get("NEOFORMER_REQUIRE_BROWSER") else pytest.skip)(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    port, _ = served
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.binary_location = browser
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        driver.find_element("id", "max_tokens").clear()
        driver.find_element("id", "max_tokens").send_keys("40")
        driver.find_element("id", "message").send_keys("hello there\n")
        seen = []
        for _ in range(200):  # bounded: 20 s; record the reply as it grows
            replies = driver.find_elements("css selector", "#log .assistant")
            text = replies[-1].text if replies else ""
            if not seen or text != seen[-1]:
                seen.append(text)
            if "tokens/s" in driver.find_element("id", "stats").text:
                break
            time.sleep(0.1)
        assert "tokens/s" in driver.find_element("id", "stats").text
        assert seen[-1] and not seen[-1].startswith("error")
        assert driver.find_element("css selector", "#log .user").text == "hello there"
    finally:
        driver.quit()


# ---- `neoformer serve --quantize`, quantized and adapter checkpoints ---------------------------------
def _server_of_cli(monkeypatch, argv):
    """What `neoformer serve ARGV` would run (the Server it builds), without starting uvicorn."""
    from neoformer.serve import app as app_module

    built = {}

    def capture(model, tokenizer, config, name, options, **_):
        built["server"] = app_module.Server(model, tokenizer, config, name, options)

    monkeypatch.setattr(app_module, "serve", capture)
    code = main(["serve", *argv, "--threads", "1", "--log-level", "warning"])
    return code, built.get("server")


def test_serve_quantizes_on_load_and_serves_quantized_and_adapter_checkpoints(tmp_path, tok, monkeypatch, capsys):
    from neoformer.finetune import AdapterModel, LoraConfig, adapter_settings, add_lora
    from neoformer.quantize import QuantizedLinear, quantize_model, save_quantized
    from neoformer.serve.app import create_app

    base = checkpoint.save_checkpoint(tmp_path / "base", 1, tiny_decoder(tok, 64), tokenizer=tok)
    quantized = save_quantized(quantize_model(tiny_decoder(tok, 64), "int8-dynamic"), tmp_path / "q8", tokenizer=tok)
    lora = LoraConfig(r=2, dropout=0.0, targets=("q", "v"))
    adapted = tiny_decoder(tok, 64)
    add_lora(adapted, lora)
    with torch.no_grad():
        adapted.decoder.blocks[0].attn.v_proj.lora_B.weight.normal_(0, 0.5)
    adapter = checkpoint.save_checkpoint(tmp_path / "adapter", 1, AdapterModel(adapted, lora),
                                         config=adapter_settings(base, lora, None))
    prompt = "the quick"
    for path, flags, scheme in ((base, ["--quantize", "int8"], "int8"), (quantized, [], "int8-dynamic"),
                                (adapter, [], None), (adapter, ["--quantize", "int8"], "int8")):
        code, server = _server_of_cli(monkeypatch, [str(path), *flags])
        assert code == 0, capsys.readouterr().err
        schemes = {m.scheme for m in server.model.modules() if isinstance(m, QuantizedLinear)}
        assert schemes == ({scheme} if scheme else set()), (path, flags)
        want = generate(server.model, tok.encode(prompt), 6, tokenizer=tok, return_dict=True).new_tokens[0]
        server.scheduler.start()
        try:
            body = json.dumps({"prompt": prompt, "max_tokens": 6, "temperature": 0}).encode()
            status, _, out = _asgi(create_app(server), "POST", "/v1/completions", body, stay=True)
        finally:
            server.scheduler.stop()
        assert status == 200, out
        n = out["usage"]["completion_tokens"]
        assert n >= 1 and out["choices"][0]["text"] == tok.decode(want[:n]), (path, flags)
    code, _ = _server_of_cli(monkeypatch, [str(quantized), "--quantize", "int8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: the model is already quantized (int8-dynamic)"), err
