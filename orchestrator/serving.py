"""Every registered prefix behind one OpenAI-compatible endpoint, one base model in memory per base key.

    PREFIXD_API_TOKENS="alice=tok-a" prefixd serve-models --port 8001
    client = openai.OpenAI(base_url="http://127.0.0.1:8001/v1", api_key="tok-a")
    client.completions.create(model="capitals", prompt="The capital of Peru is", max_tokens=8, temperature=0)

    app = create_serving_app(catalog, callers)        # standalone: /v1/... and /metrics
    router = serving_router(catalog, authorize)       # inside `prefixd serve --api --serve-models`: /openai/v1/...

Routes (bearer tokens and tenants as in the job API, orchestrator/api.py): POST /v1/completions, POST
/v1/chat/completions (the base tokenizer's chat template; a base without one answers 400 naming
`messages`), GET /v1/models (the caller's models, orchestrator/serving_models.py), GET /metrics
(Prometheus text; admins only). Request fields: model (task[@alias|:version], default @champion), prompt
(a string or a list of strings) or messages, max_tokens (default 16), temperature (default 1; 0 is greedy),
top_p, stop (a string or up to 4), n, seed, stream (server-sent events in OpenAI's chunk format, then
`data: [DONE]`; stream_options.include_usage adds a last chunk with usage). Prompts are tokenized as
`prefixd generate` tokenizes them, and greedy answers are its answers (before its strip()).

Errors use OpenAI's body, {"error": {"message", "type", "param", "code"}}: 400 for bad fields (param names
the field), 404 for an unknown model (the message lists the caller's models), 429 when the base model's
queue is full, 504 past the request timeout.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from orchestrator.serving_models import ModelCatalog, ModelNotFound, ModelRefused, QueueFull, Served
from workers.decode import Row, Sampling
from workers.generate import encode_prompt

DEFAULT_MAX_TOKENS = 16
MAX_STOPS = 4
UNSUPPORTED = {"logprobs": (None, False, 0), "echo": (None, False), "best_of": (None, 1), "suffix": (None, ""),
               "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}),
               "tools": (None, []), "functions": (None, [])}  # fmt: skip


class BadRequest(Exception):
    def __init__(self, param: str | None, message: str, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.message, self.status, self.kind = param, message, status, kind


def error_response(e: BadRequest) -> JSONResponse:
    body = {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": None}}
    return JSONResponse(body, status_code=e.status)


@dataclass(frozen=True, kw_only=True)
class Params:
    """A checked request."""

    model: str
    prompts: list[Any]
    """Completions: texts; chat: lists of messages."""
    sampling: Sampling
    stop: tuple[str, ...]
    n: int
    stream: bool
    include_usage: bool


def _number(body: dict, key: str, default, lo: float, hi: float, *, integer: bool = False, lo_open: bool = False):
    value = body.get(key)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise BadRequest(key, f"{key}: expected {kind}, got {value!r}")
    if not math.isfinite(value) or value < lo or value > hi or (lo_open and value == lo):
        low = f"> {lo}" if lo_open else f">= {lo}"
        raise BadRequest(key, f"{key}: {value!r} is out of range; accepted: {kind} {low} and <= {hi}")
    return value


def parse_request(body: Any, *, chat: bool, max_tokens_limit: int, max_n: int) -> Params:
    """Check every field this server reads; BadRequest names the first bad one."""
    if not isinstance(body, dict):
        raise BadRequest(None, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model", "model: required, a task name such as capitals, capitals@champion or capitals:3")
    for key, defaults in UNSUPPORTED.items():
        if key in body and body[key] not in defaults:
            raise BadRequest(key, f"{key}: not supported by this server (leave it out)")
    if chat:
        messages = body.get("messages")
        ok = (
            isinstance(messages, list)
            and messages
            and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        )
        if not ok:
            raise BadRequest("messages", "messages: expected a non-empty list of {role, content} with string content")
        prompts: list[Any] = [messages]
    else:
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise BadRequest("prompt", "prompt: expected a string or a non-empty list of strings")
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, DEFAULT_MAX_TOKENS, 1, max_tokens_limit, integer=True)
    temperature = float(_number(body, "temperature", 1.0, 0.0, 2.0))
    top_p = float(_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True))
    n = _number(body, "n", 1, 1, max_n, integer=True)
    if n * len(prompts) > max_n:
        raise BadRequest("n", f"n: {n} choices x {len(prompts)} prompts is over this server's {max_n} rows")
    seed = _number(body, "seed", None, -(2**63), 2**63 - 1, integer=True)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else ([] if stop is None else stop)
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise BadRequest("stop", f"stop: expected a non-empty string or a list of at most {MAX_STOPS} of them")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise BadRequest("stream", f"stream: expected true or false, got {stream!r}")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("stream_options", 'stream_options: expected an object such as {"include_usage": true}')
    sampling = Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    return Params(
        model=model, prompts=prompts, sampling=sampling, stop=tuple(stops), n=n, stream=bool(stream),
        include_usage=bool(options.get("include_usage")),
    )  # fmt: skip


def prompt_ids(served: Served, prompt: Any, *, chat: bool) -> list[int]:
    """Token ids of one prompt (completions: as `prefixd generate`; chat: the chat template's)."""
    tokenizer = served.engine.tokenizer
    field = "messages" if chat else "prompt"
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise BadRequest(
                "messages", f"messages: base model {served.engine.base} has no chat template; use /v1/completions"
            )
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = encode_prompt(tokenizer, prompt, seq2seq=False)
    if not ids:
        raise BadRequest(field, f"{field}: the prompt has no tokens")
    return ids


class _Choice:
    """Text of one choice as its tokens arrive: stop strings cut it, streamed text is held back while it
    could still become a stop string (or ends inside a multi-byte character)."""

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.tokenizer, self.stops = tokenizer, stops
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0
        self.finish: str | None = None

    def add(self, token: int | None, finish: str | None) -> None:
        if self.finish is not None:
            return
        if token is not None:
            self.tokens.append(token)
            self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
            cuts = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
            if cuts:
                self.text, finish = self.text[: min(cuts)], "stop"
        self.finish = finish

    def delta(self) -> str:
        """New text that is safe to send now."""
        end = len(self.text)
        if self.finish is None:
            end -= max((len(s) - 1 for s in self.stops), default=0)
            while end > self.sent and self.text[end - 1] == "\ufffd":
                end -= 1
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent : end], end
        return out


def serving_router(catalog: ModelCatalog, authorize) -> APIRouter:
    """The OpenAI routes over `catalog`; `authorize` is the job API's bearer-token dependency."""
    router = APIRouter()
    settings, metrics = catalog.settings, catalog.metrics

    async def resolve(body: Any, chat: bool, caller) -> tuple[Params, Served, list[list[int]]]:
        params = parse_request(body, chat=chat, max_tokens_limit=settings.max_tokens_limit, max_n=settings.max_batch)
        try:
            served = await run_in_threadpool(catalog.get, params.model, caller)
        except ModelNotFound as e:
            raise BadRequest("model", str(e), status=404, kind="not_found_error") from None
        except ModelRefused as e:
            param = str(e).split(":", 1)[0] if str(e).startswith(("model:", "n:")) else "model"
            raise BadRequest(param, str(e)) from None
        except Exception as e:  # noqa: BLE001 - the registry unreachable or refusing: say so, as a 503
            raise BadRequest(None, f"model registry: {type(e).__name__}: {e}", 503, "server_error") from None
        ids = [prompt_ids(served, p, chat=chat) for p in params.prompts]
        p_len, limit = served.prefix.shape[0], served.engine.context_length
        for i in ids:
            field = "messages" if chat else "prompt"
            if p_len + len(i) >= limit:
                raise BadRequest(
                    field, f"{field}: {len(i)} tokens; with the {p_len}-token prefix this model takes at most "
                    f"{limit - p_len - 1} prompt tokens",
                )  # fmt: skip
            if p_len + len(i) + params.sampling.max_tokens > limit:
                raise BadRequest(
                    "max_tokens", f"max_tokens: {params.sampling.max_tokens}; the {len(i)}-token prompt and the "
                    f"{p_len}-token prefix leave room for {limit - p_len - len(i)} (context {limit})",
                )  # fmt: skip
        return params, served, ids

    async def complete(request: Request, caller, chat: bool):
        label = "-"  # the metrics' model label: a name that resolved, never arbitrary input
        try:
            try:
                body = await request.json()
            except ValueError:
                raise BadRequest(None, "the request body is not valid JSON") from None
            params, served, ids = await resolve(body, chat, caller)
            label = params.model
            return await run(params, served, ids, chat)
        except BadRequest as e:
            metrics.request(label, e.status)
            return error_response(e)

    async def run(params: Params, served: Served, ids: list[list[int]], chat: bool):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        rows = [
            Row(prefix=served.prefix, prompt_ids=p, sampling=_seeded(params.sampling, k))
            for p in ids
            for k in range(params.n)
        ]
        deliver = lambda *ev: loop.call_soon_threadsafe(events.put_nowait, ev)  # noqa: E731 - from the decoding thread
        try:
            ticket = served.engine.submit(rows, deliver, model=params.model)
        except QueueFull as e:
            raise BadRequest(None, str(e), status=429, kind="rate_limit_error") from None
        except ModelRefused as e:
            raise BadRequest("n", str(e)) from None
        tokenizer = served.engine.tokenizer
        choices = [_Choice(tokenizer, params.stop) for _ in rows]
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        prompt_tokens = sum(len(i) for i in ids)

        def usage() -> dict:
            done = sum(len(c.tokens) for c in choices)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done}

        async def next_events() -> list[int]:
            """Wait for events; returns the indices of choices that changed; BadRequest on a timeout."""
            changed = []
            index, token, finish = await events.get()
            while True:
                if index < 0:
                    status = 504 if finish == "timeout" else 500
                    raise BadRequest(None, f"request {finish} after {settings.timeout_s} s" if status == 504 else finish,
                                     status=status, kind="timeout" if status == 504 else "server_error")  # fmt: skip
                choices[index].add(token, finish)
                changed.append(index)
                if events.empty():
                    break
                index, token, finish = events.get_nowait()
            if all(c.finish for c in choices):
                ticket.cancel()
            return changed

        def chunk(index: int, text: str, finish: str | None) -> str:
            if chat:
                delta = {"role": "assistant", "content": text} if text or finish is None else {}
                choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": index, "text": text, "finish_reason": finish, "logprobs": None}
            obj = "chat.completion.chunk" if chat else "text_completion"
            out = {"id": rid, "object": obj, "created": created, "model": params.model, "choices": [choice]}
            return f"data: {json.dumps(out)}\n\n"

        if not params.stream:
            try:
                while not all(c.finish for c in choices):
                    await next_events()
            except BadRequest:
                ticket.cancel()
                raise
            finally:
                ticket.cancel()
            metrics.request(params.model, 200, prompt_tokens)
            if chat:
                out = [{"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish,
                        "logprobs": None} for i, c in enumerate(choices)]  # fmt: skip
            else:
                out = [{"index": i, "text": c.text, "finish_reason": c.finish, "logprobs": None}
                       for i, c in enumerate(choices)]  # fmt: skip
            obj = "chat.completion" if chat else "text_completion"
            return {
                "id": rid,
                "object": obj,
                "created": created,
                "model": params.model,
                "choices": out,
                "usage": usage(),
            }

        async def stream():
            code = 200
            try:
                while not all(c.finish for c in choices):
                    for i in sorted(set(await next_events())):
                        text = choices[i].delta()
                        if text or choices[i].finish:
                            yield chunk(i, text, choices[i].finish)
                if params.include_usage:
                    obj = "chat.completion.chunk" if chat else "text_completion"
                    last = {"id": rid, "object": obj, "created": created, "model": params.model, "choices": [],
                            "usage": usage()}  # fmt: skip
                    yield f"data: {json.dumps(last)}\n\n"
            except BadRequest as e:
                code = e.status
                yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.kind, 'param': None}})}\n\n"
            finally:
                ticket.cancel()  # also when the client went away
                metrics.request(params.model, code, prompt_tokens)
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @router.post("/v1/completions")
    async def completions(request: Request, caller=Depends(authorize)):
        """OpenAI text completions over a registered prefix."""
        return await complete(request, caller, chat=False)

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request, caller=Depends(authorize)):
        """OpenAI chat completions (the base model's chat template) over a registered prefix."""
        return await complete(request, caller, chat=True)

    @router.get("/v1/models")
    async def models(caller=Depends(authorize)):
        """The models the caller may use, as OpenAI model objects (id: the task name)."""
        listing = await run_in_threadpool(catalog.listing)
        data = {}
        for m in listing:
            if catalog.visible((m.get("tags") or {}).get("prefixd.owner"), caller):
                owner = (m.get("tags") or {}).get("prefixd.owner") or "prefixd"
                data.setdefault(m["task"] or m["name"], {"id": m["task"] or m["name"], "object": "model",
                                                        "created": 0, "owned_by": owner})  # fmt: skip
        return {"object": "list", "data": [data[k] for k in sorted(data)]}

    @router.get("/metrics", response_class=PlainTextResponse)
    async def prometheus(caller=Depends(authorize)):
        """Prometheus text format (orchestrator/serving_metrics.py); admin tokens only."""
        if not caller.admin:
            return error_response(BadRequest(None, "metrics: an admin token is required", 403, "permission_error"))
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    return router


def _seeded(sampling: Sampling, k: int) -> Sampling:
    """Choice k of a seeded request samples with seed + k (choices differ, and repeat run to run)."""
    if sampling.seed is None or k == 0:
        return sampling
    return Sampling(max_tokens=sampling.max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                    seed=sampling.seed + k)  # fmt: skip


def create_serving_app(catalog: ModelCatalog, callers) -> FastAPI:
    """The standalone app: the serving routes at /v1 and /metrics, /healthz open."""
    from orchestrator.api import bearer_authorizer

    app = FastAPI(title="prefixd serve-models", version="1", description=__doc__)
    app.include_router(serving_router(catalog, bearer_authorizer(callers)))
    app.add_api_route("/healthz", lambda: {"ok": True}, include_in_schema=False)
    return app


@dataclass(frozen=True)
class ServingHandle:
    """A running standalone server (uvicorn in a daemon thread)."""

    url: str
    server: uvicorn.Server
    thread: threading.Thread
    catalog: ModelCatalog

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)
        self.catalog.close()


def start_serving(catalog: ModelCatalog, callers, *, host: str = "127.0.0.1", port: int = 8001) -> ServingHandle:
    """Serve create_serving_app on host:port (0: a free port) in a thread; returns once it listens."""
    from orchestrator.api_server import listen_socket, serve_in_thread

    sock = listen_socket(host, port)
    server, thread = serve_in_thread(create_serving_app(catalog, callers), sock, f"serve-models on {host}:{port}")
    shown = f"[{host}]" if ":" in host else host
    return ServingHandle(f"http://{shown}:{sock.getsockname()[1]}", server, thread, catalog)
