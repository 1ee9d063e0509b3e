"""`neoformer serve` through its ASGI app: /v1/embeddings (decoder and encoder checkpoints, every pooling, the
normalize switch) against a float64 recomputation, the 408 request timeout (running and queued),
and the streaming pieces (incremental detokenization, tokens that pile up going out as one chunk)."""
import base64
import json
import random
import struct
import threading
import time

import pytest
import torch
from test_serve import TEXT, _asgi, tiny_decoder

from neoformer import ModelConfig, build_model, checkpoint
from neoformer.tokenizer import CharTokenizer

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer.from_texts([TEXT])


def _reference(model, prompts, pooling, normalize):
    """Each prompt alone (no padding) through a float64 copy of the model, pooled by hand."""
    model = model.double()
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            if model.config.kind == "encoder":
                hidden = model.encode(ids)[0]
            else:
                hidden = model.forward_hidden(ids, use_cache=False).hidden[0]
        vector = {"mean": hidden.mean(0), "cls": hidden[0], "last": hidden[-1]}[pooling]
        out.append(vector / vector.norm() if normalize else vector)
    return torch.stack(out)


def _vectors(out) -> torch.Tensor:
    def one(e):
        if isinstance(e, str):  # base64 little-endian float32
            raw = base64.b64decode(e)
            return list(struct.unpack(f"<{len(raw) // 4}f", raw))
        return e

    assert [d["index"] for d in out["data"]] == list(range(len(out["data"])))
    return torch.tensor([one(d["embedding"]) for d in out["data"]], dtype=torch.float64)


def _embeddings(app, body) -> tuple[int, dict]:
    status, _, out = _asgi(app, "POST", "/v1/embeddings", json.dumps(body).encode(), stay=True)
    return status, out


def test_embeddings_for_a_decoder_checkpoint(tok):
    """Ragged inputs batched together == each input alone in float64; last (default) and mean pooling."""
    from neoformer.serve.app import ServeOptions, Server, create_app

    model = tiny_decoder(tok, 128)
    server = Server(model, tok, {}, "tiny", ServeOptions())
    app = create_app(server)
    texts = ["the quick brown fox", "a", "lazy dog jumps over the fox"]
    ids = [tok.encode(t) for t in texts]
    server.scheduler.start()
    try:
        for body, pooling, normalize in [({}, "last", True), ({"pooling": "mean", "normalize": False}, "mean", False),
                                         ({"pooling": "last", "encoding_format": "base64"}, "last", True)]:
            status, out = _embeddings(app, {"model": "tiny", "input": texts, **body})
            assert status == 200, out
            got, want = _vectors(out), _reference(model, ids, pooling, normalize)
            assert torch.allclose(got, want, atol=1e-5), (body, (got - want).abs().max())
            assert out["usage"] == {"prompt_tokens": sum(map(len, ids)), "total_tokens": sum(map(len, ids))}
        status, out = _embeddings(app, {"model": "tiny", "input": ids[1:]})  # token ids work too
        assert status == 200 and torch.allclose(_vectors(out), _reference(model, ids[1:], "last", True), atol=1e-5)
        for bad, param in [({"pooling": "cls"}, "pooling"), ({"pooling": "max"}, "pooling"),
                           ({"normalize": "yes"}, "normalize"), ({"input": []}, "input"),
                           ({"input": "x" * 200}, "input"), ({"dimensions": 8}, "dimensions")]:
            status, out = _embeddings(app, {"model": "tiny", "input": texts, **bad})
            assert status == 400 and out["error"]["param"] == param, (bad, out)
        status, out = _embeddings(app, {"model": "other", "input": texts})
        assert status == 404
    finally:
        server.scheduler.stop()


def test_embeddings_for_an_encoder_checkpoint(tok):
    """Encoder (NeoBERT-style): mean (the default) and cls pooling, normalized or not; it cannot generate."""
    from neoformer.serve.app import ServeOptions, Server, create_app

    torch.manual_seed(2)
    cfg = ModelConfig(kind="encoder", vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, ffn_hidden=48,
                      max_seq_len=64, init_std=0.3)
    model = build_model(cfg).eval()
    server = Server(model, tok, {}, "enc", ServeOptions())
    app = create_app(server)
    texts = ["the fox", "a lazy dog jumps"]
    ids = [tok.encode(t) for t in texts]
    server.scheduler.start()
    try:
        for body, pooling, normalize in [({}, "mean", True), ({"pooling": "cls", "normalize": False}, "cls", False),
                                         ({"pooling": "mean", "normalize": False}, "mean", False)]:
            status, out = _embeddings(app, {"input": texts, **body})
            assert status == 200, out
            got, want = _vectors(out), _reference(model, ids, pooling, normalize)
            assert torch.allclose(got, want, atol=1e-5), (body, (got - want).abs().max())
        assert not torch.allclose(_vectors(out).norm(dim=-1), torch.ones(2, dtype=torch.float64))  # not normalized
        status, _, out = _asgi(app, "POST", "/v1/completions", json.dumps({"prompt": "the", "max_tokens": 2}).encode())
        assert status == 400 and "cannot generate" in out["error"]["message"]
    finally:
        server.scheduler.stop()


def test_request_timeout_408_while_running_and_while_queued(tok):
    """--timeout counts from arrival: a request past it gets 408, whether it holds a row or still waits.
    Running: the model thread is held up by a task of known length (longer than the timeout); queued:
    the model thread starts only after the wait, so the outcome does not depend on this machine's speed."""
    from neoformer.serve.app import ServeOptions, Server, create_app

    server = Server(tiny_decoder(tok, 512), tok, {}, "tiny", ServeOptions(timeout=0.5, max_batch=1))
    app = create_app(server)
    long = json.dumps({"prompt": "the", "max_tokens": 500, "ignore_eos": True}).encode()
    server.scheduler.start()
    try:
        result = {}
        worker = threading.Thread(target=lambda: result.update(out=_asgi(app, "POST", "/v1/completions", long, stay=True)))
        worker.start()
        give_up = time.monotonic() + 60  # bounded: until the request holds its row
        while not server.scheduler.running and time.monotonic() < give_up:
            time.sleep(0.001)
        assert server.scheduler.running == 1
        server.scheduler.call(lambda: time.sleep(0.7)).result(10)  # past its deadline while running
        worker.join(30)
        status, _, out = result["out"]
        assert status == 408 and out["error"]["type"] == "timeout_error", out

        status, _, out = _asgi(app, "POST", "/v1/completions", json.dumps({"prompt": "the", "max_tokens": 2}).encode(),
                               stay=True)
        assert status == 200 and out["usage"]["completion_tokens"] == 2  # and the server goes on
    finally:
        server.scheduler.stop()

    # while queued: a second server whose model thread starts only once the request has waited past its
    # deadline, so the outcome does not hang on how soon a busy machine delivers the request
    queued = Server(tiny_decoder(tok, 512), tok, {}, "tiny", ServeOptions(timeout=0.5, max_batch=1))
    app = create_app(queued)
    result = {}
    short = json.dumps({"prompt": "the", "max_tokens": 2}).encode()
    worker = threading.Thread(target=lambda: result.update(out=_asgi(app, "POST", "/v1/completions", short, stay=True)),
                              daemon=True)
    worker.start()
    give_up = time.monotonic() + 60
    while not queued.scheduler.waiting and time.monotonic() < give_up:
        time.sleep(0.001)
    assert queued.scheduler.waiting, "the request never reached the queue"
    time.sleep(0.7)  # counted from its arrival
    queued.scheduler.start()
    try:
        worker.join(30)
        status, _, out = result["out"]
        assert status == 408 and out["error"]["type"] == "timeout_error", out
        assert not queued.scheduler.waiting and not queued.scheduler.running
    finally:
        queued.scheduler.stop()


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_streamed_text_grows_incrementally_and_equals_the_full_decode(kind):
    """Byte-level BPE splits multi-byte characters across tokens; SentencePiece drops the leading
    space of a decode: the streamed pieces must still add up to one full decode, stop strings cut."""
    from neoformer.serve.choices import Choice
    from neoformer.serve.scheduler import Event
    from neoformer.tokenizer import train_bpe

    text = "héllo wörld, naïve café — 日本語 the quick 🦊 jumps. " * 3
    if kind == "bpe":
        tokenizer = train_bpe([text], 300)
    else:
        pytest.importorskip("sentencepiece")
        from neoformer.tokenizer import train_sentencepiece

        tokenizer = train_sentencepiece([text * 20], 320)
    rng = random.Random(0)
    ids = tokenizer.encode(text)
    for trial in range(20):
        start = rng.randrange(len(ids) - 20)
        tokens = ids[start:start + rng.randrange(5, 40)]
        if trial % 3 == 0:  # random ids too (half characters that never complete)
            tokens = [rng.randrange(tokenizer.vocab_size) for _ in range(30)]
        full = tokenizer.decode(tokens)
        stops = (full[len(full) // 2:len(full) // 2 + 2],) if trial % 2 and len(full) > 6 else ()
        choice = Choice(0, tokenizer, stops, {tokenizer.eos_id}, ignore_eos=False)
        pieces = [choice.push(Event(token=t)) for t in tokens] + [choice.push(Event(finish="length"))]
        want = full[:full.find(stops[0])] if stops and stops[0] in full else full
        assert "".join(pieces) == want == choice.text, (kind, tokens, stops)


def test_tokens_that_piled_up_go_out_as_one_chunk(tok):
    """When the stream falls behind, a choice's waiting tokens become one SSE chunk: one text delta
    (the same text) and one logprobs list with every token."""
    from neoformer.serve.app import _chunk
    from neoformer.serve.choices import Choice
    from neoformer.serve.protocol import completion_request
    from neoformer.serve.scheduler import Event

    req = completion_request({"prompt": "the", "logprobs": 0, "stream": True}, tok, tok.vocab_size)
    ids = tok.encode("fox jumps")
    events = [Event(token=t, logprob=(-0.5 * i, [])) for i, t in enumerate(ids)] + [Event(finish="length")]
    one, many = Choice(0, tok, (), set(), True), Choice(0, tok, (), set(), True)
    singles = [json.loads(_chunk({}, req, one, [e])[6:]) for e in events]
    (merged,) = [json.loads(line[6:]) for line in _chunk({}, req, many, events).split("\n\n") if line]
    assert "".join(s["choices"][0]["text"] for s in singles) == merged["choices"][0]["text"] == "fox jumps"
    assert merged["choices"][0]["logprobs"]["token_logprobs"] == [-0.5 * i for i in range(len(ids))]
    assert merged["choices"][0]["logprobs"]["tokens"] == list("fox jumps")
    assert merged["choices"][0]["finish_reason"] == "length"


@pytest.mark.slow
def test_compiled_decode_is_batch_invariant_across_attention_windows(tok):
    """--compile builds one graph per attention window; a request's tokens and log-probabilities under
    load (wider windows, other rows busy) == alone, greedy and seeded, and greedy == generate."""
    from test_serve import _collect

    from neoformer.generate import generate
    from neoformer.serve import Sampling, Scheduler

    model = tiny_decoder(tok, 256)
    rng = random.Random(0)
    prompts = [[rng.randrange(4, tok.vocab_size) for _ in range(rng.randrange(1, 150))] for _ in range(6)]
    samplings = [Sampling(max_tokens=rng.randrange(5, 40), ignore_eos=True, logprobs=0,
                          **({"temperature": 1.0, "top_p": 0.9, "seed": i} if i % 2 else {})) for i in range(6)]
    sched = Scheduler(model, tok, max_batch=4, compile=True)

    def tokens(events):
        return [(e.token, e.logprob) for e in events if e.token is not None]

    alone = [tokens(_collect(sched, [p], [s])[1][0]) for p, s in zip(prompts, samplings)]
    together = [tokens(events) for events in _collect(sched, prompts, samplings)[1]]
    assert together == alone
    want = generate(model, prompts[0], samplings[0].max_tokens, eos_token_id=[], return_dict=True).new_tokens[0]
    assert [t for t, _ in alone[0]] == want
