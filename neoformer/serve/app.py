"""The HTTP layer: OpenAI-shaped routes over the scheduler (FastAPI).

Each generation request becomes one :class:`Sequence` per (prompt, choice); their events come
back from the scheduler thread into an asyncio queue. A client that disconnects (or a timeout)
cancels its sequences, which frees their rows on the next step.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from dataclasses import dataclass, replace
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat import chat_template_of
from ..kinds import get as model_kind
from .choices import Choice
from .encoders import POOLINGS, embed
from .metrics import Metrics
from .protocol import APIError, GenerationRequest, bad, chat_request, check_model, completion_request, prompts_of
from .scheduler import QueueFull, Scheduler, Sequence


@dataclass
class ServeOptions:
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    max_tokens_default: int = 256
    timeout: float = 600.0  # seconds per request, queueing included
    max_body_bytes: int = 1 << 20
    compile: bool = False
    batch_invariant: bool = True
    prefill_chunk: int = 32  # prompt tokens prefilled per step


class Server:
    """The loaded model, its scheduler and everything a route needs."""

    def __init__(self, model, tokenizer, config: dict, name: str, options: ServeOptions):
        self.model, self.tokenizer, self.config, self.name, self.options = model, tokenizer, config, name, options
        self.kind = model_kind(model)
        self.vocab = model.config.vocab_size
        self.capacity = model.config.max_seq_len
        self.template = chat_template_of(config)
        self.metrics = Metrics()
        self.scheduler = Scheduler(model, tokenizer, max_batch=options.max_batch, max_queue=options.max_queue,
                                   prefill_chunk=options.prefill_chunk, metrics=self.metrics, compile=options.compile,
                                   batch_invariant=options.batch_invariant)
        self.eos = {tokenizer.eos_id} if tokenizer is not None and tokenizer.eos_id is not None else set()
        self.created = int(time.time())
        self.outbox = Outbox()

    # ---- generation --------------------------------------------------------------------------
    def check_limits(self, req: GenerationRequest) -> GenerationRequest:
        """Prompt length and max_tokens against the model; fills the default max_tokens."""
        if not self.kind.cache.generates:
            raise APIError(f"this is a {self.model.config.kind} checkpoint; it cannot generate (try /v1/embeddings)",
                           param="model")
        if req.chat and self.kind.cache.cross_attention:
            raise APIError("an encoder-decoder checkpoint serves /v1/completions only", param="messages")
        if req.echo and self.kind.cache.cross_attention:
            raise bad("echo", "is not supported for encoder-decoder checkpoints")
        longest = max(len(p) for p in req.prompts)
        target = 1 if self.kind.cache.cross_attention else longest  # decoder tokens before the first new one
        room = self.capacity - target
        if longest > self.capacity or room < 1:
            raise bad("prompt" if not req.chat else "messages",
                      f"is {longest} tokens; this model's context is {self.capacity} tokens")
        wanted = req.max_tokens if req.max_tokens is not None else min(self.options.max_tokens_default, room)
        if wanted > room:
            raise bad("max_tokens", f"{wanted} + {target} prompt tokens exceeds this model's context of "
                      f"{self.capacity} tokens")
        return replace(req, sampling=replace(req.sampling, max_tokens=wanted))

    def submit(self, req: GenerationRequest, loop, queue: asyncio.Queue) -> tuple[list[Sequence], list[Choice]]:
        deadline = time.monotonic() + self.options.timeout
        seqs, choices = [], []
        for p, prompt in enumerate(req.prompts):
            for c in range(req.n):
                index = p * req.n + c
                sampling = req.sampling
                if sampling.seed is not None and c:
                    sampling = replace(sampling, seed=sampling.seed + c)  # n choices differ, reproducibly
                emit = (lambda i: lambda event: self.outbox.put(loop, queue, (i, event)))(index)
                seqs.append(Sequence(list(prompt), sampling, emit, deadline))
                choices.append(Choice(index, self.tokenizer, sampling.stop, self.eos, sampling.ignore_eos))
        try:
            for seq in seqs:
                self.scheduler.submit(seq)
        except QueueFull as err:
            for seq in seqs:
                seq.cancel()
            self.metrics.rejected += 1
            raise APIError(f"{err}; retry later", status=429, type="rate_limit_error",
                           headers={"Retry-After": "1"}) from None
        self.metrics.prompt_tokens += sum(len(p) for p in req.prompts)
        return seqs, choices


class Outbox:
    """Events from the scheduler thread to the event loop, one wake-up for many events: with 16
    streams, waking the loop once per token made the loop thread fight the model thread for the GIL."""

    def __init__(self):
        self.items: list = []
        self.lock = threading.Lock()
        self.scheduled = False

    def put(self, loop, queue: asyncio.Queue, item) -> None:
        with self.lock:
            self.items.append((queue, item))
            if self.scheduled:
                return
            self.scheduled = True
        try:
            loop.call_soon_threadsafe(self.flush)
        except RuntimeError:  # that request's event loop is closed: nobody is left to deliver to
            with self.lock:
                self.items, self.scheduled = [], False

    def flush(self) -> None:
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
        for queue, item in items:
            queue.put_nowait(item)


def _usage(req: GenerationRequest, choices: list[Choice]) -> dict:
    prompt = sum(len(p) for p in req.prompts)
    completion = sum(len(c.tokens) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _failure(choices: list[Choice]) -> APIError | None:
    reasons = {c.finish for c in choices}
    if "timeout" in reasons:
        return APIError("the request timed out (--timeout)", status=408, type="timeout_error")
    if "cancelled" in reasons:
        return APIError("the server is shutting down", status=503, type="server_error")
    errors = [r for r in reasons if r and r.startswith("error")]
    if errors:
        return APIError(f"generation failed: {errors[0]}", status=500, type="server_error")
    return None


async def _events(queue: asyncio.Queue, request: Request, seqs: list[Sequence]):
    """Batches of scheduler events until every sequence finished; cancels them all if the client goes away."""
    pending, checked = len(seqs), time.monotonic()
    try:
        while pending:
            try:
                index, event = await asyncio.wait_for(queue.get(), timeout=0.25)
            except asyncio.TimeoutError:
                index = event = None
            if time.monotonic() - checked > 0.25:  # also while tokens keep coming
                checked = time.monotonic()
                if await request.is_disconnected():
                    return
            if event is None:
                continue
            batch = [(index, event)]
            while not queue.empty():  # the loop fell behind: take what is there, send it in one write
                batch.append(queue.get_nowait())
            pending -= sum(e.finish is not None for _, e in batch)
            yield batch
    finally:
        for seq in seqs:
            seq.cancel()


def _response_head(kind: str, model: str) -> dict:
    prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model}


async def _complete(server: Server, req: GenerationRequest, request: Request):
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    seqs, choices = server.submit(req, loop, queue)
    if req.stream:
        return StreamingResponse(_stream(server, req, request, seqs, choices, queue), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    async for batch in _events(queue, request, seqs):
        for index, event in batch:
            choices[index].push(event)
    failure = _failure(choices)
    if failure is not None:
        raise failure
    head = _response_head("chat.completion" if req.chat else "text_completion", server.name)
    out = [_chat_choice(c, req) if req.chat else _text_choice(server, c, req) for c in choices]
    return {**head, "choices": out, "usage": _usage(req, choices)}


def _text_choice(server: Server, c: Choice, req: GenerationRequest) -> dict:
    prompt = req.prompts[c.index // req.n]
    prefix = (server.tokenizer.decode(prompt) if server.tokenizer is not None else "") if req.echo else ""
    logprobs = None
    if req.sampling.logprobs is not None:
        logprobs = c.completion_logprobs(prompt if req.echo else None)
    return {"index": c.index, "text": prefix + c.text, "logprobs": logprobs, "finish_reason": c.finish_reason}


def _chat_choice(c: Choice, req: GenerationRequest) -> dict:
    logprobs = c.chat_logprobs() if req.sampling.logprobs is not None else None
    return {"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": logprobs,
            "finish_reason": c.finish_reason}


def _sse(data) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def _stream(server: Server, req: GenerationRequest, request: Request, seqs, choices, queue):
    head = _response_head("chat.completion.chunk" if req.chat else "text_completion", server.name)
    if req.chat:
        for c in choices:
            yield _sse({**head, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]})
    async for batch in _events(queue, request, seqs):
        text = "".join(_chunk(head, req, choices[index], events) for index, events in _by_choice(batch).items())
        if text:
            yield text
    if req.include_usage:
        yield _sse({**head, "choices": [], "usage": _usage(req, choices)})
    yield "data: [DONE]\n\n"


def _by_choice(batch: list) -> dict[int, list]:
    """A batch of (choice index, event) -> each choice's events, in order."""
    out: dict[int, list] = {}
    for index, event in batch:
        out.setdefault(index, []).append(event)
    return out


def _chunk(head: dict, req: GenerationRequest, c: Choice, events: list) -> str:
    """One SSE chunk for choice c's events ("" when there is nothing to send yet): when the stream
    fell behind, the tokens that piled up go out together, as one delta (and one logprobs list)."""
    seen = len(c.logprobs)
    delta = "".join([c.push(event) for event in events])
    ended = events[-1].finish is not None
    if ended and _failure([c]) is not None:
        return _sse(_failure([c]).body())
    finish = c.finish_reason if ended else None
    if not delta and finish is None and req.sampling.logprobs is None:
        return ""
    if req.chat:
        lp = c.chat_logprobs(seen) if req.sampling.logprobs is not None else None
        body = {"index": c.index, "delta": {"content": delta} if delta or finish is None else {},
                "logprobs": lp, "finish_reason": finish}
    else:
        lp = c.completion_logprobs(None, seen) if req.sampling.logprobs is not None else None
        body = {"index": c.index, "text": delta, "logprobs": lp, "finish_reason": finish}
    return _sse({**head, "choices": [body]})


# ---- the app ------------------------------------------------------------------------------------
class Auth:
    """Pure ASGI middleware: with an API key, protected paths need ``Authorization: Bearer KEY`` (else
    401). Not ``@app.middleware``: that wraps every streamed chunk in an extra task hop."""

    def __init__(self, app, key: str | None):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if self.key and scope["type"] == "http" and scope["path"].startswith(PROTECTED):
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.key}".encode()):
                return await _send_error(send, APIError("invalid or missing API key (Authorization: Bearer KEY)",
                                                        status=401, type="authentication_error",
                                                        code="invalid_api_key"))
        await self.app(scope, receive, send)


class BodyLimit:
    """Pure ASGI middleware: bodies over ``limit`` bytes get 413 before the route reads them all."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _send_error(send, APIError(f"request body over {self.limit} bytes", status=413))
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise APIError(f"request body over {self.limit} bytes", status=413)
            return message

        await self.app(scope, limited, send)


async def _send_error(send, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise APIError("the request body is not UTF-8") from None
    except (ValueError, RecursionError):
        raise APIError("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    try:  # a lone surrogate ("\ud800") is valid JSON but not text; tokenizers would fail on it later
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise APIError("the request holds invalid Unicode (a lone surrogate escape)") from None
    return body


PROTECTED = ("/v1/", "/tokenize", "/detokenize")


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="neoformer", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=_lifespan(server))
    _add_errors(app, server)
    _add_routes(app, server)
    app.add_middleware(Auth, key=server.options.api_key)
    app.add_middleware(BodyLimit, limit=server.options.max_body_bytes)
    return app


def _lifespan(server: Server):
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        server.scheduler.start()
        yield
        server.scheduler.stop()

    return lifespan


def _add_errors(app: FastAPI, server: Server) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, err: APIError):
        server.metrics.requests[(request.url.path, f"{err.status // 100}xx")] += 1
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(str(err.detail), err.status_code, kind).body(), status_code=err.status_code)


def _add_routes(app: FastAPI, server: Server) -> None:
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        text = server.metrics.render(server.scheduler.running, len(server.scheduler.waiting))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse(resources.files(__package__).joinpath("playground.html").read_text(encoding="utf-8"))

    @app.get("/v1/models")
    async def models():
        card = {"id": server.name, "object": "model", "created": server.created, "owned_by": "neoformer",
                "max_model_len": server.capacity}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _json_body(request)
        check_model(body, server.name)
        req = server.check_limits(completion_request(body, server.tokenizer, server.vocab))
        return await _complete(server, req, request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _json_body(request)
        check_model(body, server.name)
        req = server.check_limits(chat_request(body, server.tokenizer, server.vocab, server.template))
        return await _complete(server, req, request)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await _json_body(request)
        check_model(body, server.name)
        return await _embeddings(server, body)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await _json_body(request)
        if server.tokenizer is None:
            raise APIError("this checkpoint has no tokenizer")
        if "messages" in body:
            ids = chat_request({**body, "max_tokens": 1}, server.tokenizer, server.vocab, server.template).prompts[0]
        elif isinstance(body.get("prompt"), str):
            ids = server.tokenizer.encode(body["prompt"])
        else:
            raise bad("prompt", "must be a string (or send messages)")
        return {"tokens": ids, "count": len(ids), "max_model_len": server.capacity}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await _json_body(request)
        tokens = body.get("tokens")
        if server.tokenizer is None:
            raise APIError("this checkpoint has no tokenizer")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise bad("tokens", "must be a list of token ids")
        if not all(0 <= t < server.vocab for t in tokens):
            raise bad("tokens", f"token ids must be in [0, {server.vocab})")
        return {"prompt": server.tokenizer.decode(tokens)}


async def _embeddings(server: Server, body: dict):
    if "input" not in body:
        raise bad("input", "is required")
    prompts = prompts_of(body["input"], "input", server.tokenizer, server.vocab)
    if len(prompts) > 256:
        raise bad("input", "at most 256 inputs per request")
    if max(len(p) for p in prompts) > server.capacity:
        raise bad("input", f"an input is longer than this model's context of {server.capacity} tokens")
    pooling = body.get("pooling")
    if pooling is not None and pooling not in POOLINGS:
        raise bad("pooling", f"must be one of: {', '.join(POOLINGS)}")
    normalize = body.get("normalize", True)
    if not isinstance(normalize, bool):
        raise bad("normalize", "must be true or false")
    if body.get("encoding_format", "float") not in ("float", "base64"):
        raise bad("encoding_format", "must be float or base64")
    if body.get("dimensions") is not None:
        raise bad("dimensions", "is not supported")
    try:
        vectors = await asyncio.wrap_future(server.scheduler.call(
            lambda: embed(server.model, prompts, pooling, normalize)))
    except ValueError as err:
        raise bad("pooling", str(err)) from None
    data = [{"object": "embedding", "index": i, "embedding": _encode_vector(v, body.get("encoding_format"))}
            for i, v in enumerate(vectors)]
    tokens = sum(len(p) for p in prompts)
    return {"object": "list", "data": data, "model": server.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _encode_vector(vector: list[float], encoding: str | None):
    if encoding != "base64":
        return vector
    import base64
    import struct

    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def serve(model, tokenizer, config: dict, name: str, options: ServeOptions, host: str = "127.0.0.1",
          port: int = 8000, log_level: str = "info", ready=None) -> None:
    """Run the server until SIGINT/SIGTERM (uvicorn stops accepting, lets running requests finish for
    up to ``min(timeout, 30)`` s, then the scheduler cancels what is left)."""
    import uvicorn

    server = Server(model, tokenizer, config, name, options)
    config_ = uvicorn.Config(create_app(server), host=host, port=port, log_level=log_level,
                             timeout_graceful_shutdown=min(options.timeout, 30.0), access_log=False)
    uvicorn.Server(config_).run()
